"""Small bundles, keys and updates for the protocols tests (tiny, seeded, fast)."""

from __future__ import annotations

import numpy as np

from protocols.bundle import BUNDLE_FORMAT, BUNDLE_FORMAT_VERSION, ReferenceBundle, make_bundle


def tiny_manifest_and_tensors(
    n_genes: int = 4, n_cond: int = 2, hidden: int = 3, seed: int = 0
) -> tuple[dict, dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    conditions = [f"ref/study{i}" for i in range(n_cond)]
    tensors = {
        "encoder.W_x": rng.normal(size=(hidden, n_genes)).astype(np.float32),
        "encoder.W_s": rng.normal(size=(hidden, n_cond)).astype(np.float32),
        "decoder.W_s": rng.normal(size=(hidden, n_cond)).astype(np.float32),
        "decoder.bias": rng.normal(size=(hidden,)).astype(np.float32),
        "px_r": rng.normal(size=(n_genes, n_cond)).astype(np.float32),
    }
    spec = {
        "encoder.W_x": {"role": "frozen"},
        "encoder.W_s": {"role": "condition", "axis": 1},
        "decoder.W_s": {"role": "condition", "axis": 1},
        "decoder.bias": {"role": "frozen"},
        "px_r": {"role": "condition", "axis": 1},
    }
    for name, arr in tensors.items():
        spec[name].update({"dtype": "float32", "shape": list(arr.shape)})
    manifest = {
        "format": BUNDLE_FORMAT,
        "format_version": BUNDLE_FORMAT_VERSION,
        "model_class": "scarches_fl.CVAE",
        "hyperparameters": {"likelihood": "nb", "n_hidden": hidden, "dropout": 0.1},
        "genes": [f"G{i}" for i in range(n_genes)],
        "conditions": conditions,
        "tensors": spec,
        "registration": {"batch_key": "batch"},
        "labels": {},
    }
    return manifest, tensors


def tiny_bundle(**kw) -> ReferenceBundle:
    manifest, tensors = tiny_manifest_and_tensors(**kw)
    return make_bundle(manifest, tensors)


def tiny_diff(base: ReferenceBundle, m: int = 1, seed: int = 1) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    out = {}
    for name, spec in base.manifest["tensors"].items():
        if spec["role"] == "condition":
            shape = list(spec["shape"])
            shape[spec["axis"]] = m
            out[name] = rng.normal(size=shape).astype(np.float32)
    return out


# --- a small consortium: keys, trust, a ledger with a genesis -------------------------------

from dataclasses import dataclass, field  # noqa: E402

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey  # noqa: E402

ORIGIN = "test.scarches-fl/log"


def det_key(n: int) -> Ed25519PrivateKey:
    """A deterministic Ed25519 key (tests only)."""
    return Ed25519PrivateKey.from_private_bytes(bytes([n]) * 32)


@dataclass
class Consortium:
    """An operator, a log key, a ledger state with a genesis, a blob store, and site keys."""

    operator: Ed25519PrivateKey
    log_signer: object
    trust: object
    state: object
    base: ReferenceBundle
    blobs: dict = field(default_factory=dict)
    entries: list = field(default_factory=list)
    site_keys: dict = field(default_factory=dict)

    def lookup(self, sha: str):
        return self.blobs.get(sha)

    def append(self, envelope: bytes, blobs: dict | None = None):
        self.blobs.update(blobs or {})
        applied = self.state.apply(envelope, self.lookup)
        self.entries.append(envelope)
        return applied

    def enrol(self, site_id: str, key: Ed25519PrivateKey):
        from protocols.ledger import enrol_entry

        self.site_keys[site_id] = key
        return self.append(
            enrol_entry(origin=ORIGIN, site_id=site_id, public_key=key.public_key(), operator_keys=[self.operator])
        )

    def update(self, site_id: str, *, sequence: int = 1, m: int = 1, seed: int = 1, key=None,
               names=None, diff=None, base_size=None):
        from protocols.update import make_update

        st = self.state
        size = st.size if base_size is None else base_size
        diff = diff if diff is not None else tiny_diff(st.bundle(), m=m, seed=seed)
        return make_update(
            origin=ORIGIN, site_id=site_id, site_key=key or self.site_keys[site_id],
            sequence=sequence, base_size=size, base_root=st.root_at(size),
            base_digest=st.digest_at(size),
            new_conditions=names or [f"{site_id}/b{seed}_{i}" for i in range(m)], diff=diff,
        )

    def submit(self, signed):
        import hashlib

        return self.append(signed.envelope, {hashlib.sha256(signed.diff_bytes).hexdigest(): signed.diff_bytes})


def consortium(**bundle_kw) -> Consortium:
    from protocols.checkpoint import NoteSigner
    from protocols.ledger import LedgerState, make_genesis
    from protocols.policy import build_trust

    operator = det_key(1)
    log_signer = NoteSigner(ORIGIN, bytes([2]) * 32)
    trust = build_trust(origin=ORIGIN, log_public_key=log_signer.verifier.vkey, operator_keys=[operator.public_key()])
    base = tiny_bundle(**bundle_kw)
    c = Consortium(operator, log_signer, trust, LedgerState(trust), base)
    g = make_genesis(base, origin=ORIGIN, operator_keys=[operator])
    c.append(g.envelope, g.blobs)
    return c


def assert_rejected(c: Consortium, envelope: bytes, diff_bytes: bytes, code: str) -> None:
    """The coordinator's check, the ledger append and an auditor's replay all refuse the update
    with ``code``, and the state is unchanged."""
    import hashlib

    import pytest

    from protocols.errors import VerificationError
    from protocols.ledger import replay

    with pytest.raises(VerificationError) as ei:
        c.state.validate_site_update(envelope, diff_bytes)
    assert ei.value.reason_code == code, ei.value
    size, root = c.state.size, c.state.root()
    blobs = dict(c.blobs)
    blobs[hashlib.sha256(diff_bytes).hexdigest()] = diff_bytes
    with pytest.raises(VerificationError) as ei:
        c.state.apply(envelope, blobs.get)
    assert ei.value.reason_code == code, ei.value
    assert (c.state.size, c.state.root()) == (size, root)
    with pytest.raises(VerificationError) as ei:
        replay(c.trust, [*c.entries, envelope], blobs.get)
    assert ei.value.reason_code == code, ei.value


def resign_payload(c: Consortium, payload_obj: dict, site_id: str = "site-a") -> bytes:
    """A site update envelope over an arbitrary (attacker-chosen) payload, signed by the site."""
    from protocols.canonical import canonical_json
    from protocols.dsse import sign_envelope
    from protocols.update import SITE_UPDATE_TYPE

    return sign_envelope(SITE_UPDATE_TYPE, canonical_json(payload_obj), [c.site_keys[site_id]])


def enrolled(*sites: str) -> Consortium:
    c = consortium()
    for i, s in enumerate(sites or ("site-a",)):
        c.enrol(s, det_key(10 + i))
    return c


def assert_same_state(a, b) -> None:
    """Two :class:`protocols.ledger.LedgerState` objects hold the same replayed ledger: size,
    root, sequences, kinds, policy, every version's digest, the conditions and the head model."""
    assert (a.size, a.root(), a.sequences, a.kinds, a.policy) == (
        b.size,
        b.root(),
        b.sequences,
        b.kinds,
        b.policy,
    )
    assert [a.digest_at(n) for n in range(a.size + 1)] == [b.digest_at(n) for n in range(b.size + 1)]
    assert a.conditions == b.conditions
    assert a.bundle().digest == b.bundle().digest
