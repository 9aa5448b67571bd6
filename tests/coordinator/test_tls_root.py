"""The client pins the coordinator's certificate from whatever form of trust it is handed."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from protocols.errors import ConfigError
from protocols.registry_client import load_tls_root

PEM = b"-----BEGIN CERTIFICATE-----\nMIIBfake\n-----END CERTIFICATE-----\n"


def _trust(tmp_path: Path) -> Path:
    path = tmp_path / "trust.json"
    path.write_text(json.dumps({"origin": "o", "tls_root_pem": PEM.decode()}))
    return path


def test_trust_json_path_gives_only_the_certificate(tmp_path: Path) -> None:
    # regression: a trust.json contains the PEM marker, and was once returned whole
    assert load_tls_root(_trust(tmp_path)) == PEM
    assert load_tls_root(str(_trust(tmp_path))) == PEM


def test_trust_json_text_and_mapping(tmp_path: Path) -> None:
    text = _trust(tmp_path).read_text()
    assert load_tls_root(text) == PEM
    assert load_tls_root(text.encode()) == PEM
    assert load_tls_root(json.loads(text)) == PEM


def test_pem_file_and_pem_bytes(tmp_path: Path) -> None:
    pem_file = tmp_path / "ca.pem"
    pem_file.write_bytes(PEM)
    assert load_tls_root(pem_file) == PEM
    assert load_tls_root(PEM) == PEM


def test_trust_without_certificate_says_what_to_do(tmp_path: Path) -> None:
    path = tmp_path / "trust.json"
    path.write_text(json.dumps({"origin": "o"}))
    with pytest.raises(ConfigError, match="tls_root_pem"):
        load_tls_root(path)
    with pytest.raises(ConfigError, match="cannot read"):
        load_tls_root(tmp_path / "missing.json")
