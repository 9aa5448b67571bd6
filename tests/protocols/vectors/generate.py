"""Generate test vectors (canonical JSON, content digest, DSSE, a small ledger with named
attacks). Deterministic: fixed keys, seeds and Ed25519 (deterministic signatures), so the files
are reproducible byte for byte. ``tests/protocols/test_vectors.py`` checks that the committed
files still match this script, and verifies them independently.

    /work/venv/bin/python -m tests.protocols.vectors.generate   # rewrite the files
"""

from __future__ import annotations

import base64
import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent


def _dump(obj: Any) -> bytes:
    return (json.dumps(obj, indent=1, sort_keys=True, ensure_ascii=True) + "\n").encode()


def canonical_vectors() -> dict[str, Any]:
    from protocols.canonical import canonical_json

    floats = [0.0, -0.0, 1.0, -1.5, 0.1, 1e-7, 1e-6, 123456789.125, 1e20, 1e21, 2.0**60,
              5e-324, 1.7976931348623157e308, 333333333.3333333, float(np.float32(0.1))]
    cases = [{"float_hex": x.hex(), "canonical": canonical_json(x).decode()} for x in floats]
    objects = [
        {"b": 1, "a": [True, False, None], "": "empty key"},
        {"\u20ac": "euro", "\r": "cr", "1": "one", "\U0001f600": "emoji", "\u00f6": "o", "\ufb33": "dalet"},
        {"s": "quote\" backslash\\ nl\n tab\t ctl\x01 del\x7f slash/ e\u0301"},
        {"nested": {"z": [1, 2, {"y": []}], "a": {}}},
    ]
    for o in objects:
        cases.append({"json": json.dumps(o, ensure_ascii=True), "canonical_utf8_hex": canonical_json(o).hex()})
    return {"description": "canonical JSON (RFC 8785 subset): float_hex is Python float.hex(); "
                           "json is the value as ASCII JSON, canonical_utf8_hex the expected bytes",
            "cases": cases}


def digest_vector() -> dict[str, Any]:
    from protocols import merkle
    from protocols.bundle import manifest_leaf, tensor_leaf
    from tests.protocols._factories import tiny_bundle

    b = tiny_bundle(n_genes=3, n_cond=2, hidden=2, seed=7)
    names = sorted(b.tensors)
    leaves = [tensor_leaf(n, b.tensors[n]) for n in names] + [manifest_leaf(b.manifest)]
    return {
        "description": "content digest of a tiny bundle: leaves in order (tensors by name, then "
                       "the manifest), their RFC 6962 leaf hashes, and the digest",
        "manifest": b.manifest,
        "tensors": {n: {"dtype": b.tensors[n].dtype.name, "shape": list(b.tensors[n].shape),
                        "data_le_hex": b.tensors[n].astype("<f4").tobytes().hex()} for n in names},
        "leaves_hex": [x.hex() for x in leaves],
        "leaf_hashes_hex": [merkle.leaf_hash(x).hex() for x in leaves],
        "digest": b.digest,
    }


def dsse_vector() -> dict[str, Any]:
    from protocols.dsse import pae, sign_envelope
    from protocols.keys import key_id, public_key_text
    from tests.protocols._factories import det_key

    k1, k2 = det_key(1), det_key(2)
    ptype, payload = "application/vnd.scarches-fl.example+json", b'{"hello":"world"}'
    env = sign_envelope(ptype, payload, [k1, k2])
    return {
        "description": "DSSE v1 with two Ed25519 keys (private key = 32 bytes of the seed byte)",
        "keys": [{"seed_hex": (bytes([n]) * 32).hex(), "public_key": public_key_text(k),
                  "key_id": key_id(k)} for n, k in ((1, k1), (2, k2))],
        "payload_type": ptype,
        "payload_b64": base64.b64encode(payload).decode(),
        "pae_hex": pae(ptype, payload).hex(),
        "envelope": env.decode(),
    }


def ledger_vector() -> dict[str, Any]:
    """A ledger (genesis, two enrolments, two updates, a revocation) and attacks against its
    final state, each with the reason code every implementation must answer."""
    import numpy as np

    from protocols.canonical import canonical_json
    from protocols.diff import diff_to_bytes
    from protocols.dsse import sign_envelope
    from protocols.ledger import revoke_entry
    from protocols.update import SITE_UPDATE_TYPE
    from tests.protocols._factories import consortium, det_key, tiny_diff

    c = consortium(n_genes=3, n_cond=2, hidden=2, seed=7)
    c.enrol("site-a", det_key(10))
    c.enrol("site-b", det_key(11))
    ua = c.update("site-a", sequence=1, seed=21)
    c.submit(ua)
    c.submit(c.update("site-b", sequence=1, seed=22))
    c.append(revoke_entry(origin=c.trust.origin, site_id="site-b", operator_keys=[c.operator]))

    def forge(payload_obj, key=None, diff_bytes=None):
        return sign_envelope(SITE_UPDATE_TYPE, canonical_json(payload_obj), [key or c.site_keys["site-a"]]), diff_bytes

    attacks: list[dict[str, Any]] = []

    def add(name, envelope, diff_bytes, code):
        attacks.append({"name": name, "envelope": envelope.decode("latin-1"),
                        "diff_hex": diff_bytes.hex(), "reason_code": code})

    good = c.update("site-a", sequence=2, seed=23)
    add("replayed_update", ua.envelope, ua.diff_bytes, "E_SEQUENCE_REPLAY")
    env = json.loads(good.envelope)
    env["payload"] = base64.b64encode(base64.b64decode(env["payload"]).replace(b"site-a/b23_0", b"site-a/b99_0")).decode()
    add("forged_signature", canonical_json(env), good.diff_bytes, "E_SIG_INVALID")
    rb = c.update("site-b", sequence=2, seed=24)
    add("revoked_key", rb.envelope, rb.diff_bytes, "E_KEY_REVOKED")
    u = c.update("site-a", sequence=2, seed=25, names=["site-b/stolen"])
    add("condition_outside_namespace", u.envelope, u.diff_bytes, "E_CONDITION_NAMESPACE")
    u = c.update("site-a", sequence=2, seed=26, names=["site-a/../x"])
    add("condition_path_trick", u.envelope, u.diff_bytes, "E_CONDITION_NAME")
    d = tiny_diff(c.state.bundle(), seed=27)
    d["encoder.W_x"] = np.zeros((2, 1), np.float32)
    u = c.update("site-a", sequence=2, diff=d)
    add("frozen_tensor", u.envelope, u.diff_bytes, "E_TENSOR_FROZEN")
    d = tiny_diff(c.state.bundle(), seed=28)
    d["px_r"] = d["px_r"].astype(np.float64)
    u = c.update("site-a", sequence=2, diff=d)
    add("wrong_dtype", u.envelope, u.diff_bytes, "E_TENSOR_DTYPE")
    d = tiny_diff(c.state.bundle(), m=2, seed=29)
    u = c.update("site-a", sequence=2, diff=d, names=["site-a/one"])
    add("wrong_shape", u.envelope, u.diff_bytes, "E_TENSOR_SHAPE")
    d = tiny_diff(c.state.bundle(), seed=30)
    d["encoder.W_s"][0, 0] = np.nan
    bad = diff_to_bytes(d)
    p = json.loads(good.payload.to_bytes())
    p["diff"].update(sha256=hashlib.sha256(bad).hexdigest(), size=len(bad))
    add("nan_in_diff", *forge(p, diff_bytes=bad), "E_NONFINITE")
    raw = good.payload.to_bytes().replace(b'"kind":"site_update"', b'"kind":"site_update","kind":"x"')
    add("duplicate_json_key", sign_envelope(SITE_UPDATE_TYPE, raw, [c.site_keys["site-a"]]), good.diff_bytes,
        "E_PAYLOAD_MALFORMED")
    hdr = b"\x00\x00\x00\x00\x00\x01\x00\x00{}"
    p = json.loads(good.payload.to_bytes())
    p["diff"].update(sha256=hashlib.sha256(hdr).hexdigest(), size=len(hdr))
    add("oversize_safetensors_header", *forge(p, diff_bytes=hdr), "E_SAFETENSORS_HEADER_OVERSIZE")
    add("unknown_key", c.update("site-a", sequence=2, seed=31, key=det_key(90)).envelope, good.diff_bytes,
        "E_KEY_UNKNOWN")
    return {
        "description": "a ledger and attacks against its final state; blobs by sha256; "
                       "versions[N] is the digest of reference version N (null for 0); envelopes "
                       "are the exact bytes (latin-1 decoded to keep them verbatim)",
        "trust_json": c.trust.to_json().decode(),
        "entries": [e.decode("latin-1") for e in c.entries],
        "blobs_hex": {k: v.hex() for k, v in sorted(c.blobs.items())},
        "versions": [c.state.digest_at(n) for n in range(c.state.size + 1)],
        "root_hex": c.state.root().hex(),
        "accepted_next": {"envelope": good.envelope.decode("latin-1"), "diff_hex": good.diff_bytes.hex(),
                          "digest_after": _digest_after(c, good)},
        "attacks": attacks,
    }


def _digest_after(c, signed) -> str:
    from protocols.diff import apply_condition_diff, diff_from_bytes

    return apply_condition_diff(c.state.bundle(), diff_from_bytes(signed.diff_bytes),
                                list(signed.payload.new_conditions)).digest


VECTORS = {
    "canonical_json.json": canonical_vectors,
    "content_digest.json": digest_vector,
    "dsse.json": dsse_vector,
    "ledger_attacks.json": ledger_vector,
}


def render() -> dict[str, bytes]:
    return {name: _dump(fn()) for name, fn in VECTORS.items()}


def main() -> None:
    for name, data in render().items():
        (HERE / name).write_bytes(data)
        print(f"wrote {HERE / name} ({len(data)} bytes)")


if __name__ == "__main__":
    main()
