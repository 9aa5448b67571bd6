"""Attack: a served reference bundle whose tensors or manifest were modified (a single bit)."""

from __future__ import annotations

import json

import pytest

from protocols.bundle import (
    MANIFEST_FILE,
    MODEL_FILE,
    bundle_from_bytes,
    bundle_to_bytes,
    read_bundle,
    write_bundle,
)
from protocols.canonical import canonical_json
from protocols.errors import DigestMismatchError
from tests.protocols._factories import tiny_bundle


def test_one_bit_in_tensor_data(tmp_path):
    b = tiny_bundle()
    write_bundle(tmp_path / "b", b)
    data = bytearray((tmp_path / "b" / MODEL_FILE).read_bytes())
    data[-1] ^= 1
    (tmp_path / "b" / MODEL_FILE).write_bytes(bytes(data))
    with pytest.raises(DigestMismatchError):
        read_bundle(tmp_path / "b")


def test_manifest_role_flip():
    b = tiny_bundle()
    mbytes, sbytes = bundle_to_bytes(b)
    m = json.loads(mbytes)
    m["labels"] = {"injected": True}
    with pytest.raises(DigestMismatchError):
        bundle_from_bytes(canonical_json(m), sbytes)
    assert MANIFEST_FILE == "manifest.json"
