"""Bundles: content digest, atomic writes, strict reading, safetensors header checks."""

from __future__ import annotations

import copy
import hashlib
import json
import struct

import numpy as np
import pytest

from protocols import merkle
from protocols.bundle import (
    MANIFEST_FILE,
    MODEL_FILE,
    bundle_from_bytes,
    bundle_to_bytes,
    content_digest,
    make_bundle,
    parse_safetensors_header,
    read_bundle,
    write_bundle,
)
from protocols.canonical import canonical_json
from protocols.errors import BundleError, DigestMismatchError, SafetensorsFormatError
from protocols.limits import Limits
from tests.protocols._factories import tiny_bundle, tiny_manifest_and_tensors


def test_digest_definition_by_hand():
    """Recompute the digest from the spec in docs/protocol.md, independently of bundle.py."""
    b = tiny_bundle()
    leaves = []
    for name in sorted(b.tensors):
        arr = b.tensors[name]
        h = json.dumps(
            {"dtype": "float32", "name": name, "shape": list(arr.shape)}, separators=(",", ":"), sort_keys=True
        ).encode()
        leaves.append(b"scarches-fl.tensor.v1\x00" + struct.pack(">Q", len(h)) + h + arr.astype("<f4").tobytes())
    body = {k: v for k, v in b.manifest.items() if k != "digest"}
    leaves.append(b"scarches-fl.manifest.v1\x00" + canonical_json(body))

    def mth(items):
        if len(items) == 1:
            return hashlib.sha256(b"\x00" + items[0]).digest()
        k = 1 << ((len(items) - 1).bit_length() - 1)
        return hashlib.sha256(b"\x01" + mth(items[:k]) + mth(items[k:])).digest()

    assert b.digest == "sha256:" + mth(leaves).hex()
    assert b.digest == "sha256:" + merkle.root([merkle.leaf_hash(x) for x in leaves]).hex()


def test_digest_ignores_tensor_insertion_order_and_digest_field():
    manifest, tensors = tiny_manifest_and_tensors()
    rev = dict(reversed(list(tensors.items())))
    d1 = content_digest(manifest, tensors)
    d2 = content_digest({**manifest, "digest": "sha256:00"}, rev)
    assert d1 == d2 == make_bundle(manifest, rev).digest


def test_digest_changes_with_any_bit():
    manifest, tensors = tiny_manifest_and_tensors()
    d = content_digest(manifest, tensors)
    t2 = dict(tensors)
    a = t2["encoder.W_x"].copy()
    a.view(np.uint32)[0, 0] ^= 1
    t2["encoder.W_x"] = a
    assert content_digest(manifest, t2) != d
    m2 = copy.deepcopy(manifest)
    m2["genes"][0] = "G0x"
    assert content_digest(m2, tensors) != d


def test_big_endian_input_is_normalized():
    manifest, tensors = tiny_manifest_and_tensors()
    be = {k: v.astype(">f4") for k, v in tensors.items()}
    assert make_bundle(manifest, be).digest == make_bundle(manifest, tensors).digest


def test_tensors_are_read_only():
    b = tiny_bundle()
    with pytest.raises(ValueError):
        b.tensors["encoder.W_x"][0, 0] = 1.0


def test_write_read_roundtrip(tmp_path):
    b = tiny_bundle()
    write_bundle(tmp_path / "ref", b)
    assert sorted(p.name for p in (tmp_path / "ref").iterdir()) == [MANIFEST_FILE, MODEL_FILE]
    r = read_bundle(tmp_path / "ref")
    assert r.digest == b.digest and r.manifest == b.manifest
    for k in b.tensors:
        assert np.array_equal(r.tensors[k], b.tensors[k])
    assert (tmp_path / "ref" / MANIFEST_FILE).read_bytes() == canonical_json(b.manifest)


def test_read_detects_tampering(tmp_path):
    b = tiny_bundle()
    write_bundle(tmp_path / "ref", b)
    mpath = tmp_path / "ref" / MANIFEST_FILE
    m = json.loads(mpath.read_bytes())
    m["hyperparameters"]["n_hidden"] = 99
    mpath.write_bytes(canonical_json(m))
    with pytest.raises(DigestMismatchError, match="modified or corrupted after it was written"):
        read_bundle(tmp_path / "ref")
    assert read_bundle(tmp_path / "ref", verify=False).manifest["hyperparameters"]["n_hidden"] == 99


def test_read_missing(tmp_path):
    with pytest.raises(BundleError, match="not a directory"):
        read_bundle(tmp_path / "nope")
    (tmp_path / "x").mkdir()
    with pytest.raises(BundleError, match="does not exist"):
        read_bundle(tmp_path / "x")


@pytest.mark.parametrize(
    "mutate",
    [
        lambda m: m.pop("genes"),
        lambda m: m.update(extra=1),
        lambda m: m.update(format="other"),
        lambda m: m.update(format_version=2),
        lambda m: m["genes"].append("G0"),
        lambda m: m["conditions"].append("Bad/Name"),
        lambda m: m["tensors"]["encoder.W_s"].update(axis=5),
        lambda m: m["tensors"]["encoder.W_s"].update(shape=[3, 3]),
        lambda m: m["tensors"]["encoder.W_x"].update(dtype="float64"),
        lambda m: m["tensors"]["encoder.W_x"].update(role="trainable"),
        lambda m: m["tensors"].pop("px_r"),
        lambda m: m["tensors"]["encoder.W_x"].update(axis=0),
    ],
)
def test_manifest_validation(mutate):
    manifest, tensors = tiny_manifest_and_tensors()
    mutate(manifest)
    with pytest.raises(BundleError):
        make_bundle(manifest, tensors)


def test_condition_count_must_match_axis():
    manifest, tensors = tiny_manifest_and_tensors()
    manifest["conditions"].append("ref/extra")
    with pytest.raises(BundleError, match="conditions"):
        make_bundle(manifest, tensors)


def _st(header: dict, data: bytes, pad: bytes = b"") -> bytes:
    h = json.dumps(header).encode() + pad
    return struct.pack("<Q", len(h)) + h + data


def test_safetensors_header_accepts_library_output():
    _, model = bundle_to_bytes(tiny_bundle())
    entries, meta = parse_safetensors_header(model)
    assert set(entries) == set(tiny_bundle().tensors)


@pytest.mark.parametrize(
    ("blob", "code"),
    [
        (b"\x00" * 4, "E_SAFETENSORS_MALFORMED"),
        (struct.pack("<Q", 10**9) + b"{}", "E_SAFETENSORS_HEADER_OVERSIZE"),
        (struct.pack("<Q", 100) + b"{}", "E_SAFETENSORS_MALFORMED"),
        (_st({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, b"\x00" * 4), "E_SAFETENSORS_MALFORMED"),
        (_st({"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}, b"\x00" * 8), "E_SAFETENSORS_MALFORMED"),
        (_st({"a": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}, b"\x00" * 8), "E_SAFETENSORS_MALFORMED"),
        (_st({"a": {"dtype": "BF16", "shape": [1], "data_offsets": [0, 2]}}, b"\x00" * 2), "E_DTYPE_NOT_ALLOWED"),
        (_st({"a": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}}, b"\x00" * 4), "E_SAFETENSORS_MALFORMED"),
        (_st({"a": {"dtype": "F32", "shape": [1] * 9, "data_offsets": [0, 4]}}, b"\x00" * 4), "E_SAFETENSORS_MALFORMED"),
        (_st({"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4], "x": 1}}, b"\x00" * 4), "E_SAFETENSORS_MALFORMED"),
        (_st({"__metadata__": {"a": 1}}, b""), "E_SAFETENSORS_MALFORMED"),
        (_st([], b""), "E_SAFETENSORS_MALFORMED"),
        (_st({}, b"", pad=b', "a": 1}'), "E_SAFETENSORS_MALFORMED"),
        (
            _st({"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]},
                 "b": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}, b"\x00" * 4),
            "E_SAFETENSORS_MALFORMED",
        ),
    ],
)
def test_safetensors_header_rejections(blob, code):
    with pytest.raises(SafetensorsFormatError) as ei:
        parse_safetensors_header(blob, limits=Limits())
    assert ei.value.reason_code == code


def test_bundle_from_bytes_rejects_other_tensors():
    b = tiny_bundle()
    mbytes, model = bundle_to_bytes(b)
    other, _ = tiny_manifest_and_tensors(n_genes=5)
    _, other_model = bundle_to_bytes(make_bundle(other, tiny_manifest_and_tensors(n_genes=5)[1]))
    with pytest.raises(BundleError):
        bundle_from_bytes(mbytes, other_model)
    assert bundle_from_bytes(mbytes, model).digest == b.digest
