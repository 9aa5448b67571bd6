"""Append a federated training run to the coordinator's ledger.

The ledger (:mod:`protocols.ledger`, the coordinator's storage) holds the run as ordinary entries:

* the **genesis** is the run's initial model (``federation/models/round-0000``, published with
  ``scarches-fl coordinator init --reference``), so the first round's base is a version of the log;
* the sites are **enrolled** with the keys that signed their contributions
  (``scarches-fl coordinator enroll``, or ``federate publish --enroll``, which enrols every
  site of the run's policy that the ledger does not hold yet with the key the policy names);
* every round up to the one the run chose (early stopping) becomes an operator-signed
  ``federated_round`` entry (``coordinator.admin.publish_federated_round``): its base is the
  current version of the log, its contributors are the verified contributions (site id and
  contribution digest), its aggregate is that round's model. Rounds after the chosen one stay in
  the run's signed records but are not appended, so the ledger's latest model is the federated
  reference bundle, and sites extend it by surgery.

:func:`publish_run` verifies the run's records first (:func:`verify_run_directory`) and checks
that the ledger's current model is the run's initial model.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from coordinator.federated_files import (
    coordinator_key_of,
    read_federation_policy,
    run_policy_path,
    verify_run_directory,
)
from protocols.federated import (
    ROUND_PAYLOAD_TYPE,
    RUN_PAYLOAD_TYPE,
    FederationError,
    open_envelope,
)

__all__ = ["publish_run"]

log = logging.getLogger(__name__)


def publish_run(
    state_dir: str | os.PathLike[str],
    records: str | os.PathLike[str],
    *,
    policy: str | os.PathLike[str] | None = None,
    enroll: bool = False,
) -> list[Any]:
    """Append the run in ``records`` (``BUNDLE_DIR/federation``) to the ledger in
    ``state_dir``; returns the appended entries (with ``enroll``, the enrolment entries of the
    policy's sites first). Raises :class:`FederationError` when the records do not verify or
    the ledger does not start from the run's initial model."""
    from coordinator.admin import enroll_site, publish_federated_round
    from protocols.bundle import read_bundle

    records = Path(records)
    policy_path = run_policy_path(records, policy)
    policy_doc = read_federation_policy(policy_path)
    coordinator_key = coordinator_key_of(policy_doc, policy_path)
    site_keys = dict(policy_doc.sites)
    report = verify_run_directory(records, site_keys=site_keys, coordinator_key=coordinator_key)
    run = open_envelope(
        (records / "rounds" / "run.json").read_bytes(), RUN_PAYLOAD_TYPE, coordinator_key
    )
    final_round = int(run["final"]["round"])
    size, digest = _ledger_size_and_digest(Path(state_dir))
    if digest != report.initial_digest:
        raise FederationError(
            f"the ledger's current model is {digest}, not the run's initial model "
            f"{report.initial_digest}; initialise the coordinator with --reference "
            f"{records / 'models' / 'round-0000'} before publishing the run"
        )
    rounds = [
        open_envelope(
            (records / "rounds" / f"round-{rnd:04d}.json").read_bytes(),
            ROUND_PAYLOAD_TYPE,
            coordinator_key,
        )
        for rnd in range(1, final_round + 1)
    ]
    entries = []
    if enroll:
        for site_id in _not_enrolled(Path(state_dir), site_keys):
            entries.append(enroll_site(state_dir, site_id=site_id, public_key=site_keys[site_id]))
            log.info("enrolled %s as ledger entry %d", site_id, entries[-1].index)
        size = int(entries[-1].index) + 1 if entries else size
    else:
        contributing = {c["site_id"] for rec in rounds for c in rec["contributors"]}
        _require_enrolled(Path(state_dir), contributing, site_keys)
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
    return entries


def _require_enrolled(state_dir: Path, contributors: set[str], site_keys: dict[str, Any]) -> None:
    """Before anything is appended: every site that contributed to a published round has an
    active key in the ledger, else a :class:`FederationError` naming the sites and the fix (the
    ledger would refuse the first round that names one, after earlier rounds were appended)."""
    missing = [s for s in _not_enrolled(state_dir, site_keys) if s in contributors]
    if missing:
        raise FederationError(
            f"the run's contributors {', '.join(missing)} are not enrolled in this ledger; "
            "enrol them first (`coordinator enroll --site-id ID --public-key FILE`), or publish "
            "with --enroll to enrol the run's policy sites with the keys its policy names"
        )


def _not_enrolled(state_dir: Path, site_keys: dict[str, Any]) -> list[str]:
    """The policy's sites without an active key in the ledger, in order. A site enrolled with
    another key than the policy names is an error: the run's contributions would not verify
    under the ledger's policy."""
    from coordinator.admin import _open
    from protocols.keys import public_key_text

    missing = []
    with _open(state_dir) as reg:
        sites = reg.state.policy.sites
        for site_id, key in sorted(site_keys.items()):
            active = sites[site_id].active_key if site_id in sites else None
            if active is None:
                missing.append(site_id)
            elif active.public_key != public_key_text(key):
                raise FederationError(
                    f"site {site_id!r} is enrolled with key {active.key_id}, but the run's "
                    "policy names another key; the ledger would not accept its contributions. "
                    "Publish the run under the policy that signed it, or rotate the site's key "
                    "first (`coordinator rotate`)"
                )
    return missing


def _ledger_size_and_digest(state_dir: Path) -> tuple[int, str]:
    """The log size and the digest of the model it serves (C's replayed ``LedgerState``)."""
    from coordinator.admin import _open

    with _open(state_dir) as reg:
        return int(reg.state.size), str(reg.state.digest)
