"""committed test vectors (tests/protocols/vectors/): they still match the generator, and
they verify with code paths independent of the generator where possible."""

from __future__ import annotations

import base64
import hashlib
import json
import struct
from pathlib import Path

import pytest

VECTORS = Path(__file__).resolve().parent / "vectors"


def _load(name: str):
    return json.loads((VECTORS / name).read_text())


def test_committed_vectors_match_the_generator():
    from tests.protocols.vectors.generate import render

    for name, data in render().items():
        assert (VECTORS / name).read_bytes() == data, (
            f"{name} is stale: run `python -m tests.protocols.vectors.generate` and review the diff"
        )


def test_canonical_json_vectors():
    from protocols.canonical import canonical_json, parse_json_strict

    for case in _load("canonical_json.json")["cases"]:
        if "float_hex" in case:
            x = float.fromhex(case["float_hex"])
            assert canonical_json(x).decode() == case["canonical"]
            assert parse_json_strict(case["canonical"].encode(), max_bytes=400, require_canonical=True) == x
        else:
            want = bytes.fromhex(case["canonical_utf8_hex"])
            assert canonical_json(json.loads(case["json"])) == want
            assert parse_json_strict(want, max_bytes=1000, require_canonical=True) == json.loads(case["json"])


def test_content_digest_vector_by_hand():
    v = _load("content_digest.json")
    leaves = []
    for name in sorted(v["tensors"], key=lambda n: n.encode()):
        t = v["tensors"][name]
        h = json.dumps({"dtype": t["dtype"], "name": name, "shape": t["shape"]},
                       separators=(",", ":"), sort_keys=True).encode()
        leaves.append(b"scarches-fl.tensor.v1\x00" + struct.pack(">Q", len(h)) + h + bytes.fromhex(t["data_le_hex"]))
    from protocols.canonical import canonical_json

    leaves.append(b"scarches-fl.manifest.v1\x00" + canonical_json({k: x for k, x in v["manifest"].items() if k != "digest"}))
    assert [x.hex() for x in leaves] == v["leaves_hex"]
    hashes = [hashlib.sha256(b"\x00" + x).digest() for x in leaves]
    assert [h.hex() for h in hashes] == v["leaf_hashes_hex"]

    def mth(hs):
        if len(hs) == 1:
            return hs[0]
        k = 1 << ((len(hs) - 1).bit_length() - 1)
        return hashlib.sha256(b"\x01" + mth(hs[:k]) + mth(hs[k:])).digest()

    assert "sha256:" + mth(hashes).hex() == v["digest"] == v["manifest"]["digest"]


def test_dsse_vector_with_cryptography_directly():
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    v = _load("dsse.json")
    payload = base64.b64decode(v["payload_b64"])
    ptype = v["payload_type"].encode()
    pae = b"DSSEv1 %d %s %d %s" % (len(ptype), ptype, len(payload), payload)
    assert pae.hex() == v["pae_hex"]
    env = json.loads(v["envelope"])
    assert base64.b64decode(env["payload"]) == payload
    keys = {k["key_id"]: base64.b64decode(k["public_key"].split(":", 1)[1]) for k in v["keys"]}
    for kid, raw in keys.items():
        assert hashlib.sha256(raw).hexdigest() == kid
    assert sorted(s["keyid"] for s in env["signatures"]) == sorted(keys)
    for s in env["signatures"]:
        Ed25519PublicKey.from_public_bytes(keys[s["keyid"]]).verify(base64.b64decode(s["sig"]), pae)


@pytest.fixture(scope="module")
def ledger_vector():
    from protocols.ledger import replay
    from protocols.policy import parse_trust

    v = _load("ledger_attacks.json")
    blobs = {k: bytes.fromhex(x) for k, x in v["blobs_hex"].items()}
    trust = parse_trust(v["trust_json"].encode())
    state = replay(trust, [e.encode("latin-1") for e in v["entries"]], blobs.get)
    return v, state, blobs


def test_ledger_vector_replays(ledger_vector):
    from protocols import merkle

    v, state, _ = ledger_vector
    assert [state.digest_at(n) for n in range(state.size + 1)] == v["versions"]
    assert state.root().hex() == v["root_hex"]
    assert merkle.root([merkle.leaf_hash(e.encode("latin-1")) for e in v["entries"]]).hex() == v["root_hex"]


def test_ledger_vector_accepts_the_next_update(ledger_vector):
    from protocols.ledger import replay
    from protocols.policy import parse_trust

    v, state, blobs = ledger_vector
    nxt = v["accepted_next"]
    env, diff = nxt["envelope"].encode("latin-1"), bytes.fromhex(nxt["diff_hex"])
    state.validate_site_update(env, diff)
    blobs = {**blobs, hashlib.sha256(diff).hexdigest(): diff}
    again = replay(parse_trust(v["trust_json"].encode()),
                   [e.encode("latin-1") for e in v["entries"]] + [env], blobs.get)
    assert again.digest == nxt["digest_after"]


def test_ledger_vector_attacks(ledger_vector):
    from protocols.errors import UpdateRejectedError

    v, state, _ = ledger_vector
    names = set()
    for attack in v["attacks"]:
        with pytest.raises(UpdateRejectedError) as ei:
            state.validate_site_update(attack["envelope"].encode("latin-1"), bytes.fromhex(attack["diff_hex"]))
        assert ei.value.reason_code == attack["reason_code"], attack["name"]
        names.add(attack["name"])
    assert {"forged_signature", "revoked_key", "replayed_update", "frozen_tensor", "nan_in_diff",
            "wrong_shape", "wrong_dtype", "duplicate_json_key", "condition_outside_namespace",
            "condition_path_trick", "oversize_safetensors_header"} <= names
