"""Generate a coordinator state directory holding a ledger of N signed site updates.

The ledger is built with the project's own code only: bundle, update, policy and ledger
builders sign every entry (operator key for the genesis and the enrolments, each site's key for
its updates), checkpoint code signs a checkpoint per entry with the log key, and the coordinator's
storage layer (``coordinator.storage``: SQLite + content-addressed blobs) stores it, exactly as
a coordinator would. The model is a tiny numpy bundle (no torch): frozen weights plus two
condition tensors, one column per condition. Sites map on a "published" reference version that
advances every ``--base-every`` entries, as sites polling a coordinator would.

The served model is materialised the way the coordinator's reference cache does
(``cache/v<i>/manifest.json``, ``model.safetensors``, ``digest``), so an offline audit checks it.

Usage::

    python benchmarks/gen_ledger.py --out /tmp/ledger-1000 --updates 1000
    scarches-fl audit --ledger /tmp/ledger-1000 --trust /tmp/ledger-1000/trust.json

Options for tamper fixtures (tests/audit): ``revoke`` a site before some of its updates (they
are still logged: a coordinator that ignores revocations), and reuse the keys of another ledger
(a history re-signed by the same log key: a fork).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

ORIGIN = "bench.scarches-fl.local/ledger"


@dataclass
class LedgerKeys:
    """Every private key of a generated ledger (so a second, forked one can reuse them)."""

    log_signer: Any
    operator: Any
    sites: dict[str, Any] = field(default_factory=dict)


@dataclass
class GeneratedLedger:
    state_dir: Path
    trust_path: Path
    keys: LedgerKeys
    size: int
    update_indices: list[int]
    policy_indices: list[int]
    served_digest: str
    seconds: float


def new_keys(n_sites: int, origin: str = ORIGIN) -> LedgerKeys:
    from protocols.checkpoint import generate_signer
    from protocols.keys import generate_private_key

    keys = LedgerKeys(generate_signer(origin), generate_private_key())
    for i in range(n_sites):
        keys.sites[f"site{i:03d}"] = generate_private_key()
    return keys


def genesis_bundle(
    *, n_genes: int = 200, hidden: int = 128, n_latent: int = 10, seed: int = 0,
    with_labels: bool = False,
) -> Any:
    """A small reference: frozen encoder/decoder weights and two condition tensors; with
    ``with_labels``, label knowledge of two types (level ``cell_type``) that contributions can
    extend."""
    from protocols.bundle import BUNDLE_FORMAT, BUNDLE_FORMAT_VERSION, make_bundle

    rng = np.random.default_rng(seed)
    conds = ["ref/study_a", "ref/study_b"]
    f32 = np.float32
    tensors = {
        "encoder.W_x": (rng.standard_normal((hidden, n_genes)) * 0.05).astype(f32),
        "encoder.W_s": (rng.standard_normal((hidden, len(conds))) * 0.05).astype(f32),
        "encoder.b": np.zeros(hidden, f32),
        "encoder.mu.W": (rng.standard_normal((n_latent, hidden)) * 0.05).astype(f32),
        "decoder.W_z": (rng.standard_normal((hidden, n_latent)) * 0.05).astype(f32),
        "decoder.W_s": (rng.standard_normal((hidden, len(conds))) * 0.05).astype(f32),
        "decoder.out.W": (rng.standard_normal((n_genes, hidden)) * 0.05).astype(f32),
        "px_r": np.ones(n_genes, f32),
    }
    specs: dict[str, Any] = {}
    for name, arr in tensors.items():
        spec: dict[str, Any] = {"role": "frozen", "dtype": "float32", "shape": list(arr.shape)}
        if name.endswith(".W_s"):
            spec = {"role": "condition", "axis": 1, "dtype": "float32", "shape": list(arr.shape)}
        specs[name] = spec
    manifest = {
        "format": BUNDLE_FORMAT,
        "format_version": BUNDLE_FORMAT_VERSION,
        "model_class": "scarches_fl.CVAE",
        "hyperparameters": {"likelihood": "nb", "n_hidden": hidden, "n_latent": n_latent},
        "genes": [f"GENE{i:05d}" for i in range(n_genes)],
        "conditions": conds,
        "tensors": specs,
        "registration": {"batch_key": "batch"},
        "labels": _labels(n_latent) if with_labels else {},
    }
    return make_bundle(manifest, tensors)


class _GrowingModel:
    """The generator's own copy of the model: the bundle it started from plus the appended
    condition slices (kept as chunks), rebuilt with ``make_bundle`` when a digest is needed
    (once per published version). Independent of the ledger code it generates input for."""

    def __init__(self, bundle: Any) -> None:
        self.manifest = {k: v for k, v in bundle.manifest.items() if k != "digest"}
        specs = self.manifest["tensors"]
        self.frozen = {n: a for n, a in bundle.tensors.items() if specs[n]["role"] != "condition"}
        self.chunks = {n: [a] for n, a in bundle.tensors.items() if specs[n]["role"] == "condition"}
        self.conditions = list(self.manifest["conditions"])
        self._bundle: Any = bundle

    def apply(self, diff: dict[str, np.ndarray], names: Sequence[str]) -> None:
        for name, chunks in self.chunks.items():
            chunks.append(np.asarray(diff[name]))
        self.conditions.extend(names)
        self._bundle = None

    def bundle(self) -> Any:
        from protocols.bundle import make_bundle

        if self._bundle is None:
            tensors = dict(self.frozen)
            specs = {}
            for name, spec in self.manifest["tensors"].items():
                specs[name] = dict(spec)
                if name in self.chunks:
                    tensors[name] = np.concatenate(self.chunks[name], axis=int(spec["axis"]))
                    specs[name]["shape"] = list(tensors[name].shape)
            manifest = {**self.manifest, "conditions": list(self.conditions), "tensors": specs}
            self._bundle = make_bundle(manifest, tensors)
        return self._bundle

    def digest(self) -> str:
        return str(self.bundle().digest)


def _labels(n_latent: int) -> dict[str, Any]:
    protos = [
        {"label": c, "mean": [float(i)] * n_latent, "std": [1.0] * n_latent, "weight": 1.0,
         "n_cells": 100}
        for i, c in enumerate(["alpha", "beta"])
    ]
    return {
        "schema": "scarches-fl.labels", "schema_version": 1, "unknown_label": "Unknown",
        "n_latent": n_latent, "novelty_tail": 0.05, "knowledge": ["prototypes"],
        "atlas": {"included": False},
        # the expression subspace's description (its tensors are not needed to validate or
        # replay contributions: only the number of components)
        "expression": {"n_components": N_EXPRESSION},
        "levels": {"cell_type": {"index": 0, "prototype": {
            "min_cells": 20, "classes": ["alpha", "beta"], "cell_counts": [100, 100],
            "prototypes": protos, "shared_covariance": np.eye(n_latent).tolist(),
            "class_prior": [0.5, 0.5],
            "calibration": {"temperature": 1.0, "novelty_quantiles": [0.0, 1.0, 9.0]},
        }, "expression": {"classes": ["alpha", "beta"], "cell_counts": [100, 100]}}},
    }


#: components of the generated references' expression subspace
N_EXPRESSION = 4


def label_contribution(
    keys: LedgerKeys, site_id: str, *, sequence: int, base_size: int, base_root: bytes,
    base_digest: str, n_latent: int, seed: int, origin: str = ORIGIN, expression: bool = False,
) -> bytes:
    """A signed label contribution of one new type (``gamma``, 40 cells) by ``site_id``; with
    ``expression``, its prototype also carries an expression part (format version 2)."""
    from protocols.keys import key_id
    from protocols.labels import build_contribution_payload, sign_contribution

    rng = np.random.default_rng(seed)
    proto: dict[str, Any] = {"name": "gamma", "count": 40, "mean": rng.standard_normal(n_latent),
                             "std": np.ones(n_latent), "sigma": 0.0}
    if expression:
        proto["expression"] = {"mean": rng.standard_normal(N_EXPRESSION),
                               "std": np.ones(N_EXPRESSION), "sigma": 0.0}
    payload = build_contribution_payload(
        origin=origin, site_id=site_id, site_key_id=key_id(keys.sites[site_id]), sequence=sequence,
        base_size=base_size, base_root=base_root, base_digest=base_digest, label_key="cell_type",
        prototypes=[proto],
    )
    return sign_contribution(payload, keys.sites[site_id])


def build_ledger(
    out: str | Path,
    *,
    n_updates: int,
    n_sites: int = 10,
    base_every: int = 50,
    seed: int = 0,
    keys: LedgerKeys | None = None,
    revoke: tuple[str, int] | None = None,
    n_genes: int = 200,
    hidden: int = 128,
    materialize: bool = True,
    origin: str = ORIGIN,
    witness_keys: Sequence[str] = (),
    witnesses_required: int = 0,
    federated_round_at: int | None = None,
    wrong_base_digest_at: int | None = None,
    replayed_sequence_at: int | None = None,
    label_contributions: int = 0,
    expression_contributions: bool = False,
    genesis_seed: int = 0,
    extra_entries: Sequence[tuple[str, bytes]] = (),
) -> GeneratedLedger:
    """Write a coordinator state directory with a genesis, ``n_sites`` enrolments and
    ``n_updates`` site updates (one new condition each) into ``out``.

    ``revoke=(site_id, u)``: a revoke entry for ``site_id`` right before update number ``u``;
    that site's later updates are logged anyway (signed by the revoked key).
    ``federated_round_at=u``: a ``federated_round`` entry right before update ``u`` whose
    aggregate changes the frozen weights (sites then map on the round's version).
    ``wrong_base_digest_at=u``: update ``u`` states a base digest that is not the replay's
    (a coordinator that accepted it anyway).
    ``replayed_sequence_at=u``: update ``u`` reuses its site's previous sequence number.
    ``label_contributions=n``: a labelled genesis and ``n`` label contributions right after the
    enrolments (with ``expression_contributions``, each with an expression part).
    ``extra_entries``: ``(kind, envelope)`` appended as they are at the end (a
    coordinator that logged them anyway)."""
    from coordinator.storage import BlobStore, LedgerStore
    from protocols import merkle
    from protocols.bundle import bundle_to_bytes, make_bundle
    from protocols.checkpoint import Checkpoint, sign_checkpoint
    from protocols.diff import diff_from_bytes
    from protocols.ledger import enrol_entry, make_federated_round, make_genesis, revoke_entry
    from protocols.policy import build_trust, write_trust
    from protocols.proto.serde import BlobRef
    from protocols.update import make_update

    t0 = time.perf_counter()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if (out / "ledger.sqlite").exists():
        raise SystemExit(f"{out} already holds a ledger; pick an empty directory")
    rng = np.random.default_rng(seed)
    keys = keys or new_keys(n_sites, origin)
    site_ids = sorted(keys.sites)[:n_sites]
    trust = build_trust(
        origin=origin,
        log_public_key=keys.log_signer.verifier.vkey,
        operator_keys=[keys.operator.public_key()],
        witness_keys=witness_keys,
        witnesses_required=witnesses_required,
    )
    trust_path = out / "trust.json"
    write_trust(trust_path, trust)

    blobs = BlobStore(out / "blobs", durable=False)
    store = LedgerStore(out / "ledger.sqlite", blobs, durable=False)

    def sign_cp(size: int, root: bytes) -> bytes:
        return sign_checkpoint(Checkpoint(origin, size, root), keys.log_signer)

    genesis = genesis_bundle(n_genes=n_genes, hidden=hidden, seed=genesis_seed,
                             with_labels=label_contributions > 0)
    replay = _GrowingModel(genesis)
    tree = merkle.MerkleTree()
    digests: dict[int, str] = {}
    update_indices: list[int] = []
    policy_indices: list[int] = []
    last_model_index = 0

    def put(w: Any, envelope: bytes, kind: str, *, site_id: str | None = None,
            sequence: int | None = None, blob_list: Sequence[tuple[str, bytes]] = ()) -> int:
        refs = []
        for role, data in blob_list:
            name = blobs.put(data)
            refs.append(BlobRef(role=role, sha256=name, size=len(data)))
        entry, _ = w.append(envelope, kind=kind, sign_checkpoint=sign_cp, site_id=site_id,
                            sequence=sequence, blobs=refs)
        tree.append(merkle.leaf_hash(envelope))
        return int(entry.index)

    with store.writer() as w:
        g = make_genesis(genesis, origin=origin, operator_keys=[keys.operator], note="bench")
        put(w, g.envelope, "genesis", blob_list=[("manifest", g.manifest_bytes),
                                                  ("safetensors", g.safetensors_bytes)])
        digests[1] = genesis.digest
        for sid in site_ids:
            env = enrol_entry(origin=origin, site_id=sid, public_key=keys.sites[sid].public_key(),
                              operator_keys=[keys.operator])
            policy_indices.append(put(w, env, "policy", site_id=sid))
        published = tree.size
        digests[published] = replay.digest()
        sequences = {sid: 0 for sid in site_ids}
        for i in range(label_contributions):
            sid = site_ids[i % len(site_ids)]
            sequences[sid] += 1
            env = label_contribution(
                keys, sid, sequence=sequences[sid], base_size=published,
                base_root=tree.root(published), base_digest=digests[published], n_latent=10,
                seed=i, origin=origin, expression=expression_contributions,
            )
            put(w, env, "label_contribution", site_id=sid, sequence=sequences[sid])
    batch = 500
    u = 0
    while u < n_updates:
        with store.writer() as w:
            for _ in range(min(batch, n_updates - u)):
                sid = site_ids[u % len(site_ids)]
                if revoke is not None and revoke[1] == u:
                    env = revoke_entry(origin=origin, site_id=revoke[0], operator_keys=[keys.operator])
                    policy_indices.append(put(w, env, "policy", site_id=revoke[0]))
                if federated_round_at is not None and federated_round_at == u:
                    current = replay.bundle()
                    tensors = dict(current.tensors)
                    tensors["encoder.W_x"] = (tensors["encoder.W_x"] * np.float32(0.9)).astype(np.float32)
                    manifest = {k: v for k, v in current.manifest.items() if k != "digest"}
                    aggregate = make_bundle(manifest, tensors)
                    rnd = make_federated_round(
                        aggregate, origin=origin, round_number=1, base_size=tree.size,
                        base_digest=current.digest,
                        contributors=[(sid_, "sha256:" + "ab" * 32) for sid_ in site_ids[:2]],
                        operator_keys=[keys.operator],
                    )
                    last_model_index = put(w, rnd.envelope, "federated_round", blob_list=[
                        ("manifest", rnd.manifest_bytes), ("safetensors", rnd.safetensors_bytes)])
                    replay = _GrowingModel(aggregate)
                    published = tree.size
                    digests[published] = replay.digest()
                if tree.size - published >= base_every:
                    published = tree.size
                    digests[published] = replay.digest()
                diff = {
                    name: (rng.standard_normal((hidden, 1)) * 0.05).astype(np.float32)
                    for name in ("decoder.W_s", "encoder.W_s")
                }
                if u != replayed_sequence_at:
                    sequences[sid] += 1
                cond = f"{sid}/batch{u:06d}"
                upd = make_update(
                    origin=origin, site_id=sid, site_key=keys.sites[sid],
                    sequence=sequences[sid], base_size=published,
                    base_root=tree.root(published),
                    base_digest=digests[published] if u != wrong_base_digest_at
                    else "sha256:" + "0" * 64,
                    new_conditions=[cond], diff=diff,
                )
                idx = put(w, upd.envelope, "site_update", site_id=sid,
                          sequence=None if u == replayed_sequence_at else sequences[sid],
                          blob_list=[("diff", upd.diff_bytes)])
                update_indices.append(idx)
                last_model_index = idx
                replay.apply(diff_from_bytes(upd.diff_bytes), [cond])
                u += 1
    if extra_entries:
        with store.writer() as w:
            for kind, env in extra_entries:
                put(w, env, kind)
    served_digest = replay.digest()
    if materialize:
        # the coordinator's reference cache layout (coordinator/references.py ReferenceCache)
        bundle = replay.bundle()
        mbytes, sbytes = bundle_to_bytes(bundle)
        d = out / "cache" / f"v{last_model_index}"
        d.mkdir(parents=True, exist_ok=True)
        (d / "manifest.json").write_bytes(mbytes)
        (d / "model.safetensors").write_bytes(sbytes)
        (d / "digest").write_text(
            f"{bundle.digest} {blobs_name(mbytes)} {blobs_name(sbytes)}\n", encoding="ascii"
        )
    size = tree.size
    store.close()
    return GeneratedLedger(out, trust_path, keys, size, update_indices, policy_indices,
                           served_digest, time.perf_counter() - t0)


def blobs_name(data: bytes) -> str:
    import hashlib

    return "sha256:" + hashlib.sha256(data).hexdigest()


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, help="an empty directory for the state")
    ap.add_argument("--updates", type=int, required=True)
    ap.add_argument("--sites", type=int, default=10)
    ap.add_argument("--base-every", type=int, default=50)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    g = build_ledger(args.out, n_updates=args.updates, n_sites=args.sites,
                     base_every=args.base_every, seed=args.seed)
    print(json.dumps({"state_dir": str(g.state_dir), "entries": g.size,
                      "updates": len(g.update_indices), "seconds": round(g.seconds, 2),
                      "served_digest": g.served_digest}))
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    sys.exit(main())
