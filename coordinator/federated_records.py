"""Signed records of federated reference training: what a site signs for each contribution,
what the coordinator signs for each round, and the check an auditor runs over the chain.

Flower's SuperNode authentication signs a timestamp per request, not the payload, so every
contribution carries its own DSSE envelope (Ed25519, the site key enrolled with the
coordinator). The payload binds the arrays sent (``tensor_digest``), the round, the run, and the
digest of the model the site started from. The coordinator verifies it before the contribution
may enter the aggregate; what fails is excluded and named in the round's record with a reason.

Each round becomes a ``federated_round`` record signed by the coordinator's key: the base
model's digest, every contributor (site id, key id, contribution digest, cells, the sha256 of
its envelope), every excluded or missing site with its reason, and the aggregate's digest (the
bundle content digest of the model after the round). Consecutive records chain: a round's base
is the previous round's aggregate, the first base is the initial model, and the published
genesis bundle's digest is the aggregate of the round it was taken from.

Rules :func:`verify_round_chain` enforces (no I/O; bytes and trusted keys in):

* every record's signature verifies under the coordinator key; every contribution envelope it
  lists verifies under the key the policy gives that site, and its sha256 is the listed one;
* rounds are numbered 1, 2, ... without gaps, all of one run;
* ``base_digest`` of round 1 is the initial digest; of round r > 1 the aggregate of round r-1;
* the final model's digest is the aggregate digest of the round the genesis names.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from protocols.canonical import canonical_json, parse_json_strict
from protocols.errors import VerificationError

__all__ = [
    "CONTRIBUTION_PAYLOAD_TYPE",
    "ROUND_PAYLOAD_TYPE",
    "RUN_PAYLOAD_TYPE",
    "FederationError",
    "ContributionRejected",
    "sign_payload",
    "open_envelope",
    "envelope_sha256",
    "verify_contribution",
    "verify_round_chain",
    "ChainReport",
    "verify_run_directory",
    "peek_payload",
]

log = logging.getLogger(__name__)

CONTRIBUTION_PAYLOAD_TYPE = "application/vnd.scarches-fl.federated-contribution+json"
ROUND_PAYLOAD_TYPE = "application/vnd.scarches-fl.federated-round+json"
RUN_PAYLOAD_TYPE = "application/vnd.scarches-fl.federated-run+json"
_MAX_ENVELOPE_BYTES = 4 * 1024 * 1024


class FederationError(VerificationError):
    """Federated training records do not verify, or a federation cannot proceed."""

    default_reason_code = "E_FEDERATED_ROUND"


class ContributionRejected(FederationError):
    """One site's contribution is not acceptable; ``reason`` is a stable code."""

    _CODES = {
        "bad_signature": "E_SIG_INVALID",
        "unknown_site": "E_SITE_NOT_ENROLLED",
        "digest_mismatch": "E_DIGEST_MISMATCH",
        "wrong_base": "E_BASE_DIGEST_MISMATCH",
        "non_finite": "E_NONFINITE",
        "malformed": "E_PAYLOAD_MALFORMED",
        "wrong_site": "E_SITE_MISMATCH",
        "wrong_tensors": "E_TENSOR_SHAPE",
    }

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(
            f"{reason}: {message}", reason_code=self._CODES.get(reason, "E_FEDERATED_ROUND")
        )
        self.reason = reason


# -- DSSE (protocols.dsse, Ed25519) ------------------------------------------------------


def sign_payload(private_key: Any, payload_type: str, payload: Mapping[str, Any]) -> bytes:
    """A DSSE envelope (canonical JSON bytes) over ``canonical_json(payload)``."""
    from protocols.dsse import sign_envelope

    return sign_envelope(payload_type, canonical_json(payload), [private_key])


def envelope_sha256(envelope: bytes) -> str:
    return "sha256:" + hashlib.sha256(envelope).hexdigest()


def open_envelope(envelope: bytes, payload_type: str, public_key: Any) -> dict[str, Any]:
    """Verify ``envelope`` under ``public_key`` (threshold 1) and return its JSON payload.
    Raises :class:`FederationError` for anything malformed or not signed by that key."""
    from protocols.dsse import verify_envelope
    from protocols.errors import ScarchesFLError

    try:
        verified = verify_envelope(
            envelope, trusted_keys=[public_key], threshold=1, payload_type=payload_type
        )
        payload = parse_json_strict(
            verified.payload, max_bytes=_MAX_ENVELOPE_BYTES, require_canonical=True
        )
    except ScarchesFLError as exc:
        raise FederationError(f"envelope does not verify: {exc}") from exc
    if not isinstance(payload, dict):
        raise FederationError("signed payload is not a JSON object")
    return payload


def peek_payload(envelope: bytes) -> dict[str, Any]:
    """The payload of an envelope WITHOUT verifying it (to learn which key to verify with)."""
    from protocols.dsse import parse_envelope
    from protocols.errors import ScarchesFLError

    try:
        payload = json.loads(parse_envelope(envelope).payload)
    except (ScarchesFLError, ValueError) as exc:
        raise FederationError(f"envelope is malformed: {exc}") from exc
    if not isinstance(payload, dict):
        raise FederationError("envelope payload is not a JSON object")
    return payload


# -- contributions -------------------------------------------------------------------------------


def verify_contribution(
    envelope: bytes,
    *,
    site_keys: Mapping[str, Any],
    run_id: str,
    server_round: int,
    base_digest: str,
    arrays_digest: str,
    expected_conditions: Mapping[str, Sequence[str]],
) -> dict[str, Any]:
    """Check one contribution envelope against the policy and what arrived with it. Returns the
    verified payload; raises :class:`ContributionRejected` with a reason code:
    ``malformed``, ``unknown_site``, ``bad_signature``, ``wrong_run``, ``wrong_round``,
    ``wrong_base``, ``digest_mismatch``, ``wrong_conditions``."""
    try:
        claimed = peek_payload(envelope)
    except FederationError as exc:
        raise ContributionRejected("malformed", str(exc)) from exc
    site = claimed.get("site_id")
    if not isinstance(site, str) or site not in site_keys:
        raise ContributionRejected("unknown_site", f"site {site!r} is not enrolled")
    try:
        payload = open_envelope(envelope, CONTRIBUTION_PAYLOAD_TYPE, site_keys[site])
    except FederationError as exc:
        raise ContributionRejected("bad_signature", str(exc)) from exc
    if payload.get("run_id") != run_id:
        raise ContributionRejected("wrong_run", f"run {payload.get('run_id')!r}, not {run_id!r}")
    if payload.get("round") != server_round:
        raise ContributionRejected(
            "wrong_round", f"round {payload.get('round')!r}, not {server_round}"
        )
    if payload.get("base_digest") != base_digest:
        raise ContributionRejected("wrong_base", "trained from another model than was sent")
    if payload.get("contribution_digest") != arrays_digest:
        raise ContributionRejected(
            "digest_mismatch", "the arrays received are not the arrays signed"
        )
    if list(payload.get("conditions", [])) != list(expected_conditions.get(site, [])):
        raise ContributionRejected(
            "wrong_conditions", "the condition columns are not exactly the site's own"
        )
    n = payload.get("n_train")
    if not isinstance(n, int) or n < 0:
        raise ContributionRejected("malformed", "n_train is not a non-negative integer")
    return payload


# -- chain verification --------------------------------------------------------------------------


@dataclass
class ChainReport:
    run_id: str
    rounds: int
    initial_digest: str
    final_digest: str
    contributions_verified: int
    excluded: list[dict[str, Any]]


def verify_round_chain(
    run_envelope: bytes,
    round_envelopes: Sequence[bytes],
    contribution_envelopes: Mapping[tuple[int, str], bytes],
    *,
    coordinator_key: Any,
    site_keys: Mapping[str, Any],
    bundle_digest: str | None = None,
) -> ChainReport:
    """Verify a run's signed records end to end (see the module docstring). ``run_envelope``
    is the coordinator-signed run record (initial digest, sites, and after training the
    genesis round and digest); ``contribution_envelopes`` maps (round, site id) to the site's
    envelope as received. Raises :class:`FederationError` naming the first broken link."""
    run = open_envelope(run_envelope, RUN_PAYLOAD_TYPE, coordinator_key)
    run_id = run.get("run_id")
    prev = run.get("initial_digest")
    aggregates: dict[int, str] = {}
    verified = 0
    excluded: list[dict[str, Any]] = []
    for i, env in enumerate(round_envelopes, start=1):
        rec = open_envelope(env, ROUND_PAYLOAD_TYPE, coordinator_key)
        if rec.get("kind") != "federated_round" or rec.get("run_id") != run_id:
            raise FederationError(f"record {i} is not a federated_round of run {run_id}")
        if rec.get("round") != i:
            raise FederationError(
                f"record {i} says round {rec.get('round')}: a round is missing or out of order"
            )
        if rec.get("base_digest") != prev:
            raise FederationError(
                f"round {i} starts from {rec.get('base_digest')}, but the previous model is {prev}"
            )
        for c in rec.get("contributors", []):
            site = c.get("site_id")
            cenv = contribution_envelopes.get((i, site))
            if cenv is None:
                raise FederationError(f"round {i}: the envelope of contributor {site} is missing")
            if envelope_sha256(cenv) != c.get("envelope_sha256"):
                raise FederationError(f"round {i}: envelope of {site} differs from the recorded")
            if site not in site_keys:
                raise FederationError(f"round {i}: contributor {site} is not enrolled")
            payload = open_envelope(cenv, CONTRIBUTION_PAYLOAD_TYPE, site_keys[site])
            if (
                payload.get("round") != i
                or payload.get("base_digest") != prev
                or payload.get("run_id") != run_id
                or payload.get("contribution_digest") != c.get("contribution_digest")
            ):
                raise FederationError(
                    f"round {i}: contribution of {site} does not match the round record"
                )
            verified += 1
        excluded.extend({"round": i, **e} for e in rec.get("excluded", []))
        prev = rec.get("aggregate_digest")
        aggregates[i] = prev
    final = run.get("final")
    final_digest = prev
    if final is not None:
        r = final.get("round")
        if r not in aggregates or aggregates[r] != final.get("aggregate_digest"):
            raise FederationError(
                f"the final model names round {r}, whose recorded aggregate is different"
            )
        final_digest = final.get("bundle_digest")
        if final.get("aggregate_digest") != final_digest:
            raise FederationError("the final bundle's digest is not the recorded aggregate")
    if bundle_digest is not None and bundle_digest != final_digest:
        raise FederationError(
            f"the bundle's digest {bundle_digest} is not the one the records "
            f"end in ({final_digest})"
        )
    return ChainReport(
        run_id=str(run_id),
        rounds=len(round_envelopes),
        initial_digest=str(run.get("initial_digest")),
        final_digest=str(final_digest),
        contributions_verified=verified,
        excluded=excluded,
    )


def verify_run_directory(
    records: Path, *, site_keys: Mapping[str, Any], coordinator_key: Any,
    bundle: str | Path | None = None,
) -> ChainReport:
    """:func:`verify_round_chain` over a record directory as the ServerApp writes it
    (``run.json``, ``rounds/round-NNNN.json``, ``rounds/round-NNNN.<site>.contribution.json``);
    with ``bundle``, also that the bundle verifies and is the run's final model."""
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
    except OSError as exc:
        raise FederationError(f"cannot read the run's records in {records}: {exc}; pass the "
                              "directory the run wrote (BUNDLE_DIR/federation)") from exc
    digest = None
    if bundle is not None:
        from protocols.bundle import read_bundle

        digest = read_bundle(bundle).digest
    return verify_round_chain(run_env, rounds, contribs, coordinator_key=coordinator_key,
                              site_keys=site_keys, bundle_digest=digest)
