"""The one configuration reader and validator (protocols.settings)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import pytest

from protocols.errors import ConfigError
from protocols.settings import (
    StatePaths,
    build,
    check_address,
    check_number,
    check_path,
    read_yaml_mapping,
)


@dataclass(frozen=True)
class _Inner:
    rate: float = 1.0
    enabled: bool = True


@dataclass(frozen=True)
class _Outer:
    name: str
    inner: _Inner = field(default_factory=_Inner)
    share: float = field(default=0.5, metadata={"check": check_number(0.0, 1.0)})
    peer: str | None = field(default=None, metadata={"check": check_address})
    out: Path | None = field(default=None, metadata={"check": check_path})
    count: int = 3


def test_builds_nested_and_checked_fields(tmp_path):
    got = build(
        _Outer,
        {"name": "a", "inner": {"rate": 2}, "share": 1, "peer": "h:7443", "out": "x/y",
         "count": 5},
        source="f.yaml", base=tmp_path,
    )
    assert got == _Outer("a", _Inner(2.0, True), 1.0, "h:7443", tmp_path / "x" / "y", 5)
    assert build(_Outer, {"name": "a", "peer": None}, source="f.yaml").peer is None


@pytest.mark.parametrize(
    ("doc", "needle"),
    [
        ({}, "f.yaml: name: required field is missing"),
        ({"name": "a", "nmae": 1}, "f.yaml: nmae: unknown field (known: count, inner,"),
        ({"name": "a", "inner": {"rtae": 1}}, "f.yaml: inner.rtae: unknown field"),
        ({"name": "a", "inner": [1]}, "f.yaml: inner: expected a mapping"),
        ({"name": "a", "inner": {"enabled": "yes"}}, "inner.enabled: must be true or false"),
        ({"name": "a", "count": True}, "count: must be a positive integer, got True"),
        ({"name": "a", "count": 0}, "count: must be a positive integer"),
        ({"name": ""}, "name: must be a non-empty string"),
        ({"name": "a", "share": 2}, "share: must be a number in [0, 1], got 2"),
        ({"name": "a", "peer": "nohost"}, "peer: must be HOST:PORT"),
        ({"name": "a", "inner": {"rate": -1}}, "inner.rate: must be a positive number"),
    ],
)
def test_every_error_names_file_and_field(doc, needle):
    with pytest.raises(ConfigError) as err:
        build(_Outer, doc, source="f.yaml")
    assert needle in str(err.value)


def test_reader_errors(tmp_path):
    p = tmp_path / "c.yaml"
    with pytest.raises(ConfigError, match="not found"):
        read_yaml_mapping(p)
    p.write_text("a: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML at line"):
        read_yaml_mapping(p)
    p.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="top level: expected a mapping"):
        read_yaml_mapping(p)
    p.write_bytes(b"a: \xff\xfe\n")
    with pytest.raises(ConfigError, match="not UTF-8"):
        read_yaml_mapping(p)
    p.write_text("a: " + "x" * 100)
    with pytest.raises(ConfigError, match="larger than 10 bytes"):
        read_yaml_mapping(p, max_bytes=10)
    p.write_text("")
    assert read_yaml_mapping(p) == {}


def test_yaml_never_constructs_python_objects(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("a: !!python/object/apply:os.system ['echo pwned']\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        read_yaml_mapping(p)


def test_state_paths_resolve_against_the_state_dir(tmp_path):
    paths = StatePaths(database="/abs/ledger.sqlite").resolve(tmp_path)
    assert paths["database"] == Path("/abs/ledger.sqlite")
    assert paths["blobs"] == tmp_path / "blobs"
