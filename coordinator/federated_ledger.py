"""A federated training run and the coordinator's ledger, its one trust root (ADR 0085).

A run happens in two steps around the ledger:

1. ``federate init-model`` asks the connected sites what they hold and writes the run's initial
   model only (``federation/models/round-0000``). The operator publishes it as the genesis
   (``scarches-fl coordinator init --reference``) and enrols every site's key
   (``scarches-fl coordinator enroll``).
2. ``federate run --ledger STATE`` trains from the ledger's current model with the keys the
   ledger gives (:func:`federation_keys`): every enrolled site's active key (a revoked site has
   none and cannot take part) and the operator key of the ledger's ``trust.json``, which signs
   the round records.

:func:`publish_run` then appends the run as ordinary entries: every round up to the one the run
chose (early stopping) becomes an operator-signed ``federated_round`` entry
(``coordinator.admin.publish_federated_round``): its base is the current version of the log, its
contributors are the verified contributions (site id and contribution digest), its aggregate is
that round's model. Rounds after the chosen one stay in the run's signed records but are not
appended, so the ledger's latest model is the federated reference bundle, and sites extend it by
surgery. A run with label knowledge (``--label-key``) also appends one operator-signed
``federated_labels`` entry right after the final round (ADR 0049): the bundle's label knowledge
(``manifest["labels"]`` and the expression prototypes' tensors), bound to that round's aggregate
and to the digest of the signed ``rounds/labels.json``, so the ledger serves the labelled bundle
and ``site map --label-key`` works against the coordinator. It verifies the run's records against the same ledger's keys first
(:func:`verify_run_directory`) and checks that the ledger's current model is the run's initial
model.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from coordinator.federated_files import verify_run_directory
from protocols.federated import (
    ROUND_PAYLOAD_TYPE,
    RUN_PAYLOAD_TYPE,
    FederationError,
    open_envelope,
    site_keys_of,
)
from protocols.keys import Ed25519PrivateKey, Ed25519PublicKey

__all__ = ["FederationKeys", "federation_keys", "publish_run"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class FederationKeys:
    """What a federated run takes from the coordinator's ledger: the sites' active keys, the
    operator keys of its ``trust.json`` (the public halves an auditor pins) and the operator's
    private key in the state directory (signs the round records), with the ledger's current
    model (the run's initial model) and size."""

    site_keys: dict[str, Ed25519PublicKey]
    operator_keys: list[Ed25519PublicKey]
    signing_key: Ed25519PrivateKey
    model: Any  # protocols.bundle.ReferenceBundle: the ledger's current model
    size: int
    last_round: int = 0  # the last federated round the ledger holds (0: none)


def federation_keys(state_dir: str | os.PathLike[str]) -> FederationKeys:
    """The replayed ledger in ``state_dir`` (a coordinator state directory): its enrolled,
    non-revoked site keys, its operator keys and current model. A :class:`FederationError`
    when no site is enrolled, naming the command that enrols one."""
    from coordinator.admin import _open
    from coordinator.config import load_config
    from protocols.keys import load_private_key

    cfg = load_config(state_dir)
    signing_key = load_private_key(cfg.path(cfg.paths.operator_key))
    with _open(state_dir) as reg:
        state = reg.state
        keys = FederationKeys(
            site_keys=site_keys_of(state.policy),
            operator_keys=list(state.policy.operator_public_keys()),
            signing_key=signing_key,
            model=state.bundle(),
            size=int(state.size),
            last_round=int(state.last_round),
        )
    if not keys.site_keys:
        raise FederationError(
            f"the ledger in {state_dir} enrols no site with an active key; enrol each site "
            "first (`scarches-fl coordinator enroll --dir STATE --site-id ID --public-key "
            "site.pub`)"
        )
    return keys


def run_keys(state_dir: str | os.PathLike[str]) -> FederationKeys:
    """:func:`federation_keys` for a new run, which starts from an initial model: a
    :class:`FederationError` when the ledger already holds federated rounds (its model is then
    a published run's aggregate, and a new run's rounds, counted from 1, could never be
    published there)."""
    keys = federation_keys(state_dir)
    if keys.last_round:
        raise FederationError(
            f"the ledger in {state_dir} already holds federated round {keys.last_round}: its "
            "model is a published run's aggregate, not an initial model, and a new run's "
            "rounds (from 1) could not be published after it. Start a new run with `scarches-fl "
            "federate init-model` and a new ledger (`coordinator init --reference` its "
            "round-0000)"
        )
    return keys


def publish_run(
    state_dir: str | os.PathLike[str],
    records: str | os.PathLike[str],
    *,
    bundle: str | os.PathLike[str] | None = None,
) -> list[Any]:
    """Append the run in ``records`` (``BUNDLE_DIR/federation``) to the ledger in
    ``state_dir``; returns the appended entries. A run with label knowledge also appends its
    bundle's (``bundle``, default ``BUNDLE_DIR``: the directory that holds ``records``). Raises :class:`FederationError` when a
    contributor has no active key in the ledger, when the records do not verify under the
    ledger's keys, or when the ledger does not serve the run's initial model."""
    from coordinator.admin import publish_federated_round
    from protocols.bundle import read_bundle

    records = Path(records)
    keys = federation_keys(state_dir)
    try:
        run = open_envelope(
            (records / "rounds" / "run.json").read_bytes(), RUN_PAYLOAD_TYPE, keys.operator_keys
        )
        final_round = int(run["final"]["round"])
        rounds = [
            open_envelope(
                (records / "rounds" / f"round-{rnd:04d}.json").read_bytes(),
                ROUND_PAYLOAD_TYPE,
                keys.operator_keys,
            )
            for rnd in range(1, final_round + 1)
        ]
    except OSError as exc:
        raise FederationError(
            f"cannot read the run's records in {records}: {exc}; pass the directory the run "
            "wrote (BUNDLE_DIR/federation)"
        ) from exc
    except FederationError as exc:
        raise FederationError(
            f"the run's records are not signed by this ledger's operator key ({exc}); publish "
            "a run into the ledger whose keys it ran with (`federate run --ledger STATE`)"
        ) from exc
    contributing = {c["site_id"] for rec in rounds for c in rec["contributors"]}
    missing = sorted(contributing - set(keys.site_keys))
    if missing:
        raise FederationError(
            f"the run's contributors {', '.join(missing)} have no active key in this ledger "
            "(never enrolled, or revoked); the ledger would refuse the first round that names "
            "one. Enrol them first (`coordinator enroll --site-id ID --public-key FILE`)"
        )
    labels_path = records / "rounds" / "labels.json"
    labelled = None
    bundle_dir = Path(bundle) if bundle is not None else records.parent
    if labels_path.exists():  # a run with --label-key: its bundle carries the label knowledge
        if not (bundle_dir / "manifest.json").is_file():
            raise FederationError(
                f"the run has label knowledge (rounds/labels.json) but {bundle_dir} holds no "
                "bundle; pass the bundle the run wrote (--bundle REF)"
            )
        labelled = read_bundle(bundle_dir)
    report = verify_run_directory(
        records,
        site_keys=keys.site_keys,
        coordinator_key=keys.operator_keys,
        bundle=bundle_dir if labelled is not None else None,
    )
    size = keys.size
    if keys.model.digest != report.initial_digest:
        raise FederationError(
            f"the ledger's current model is {keys.model.digest}, not the run's initial model "
            f"{report.initial_digest}; initialise the coordinator with --reference "
            f"{records / 'models' / 'round-0000'} before the run"
        )
    entries = []
    for rnd, rec in enumerate(rounds, start=1):
        aggregate = read_bundle(records / "models" / f"round-{rnd:04d}")
        if aggregate.digest != rec["aggregate_digest"]:
            raise FederationError(
                f"models/round-{rnd:04d} is not the aggregate round {rnd} recorded"
            )
        contributors = [(c["site_id"], c["contribution_digest"]) for c in rec["contributors"]]
        entry = publish_federated_round(
            state_dir,
            aggregate=aggregate,
            round_number=rnd,
            base_size=size,
            base_digest=rec["base_digest"],
            contributors=contributors,
        )
        entries.append(entry)
        size = int(entry.index) + 1
        log.info("appended round %d as ledger entry %d", rnd, entry.index)
    if labelled is not None:
        entries.append(_publish_labels(state_dir, records, labelled, final_round))
    return entries


def _publish_labels(state_dir: Any, records: Path, labelled: Any, final_round: int) -> Any:
    """The ``federated_labels`` entry right after the final round: the verified bundle's label
    knowledge, bound to the signed label record's digest (ADR 0049)."""
    import hashlib

    from coordinator.admin import publish_federated_labels
    from protocols.errors import VerificationError
    from protocols.federated import peek_payload

    envelope = (records / "rounds" / "labels.json").read_bytes()
    expression = peek_payload(envelope).get("expression") or {}
    try:
        entry = publish_federated_labels(
            state_dir,
            labelled=labelled,
            tensor_names=[str(n) for n in expression.get("tensors", [])],
            round_number=final_round,
            labels_record="sha256:" + hashlib.sha256(envelope).hexdigest(),
        )
    except VerificationError as exc:
        raise FederationError(
            f"the ledger refused the run's label knowledge: {exc.message} [{exc.reason_code}]; "
            "its rounds are appended, and the labels can only follow the final round directly"
        ) from exc
    log.info("appended the run's label knowledge as ledger entry %d", entry.index)
    return entry
