"""The files of a federated run on the operator's disk: the record directory a run writes
(``BUNDLE_DIR/federation``). The keys they are verified against come from the ledger
(:mod:`coordinator.federated_ledger`, ADR 0085).

The rules live in :mod:`protocols.federated`; this module only reads and writes files and hands
their bytes to it.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from protocols.bundle import content_digest, read_bundle
from protocols.federated import (
    LABEL_TASKS,
    ChainReport,
    ContributionRejected,
    FederationError,
    check_share_minimum,
    labels_digest,
    peek_payload,
    tensor_digest,
    verify_round_chain,
)
from protocols.keys import Ed25519PublicKey

__all__ = ["verify_run_directory"]


def verify_run_directory(
    records: str | os.PathLike[str],
    *,
    site_keys: Any,
    coordinator_key: Ed25519PublicKey | Sequence[Ed25519PublicKey],
    bundle: str | os.PathLike[str] | None = None,
) -> ChainReport:
    """:func:`protocols.federated.verify_round_chain` over a record directory as the ServerApp
    writes it (``rounds/run.json``, ``rounds/round-NNNN.json``,
    ``rounds/round-NNNN.<site>.contribution.json``, and for a run with labels
    ``rounds/labels.json`` and ``rounds/labels.<site>.<task>.json``), the sites' contributions
    under ``site_keys`` and the records under ``coordinator_key`` (one operator key, or any of
    several); with ``bundle``, also that
    the bundle verifies and is the run's final model (with label knowledge: the final aggregate's
    weights, and exactly the label knowledge the label record names)."""
    records = Path(records)
    try:
        run_env = (records / "rounds" / "run.json").read_bytes()
        round_files = sorted((records / "rounds").glob("round-[0-9][0-9][0-9][0-9].json"))
        rounds = [f.read_bytes() for f in round_files]
        contribs: dict[tuple[int, str], bytes] = {}
        for f in (records / "rounds").glob("round-*.contribution.json"):
            stem = f.name[: -len(".contribution.json")]
            rnd, _, site = stem.partition(".")
            contribs[(int(rnd.split("-")[1]), site)] = f.read_bytes()
        labels_path = records / "rounds" / "labels.json"
        labels_env = labels_path.read_bytes() if labels_path.exists() else None
        shares: dict[tuple[str, str], bytes] = {}
        for f in (records / "rounds").glob("labels.*.json"):
            site, _, task = f.name[len("labels.") : -len(".json")].rpartition(".")
            shares[(site, task)] = f.read_bytes()
    except OSError as exc:
        raise FederationError(
            f"cannot read the run's records in {records}: {exc}; pass the "
            "directory the run wrote (BUNDLE_DIR/federation)"
        ) from exc
    digest = None
    if bundle is not None:
        b = read_bundle(bundle)
        digest = b.digest
        if labels_env is not None:
            _check_labelled_bundle(b, labels_env)
            _replay_latent(b, labels_env, shares, records / "rounds")
            _replay_expression(b, labels_env, shares, records / "rounds")
    return verify_round_chain(
        run_env,
        rounds,
        contribs,
        coordinator_key=coordinator_key,
        site_keys=site_keys,
        bundle_digest=digest,
        labels_envelope=labels_env,
        label_share_envelopes=shares,
    )


def _stored_shares(
    record: dict[str, Any],
    envelopes: dict[tuple[str, str], bytes],
    rounds: Path,
    tasks: tuple[str, ...],
) -> dict[str, dict[str, Any]]:
    """``{task: {site: (types, arrays)}}`` of the shares the label record lists for ``tasks``,
    each read from ``labels.<site>.<task>.safetensors`` and checked against the digest the
    record (and the site's signed envelope, checked by the chain) names."""
    import safetensors.numpy as safetensors_numpy

    shares: dict[str, dict[str, Any]] = {t: {} for t in tasks}
    for share in record.get("shares", []):
        site, task = share.get("site_id"), share.get("task")
        if task not in shares:
            continue
        path = rounds / f"labels.{site}.{task}.safetensors"
        try:
            arrays = safetensors_numpy.load(path.read_bytes())
        except Exception as exc:  # OSError, or safetensors' own error type for a bad file
            raise FederationError(f"the stored {task} share of {site} cannot be read: {exc}") from exc
        if tensor_digest(arrays) != share.get("share_digest"):
            raise FederationError(
                f"the stored {task} share of {site} is not the one its site signed"
            )
        env = envelopes.get((str(site), str(task)))
        if env is None:
            raise FederationError(f"the {task} share of {site} is missing")
        try:  # a share the per-site minimum forbids was not to be pooled (ADR 0038)
            check_share_minimum(str(task), arrays, int(record.get("site_floor", 1)))
        except ContributionRejected as exc:
            raise ContributionRejected(
                exc.reason, f"the stored {task} share of {site}: {exc}"
            ) from exc
        shares[task][str(site)] = (list(peek_payload(env).get("types", [])), arrays)
    return shares


def _close(a: Any, b: Any) -> bool:
    """JSON-like values equal, numbers within a relative 1e-4 (BLAS differs between machines)."""
    import math

    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_close(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_close(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, bool) or isinstance(b, bool) or isinstance(a, str) or isinstance(b, str):
        return bool(a == b)
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return math.isclose(float(a), float(b), rel_tol=1e-4, abs_tol=1e-6)
    return bool(a == b)


def _replay_latent(
    bundle: Any, labels_env: bytes, envelopes: dict[tuple[str, str], bytes], rounds: Path
) -> None:
    """The bundle's latent prototypes are what the coordinator's pooling and calibration
    (``scarches_fl._federated_labels``) give on the stored statistics and calibration shares
    the label record lists."""
    from scarches_fl import _federated_labels as FL

    record = peek_payload(labels_env)
    shares = _stored_shares(record, envelopes, rounds, LABEL_TASKS[:2])
    key = str(record.get("label_key"))
    try:
        n_latent = int(bundle.manifest["hyperparameters"]["n_latent"])
        stats = [
            FL.statistics_from_arrays(types, arrays, n_latent=n_latent)
            for _site, (types, arrays) in sorted(shares["label_statistics"].items())
        ]
        model = FL.prototype_model(FL.pool_statistics(stats), min_cells=int(record["min_cells"]))
        calibration = FL.calibrate(
            [arrays for _site, (_t, arrays) in sorted(shares["label_calibration"].items())]
        )
        labels = FL.label_knowledge(key, model, calibration, n_latent=n_latent)
    except (ValueError, KeyError) as exc:
        raise FederationError(f"the label shares do not replay: {exc}") from exc
    got = bundle.manifest.get("labels", {}).get("levels", {}).get(key, {}).get("prototype")
    if not _close(got, labels["levels"][key]["prototype"]):
        raise FederationError(
            "the bundle's latent prototypes are not what the sites' signed shares give"
        )


def _replay_expression(
    bundle: Any, labels_env: bytes, envelopes: dict[tuple[str, str], bytes], rounds: Path
) -> None:
    """The bundle's expression prototypes are what the coordinator's stages give on the shares
    the label record lists (ADR 0037): each share's stored arrays
    (``labels.<site>.<task>.safetensors``) must hash to the digest the record (and the site's
    signed envelope, checked by the chain) names, and replaying
    :func:`scarches_fl._federated_expression.replay_expression` on them must give the bundle's
    expression tensors and calibration."""
    record = peek_payload(labels_env)
    expression = record.get("expression")
    if not expression:
        return
    import numpy as np

    from scarches_fl._federated_expression import replay_expression

    shares = _stored_shares(record, envelopes, rounds, LABEL_TASKS[2:])
    try:
        _info, level, tensors = replay_expression(
            shares,
            classes=[str(c) for c in record.get("kept", [])],
            n_genes=len(bundle.manifest["genes"]),
            floor=int(record.get("site_floor", 1)),
        )
    except (ValueError, KeyError) as exc:
        raise FederationError(f"the expression shares do not replay: {exc}") from exc
    got = bundle.manifest.get("labels", {}).get("levels", {}).get(record.get("label_key"), {})
    stored = got.get("expression", {})
    try:
        same = (
            set(tensors) == set(expression.get("tensors", []))
            and all(
                n in bundle.tensors
                and bundle.tensors[n].shape == t.shape
                and np.allclose(bundle.tensors[n], t, rtol=1e-4, atol=1e-5)
                for n, t in tensors.items()
            )
            and stored.get("classes") == level["classes"]
            and stored.get("cell_counts") == level["cell_counts"]
            and np.isclose(float(stored.get("temperature", np.nan)), level["temperature"])
            and np.allclose(
                stored.get("novelty_quantiles", []), level["novelty_quantiles"], rtol=1e-4
            )
        )
    except (TypeError, ValueError):
        same = False
    if not same:
        raise FederationError(
            "the bundle's expression prototypes are not what the sites' signed shares give"
        )


def _check_labelled_bundle(bundle: Any, labels_env: bytes) -> None:
    """The bundle is the final aggregate plus exactly the recorded label knowledge: its label
    knowledge hashes to the record's ``labels_digest``, the expression prototypes' tensors the
    record names (if any) to its ``expression.tensors_digest``, and its digest with
    ``manifest["labels"]`` emptied and those tensors removed is the record's model digest. (The
    signatures are checked by the chain.)"""
    record = peek_payload(labels_env)
    manifest = dict(bundle.manifest)
    if labels_digest(manifest.get("labels", {})) != record.get("labels_digest"):
        raise FederationError(
            "the bundle's label knowledge is not the one the run's label record names"
        )
    tensors = dict(bundle.tensors)
    expression = record.get("expression") or {}
    names = [str(n) for n in expression.get("tensors", [])]
    if any(n not in tensors for n in names) or tensor_digest(
        {n: tensors[n] for n in names}
    ) != expression.get("tensors_digest", tensor_digest({})):
        raise FederationError(
            "the bundle's expression prototypes are not the ones the run's label record names"
        )
    for n in names:
        del tensors[n]
    manifest["tensors"] = {
        k: v for k, v in dict(manifest.get("tensors", {})).items() if k not in names
    }
    manifest["labels"] = {}
    if content_digest(manifest, tensors) != record.get("model_digest"):
        raise FederationError("the bundle's weights are not the run's final aggregate")
