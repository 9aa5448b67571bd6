"""coordinator.yaml: defaults round-trip, every mistake names the file and the field."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from coordinator.config import CONFIG_FILENAME, CoordinatorConfig, load_config, write_config
from protocols.errors import ConfigError


def _write(tmp_path: Path, doc: object) -> Path:
    (tmp_path / CONFIG_FILENAME).write_text(
        doc if isinstance(doc, str) else yaml.safe_dump(doc), encoding="utf-8"
    )
    return tmp_path


def _good(tmp_path: Path) -> dict:
    cfg = CoordinatorConfig(origin="test.example/log", state_dir=tmp_path)
    write_config(cfg)
    return yaml.safe_load((tmp_path / CONFIG_FILENAME).read_text())


def test_round_trip(tmp_path: Path) -> None:
    cfg = CoordinatorConfig(origin="test.example/log", listen="127.0.0.1:9000", state_dir=tmp_path)
    write_config(cfg)
    loaded = load_config(tmp_path)
    assert loaded == cfg
    assert loaded.path("blobs") == tmp_path / "blobs"


@pytest.mark.parametrize(
    ("mutate", "needle"),
    [
        (lambda d: d.pop("origin"), "origin: required field is missing"),
        (lambda d: d.update(listen="nohost"), "listen"),
        (lambda d: d.update(listen="127.0.0.1:99999"), "listen"),
        (lambda d: d.update(durable="yes"), "durable: must be true or false"),
        (
            lambda d: d["limits"].update(max_diff_bytes=-1),
            "limits.max_diff_bytes: must be a positive integer",
        ),
        (lambda d: d["limits"].update(max_diff_bytes=True), "limits.max_diff_bytes"),
        (lambda d: d["limits"].update(request_deadline_s="soon"), "limits.request_deadline_s"),
        (
            lambda d: d["limits"].update(max_diff_bytes_typo=3),
            "limits.max_diff_bytes_typo: unknown field",
        ),
        (lambda d: d.update(rate_limit=[1, 2]), "rate_limit: expected a mapping"),
        (
            lambda d: d["rate_limit"].update(per_second=0),
            "rate_limit.per_second: must be a positive number",
        ),
        (lambda d: d["tls"].update(certificate=""), "tls.certificate: must be a non-empty string"),
        (lambda d: d.update(extra=1), "extra: unknown field"),
        (
            lambda d: d["limits"].update(max_message_bytes=1024),
            "limits.max_message_bytes: must be at least",
        ),
    ],
)
def test_bad_field_is_named(tmp_path: Path, mutate, needle: str) -> None:
    doc = _good(tmp_path)
    mutate(doc)
    _write(tmp_path, doc)
    with pytest.raises(ConfigError) as err:
        load_config(tmp_path)
    msg = str(err.value)
    assert str(tmp_path / CONFIG_FILENAME) in msg
    assert needle in msg


def test_not_yaml(tmp_path: Path) -> None:
    _write(tmp_path, "origin: [unclosed\n")
    with pytest.raises(ConfigError, match=r"not valid YAML at line"):
        load_config(tmp_path)


def test_not_a_mapping(tmp_path: Path) -> None:
    _write(tmp_path, "- just\n- a list\n")
    with pytest.raises(ConfigError, match="top level: expected a mapping"):
        load_config(tmp_path)


def test_missing_file_says_how_to_create(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="coordinator init"):
        load_config(tmp_path / "nowhere")
