"""The replay an audit runs (``LedgerState.apply``, the ledger's own rules) gives the apply rule
and the content digest version by version, for any condition axis (0, 1, the middle of 3)."""

from __future__ import annotations

import hashlib

import numpy as np

from protocols.bundle import make_bundle
from protocols.checkpoint import NoteSigner
from protocols.diff import apply_condition_diff
from protocols.ledger import LedgerState, enrol_entry, make_genesis
from protocols.policy import build_trust
from protocols.update import make_update
from tests.protocols._factories import ORIGIN, det_key


def _bundle(rng: np.random.Generator) -> object:
    genes = [f"g{i}" for i in range(30)]
    conds = ["ref/a", "ref/b"]
    tensors = {
        "enc.W_x": rng.standard_normal((6, 30)).astype(np.float32),
        "enc.W_s": rng.standard_normal((6, 2)).astype(np.float32),
        "px_r": rng.standard_normal((2, 30)).astype(np.float32),  # condition axis 0
        "z.W_s": rng.standard_normal((3, 2, 4)).astype(np.float32),  # condition axis 1 of 3
    }
    specs = {
        "enc.W_x": {"role": "frozen", "dtype": "float32", "shape": [6, 30]},
        "enc.W_s": {"role": "condition", "axis": 1, "dtype": "float32", "shape": [6, 2]},
        "px_r": {"role": "condition", "axis": 0, "dtype": "float32", "shape": [2, 30]},
        "z.W_s": {"role": "condition", "axis": 1, "dtype": "float32", "shape": [3, 2, 4]},
    }
    manifest = {
        "format": "scarches-fl.bundle",
        "format_version": 1,
        "model_class": "test",
        "hyperparameters": {"n": 1},
        "genes": genes,
        "conditions": conds,
        "tensors": specs,
        "registration": {},
        "labels": {"note": "ref/a \u00e9\u0001"},
    }
    return make_bundle(manifest, tensors)


def test_replay_matches_apply_condition_diff() -> None:
    rng = np.random.default_rng(7)
    bundle = _bundle(rng)
    operator, site = det_key(1), det_key(10)
    signer = NoteSigner(ORIGIN, bytes([2]) * 32)
    trust = build_trust(
        origin=ORIGIN, log_public_key=signer.verifier.vkey, operator_keys=[operator.public_key()]
    )
    state, blobs = LedgerState(trust), {}
    g = make_genesis(bundle, origin=ORIGIN, operator_keys=[operator])  # type: ignore[arg-type]
    blobs.update(g.blobs)
    state.apply(g.envelope, blobs.get)
    state.apply(
        enrol_entry(
            origin=ORIGIN, site_id="s", public_key=site.public_key(), operator_keys=[operator]
        ),
        blobs.get,
    )
    assert state.digest == bundle.digest  # type: ignore[attr-defined]
    for step in range(40):
        m = 1 + step % 3
        diff = {
            "enc.W_s": rng.standard_normal((6, m)).astype(np.float32),
            "px_r": rng.standard_normal((m, 30)).astype(np.float32),
            "z.W_s": rng.standard_normal((3, m, 4)).astype(np.float32),
        }
        names = [f"s/b{step}_{j}" for j in range(m)]
        u = make_update(
            origin=ORIGIN,
            site_id="s",
            site_key=site,
            sequence=step + 1,
            base_size=state.size,
            base_root=state.root(),
            base_digest=state.digest,
            new_conditions=names,
            diff=diff,
        )
        blobs[hashlib.sha256(u.diff_bytes).hexdigest()] = u.diff_bytes
        state.apply(u.envelope, blobs.get)
        bundle = apply_condition_diff(bundle, diff, names)  # type: ignore[arg-type]
        assert state.known_digest_at(state.size) is None  # an accept hashes nothing
        if step % 7 == 0 or step == 39:
            assert state.digest == bundle.digest  # type: ignore[attr-defined]
            assert state.known_digest_at(state.size) == bundle.digest  # type: ignore[attr-defined]
    full = state.bundle()
    assert full.digest == bundle.digest  # type: ignore[attr-defined]
    for name, arr in bundle.tensors.items():  # type: ignore[attr-defined]
        assert np.array_equal(full.tensors[name], arr)
