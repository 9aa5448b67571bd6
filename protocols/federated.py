"""Federated reference training, the trust part: the signed records (site descriptor,
contribution, round, run), the tensor digest that binds a signature to the arrays
sent, and the check an auditor runs over a run's records. Bytes and trusted keys in, typed errors
out: no I/O, no torch, no Flower (``docs/federated.md``, ``docs/adr/0032``).

Both sides use this module: the coordinator's ServerApp verifies what the sites sign here, the
site's ClientApp signs with it; neither imports the other.

Flower's SuperNode authentication signs a timestamp per request, not the payload, so every
contribution carries its own DSSE envelope (Ed25519, the site key enrolled in the ledger). The
payload binds the arrays sent (:func:`tensor_digest`), the round, the run, and the digest of the
model the site started from. Each round becomes a ``federated_round`` record signed by the
operator key of the ledger's ``trust.json``: the base model's digest, every contributor (site id, key id, contribution
digest, cells, the sha256 of its envelope), every excluded or missing site with its reason, and
the aggregate's digest (the bundle content digest of the model after the round).

Rules :func:`verify_contribution` enforces, in order (reason in brackets):

* the envelope parses [``malformed``]; its site is enrolled [``unknown_site``]; it verifies
  under that site's key [``bad_signature``];
* it names this run [``wrong_run``], this round [``wrong_round``], the model sent
  [``wrong_base``], the arrays received [``digest_mismatch``], exactly the site's own condition
  columns [``wrong_conditions``], and a non-negative cell count [``malformed``].

A label share (the exchanges that give a labelled federation's bundle its prototypes) also
sums over at least the federation's per-site minimum of the site's cells in every group
[``below_site_minimum``] (:func:`check_share_minimum`, ADR 0038).

Rules :func:`verify_round_chain` enforces:

* every record's signature verifies under one of the operator keys; every contribution envelope
  it lists verifies under the key the ledger gives that site, and its sha256 is the listed one;
* rounds are numbered 1, 2, ... without gaps, all of one run;
* ``base_digest`` of round 1 is the initial digest; of round r > 1 the aggregate of round r-1;
* the final model's digest is the aggregate digest of the round the run record names.

The keys come from one trust root, the coordinator's ledger (ADR 0085): the site keys are the
active keys of the sites its replayed policy enrols (a revoked site has none), the record-signing
keys are the operator keys of its ``trust.json``. This module takes them as arguments
(``site_keys``: site id -> public key; ``coordinator_key``: one operator key or several, any of
which may sign); ``coordinator.federated_ledger`` reads them from a ledger.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from protocols.canonical import canonical_json, parse_json_strict
from protocols.dsse import parse_envelope, sign_envelope, verify_envelope
from protocols.errors import ScarchesFLError, VerificationError
from protocols.keys import Ed25519PrivateKey, Ed25519PublicKey, public_key_from_text
from protocols.limits import DEFAULT_LIMITS

__all__ = [
    "CONTRIBUTION_PAYLOAD_TYPE",
    "DESCRIPTOR_PAYLOAD_TYPE",
    "ROUND_PAYLOAD_TYPE",
    "RUN_PAYLOAD_TYPE",
    "LABEL_SHARE_PAYLOAD_TYPE",
    "LABELS_PAYLOAD_TYPE",
    "LABEL_TASKS",
    "FederationError",
    "ContributionRejected",
    "site_keys_of",
    "sign_payload",
    "open_envelope",
    "peek_payload",
    "envelope_sha256",
    "tensor_digest",
    "labels_digest",
    "verify_contribution",
    "verify_label_share",
    "share_groups",
    "check_share_minimum",
    "verify_round_chain",
    "ChainReport",
]

CONTRIBUTION_PAYLOAD_TYPE = "application/vnd.scarches-fl.federated-contribution+json"
DESCRIPTOR_PAYLOAD_TYPE = "application/vnd.scarches-fl.federated-descriptor+json"
ROUND_PAYLOAD_TYPE = "application/vnd.scarches-fl.federated-round+json"
RUN_PAYLOAD_TYPE = "application/vnd.scarches-fl.federated-run+json"
LABEL_SHARE_PAYLOAD_TYPE = "application/vnd.scarches-fl.federated-label-share+json"
LABELS_PAYLOAD_TYPE = "application/vnd.scarches-fl.federated-labels+json"
#: The label exchanges after training: the latent prototypes' statistics and calibration
#: (``scarches_fl._federated_labels``), then the expression prototypes' moments, group
#: statistics and calibration (``scarches_fl._expression_sums``, ADR 0037).
LABEL_TASKS = (
    "label_statistics",
    "label_calibration",
    "expression_moments",
    "expression_statistics",
    "expression_calibration",
)


class FederationError(VerificationError):
    """Federated training records do not verify, or a federation cannot proceed."""

    default_reason_code = "E_FEDERATED_ROUND"


class ContributionRejected(FederationError):
    """One site's contribution is not acceptable; ``reason`` is a stable short code (the
    module docstring lists them) and ``reason_code`` the registry's code."""

    _CODES = {
        "bad_signature": "E_SIG_INVALID",
        "unknown_site": "E_SITE_NOT_ENROLLED",
        "digest_mismatch": "E_DIGEST_MISMATCH",
        "wrong_base": "E_BASE_DIGEST_MISMATCH",
        "non_finite": "E_NONFINITE",
        "malformed": "E_PAYLOAD_MALFORMED",
        "wrong_site": "E_SITE_MISMATCH",
        "wrong_tensors": "E_TENSOR_SHAPE",
        "below_site_minimum": "E_LABEL_SHARE_MINIMUM",
    }

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(
            f"{reason}: {message}", reason_code=self._CODES.get(reason, "E_FEDERATED_ROUND")
        )
        self.reason = reason


# -- the trust root ------------------------------------------------------------------------------


def site_keys_of(policy: Any) -> dict[str, Ed25519PublicKey]:
    """The site keys a federated run trusts, from a ledger's replayed policy
    (:class:`protocols.policy.TrustPolicy`): the active key of every enrolled site. A revoked
    site has no active key and is not in the result, so it cannot take part; a rotated site
    is trusted under its new key only."""
    out: dict[str, Ed25519PublicKey] = {}
    for site_id, record in sorted(policy.sites.items()):
        active = record.active_key
        if active is not None:
            out[str(site_id)] = public_key_from_text(active.public_key)
    return out


# -- DSSE envelopes (protocols.dsse, Ed25519) --------------------------------------------------


def sign_payload(
    private_key: Ed25519PrivateKey, payload_type: str, payload: Mapping[str, Any]
) -> bytes:
    """A DSSE envelope (canonical JSON bytes) over ``canonical_json(payload)``."""
    return sign_envelope(payload_type, canonical_json(payload), [private_key])


def envelope_sha256(envelope: bytes) -> str:
    return "sha256:" + hashlib.sha256(envelope).hexdigest()


def open_envelope(
    envelope: bytes,
    payload_type: str,
    public_key: Ed25519PublicKey | Sequence[Ed25519PublicKey],
) -> dict[str, Any]:
    """Verify ``envelope`` under ``public_key`` (or any one of several keys: threshold 1) and
    return its JSON payload. Raises :class:`FederationError` for anything malformed or not
    signed by such a key."""
    keys = [public_key] if isinstance(public_key, Ed25519PublicKey) else list(public_key)
    if not keys:
        raise FederationError("no trusted key to verify the envelope with")
    try:
        verified = verify_envelope(
            envelope, trusted_keys=keys, threshold=1, payload_type=payload_type
        )
        payload = parse_json_strict(
            verified.payload, max_bytes=DEFAULT_LIMITS.max_payload_bytes, require_canonical=True
        )
    except ScarchesFLError as exc:
        raise FederationError(f"envelope does not verify: {exc}") from exc
    if not isinstance(payload, dict):
        raise FederationError("signed payload is not a JSON object")
    return payload


def peek_payload(envelope: bytes) -> dict[str, Any]:
    """The payload of an envelope WITHOUT verifying it (to learn which key to verify with)."""
    try:
        payload = parse_json_strict(
            parse_envelope(envelope).payload, max_bytes=DEFAULT_LIMITS.max_payload_bytes
        )
    except ScarchesFLError as exc:
        raise FederationError(f"envelope is malformed: {exc}") from exc
    if not isinstance(payload, dict):
        raise FederationError("envelope payload is not a JSON object")
    return payload


def labels_digest(labels: Mapping[str, Any]) -> str:
    """``sha256:<hex>`` of the canonical JSON of a bundle's label knowledge
    (``manifest["labels"]``)."""
    return "sha256:" + hashlib.sha256(canonical_json(labels)).hexdigest()


def tensor_digest(tensors: Mapping[str, np.ndarray]) -> str:
    """``sha256:<hex>`` over the tensors sorted by name; each contributes its length-prefixed
    name, dtype, shape and raw little-endian bytes. Binds a signature to exactly the arrays
    sent, independent of any container's byte layout."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        arr = np.ascontiguousarray(tensors[name])
        if arr.dtype.byteorder == ">":
            arr = arr.astype(arr.dtype.newbyteorder("<"))
        header = f"{name}\x00{arr.dtype.str}\x00{list(arr.shape)}".encode()
        h.update(len(header).to_bytes(8, "big"))
        h.update(header)
        h.update(arr.nbytes.to_bytes(8, "big"))
        h.update(arr.tobytes())
    return "sha256:" + h.hexdigest()


# -- contributions ---------------------------------------------------------------------------


def _open_site_envelope(
    envelope: bytes, payload_type: str, site_keys: Mapping[str, Ed25519PublicKey], run_id: str
) -> dict[str, Any]:
    """The payload of a site-signed envelope of this run: the claimed site is enrolled
    [``unknown_site``], its key signed it [``bad_signature``], it names this run
    [``wrong_run``]; anything unreadable is [``malformed``]."""
    try:
        claimed = peek_payload(envelope)
    except FederationError as exc:
        raise ContributionRejected("malformed", str(exc)) from exc
    site = claimed.get("site_id")
    if not isinstance(site, str) or site not in site_keys:
        raise ContributionRejected("unknown_site", f"site {site!r} is not enrolled")
    try:
        payload = open_envelope(envelope, payload_type, site_keys[site])
    except FederationError as exc:
        raise ContributionRejected("bad_signature", str(exc)) from exc
    if payload.get("run_id") != run_id:
        raise ContributionRejected("wrong_run", f"run {payload.get('run_id')!r}, not {run_id!r}")
    return payload


def verify_contribution(
    envelope: bytes,
    *,
    site_keys: Mapping[str, Ed25519PublicKey],
    run_id: str,
    server_round: int,
    base_digest: str,
    arrays_digest: str,
    expected_conditions: Mapping[str, Sequence[str]],
) -> dict[str, Any]:
    """Check one contribution envelope against the policy and what arrived with it (the rules
    of the module docstring). Returns the verified payload; raises
    :class:`ContributionRejected`."""
    payload = _open_site_envelope(envelope, CONTRIBUTION_PAYLOAD_TYPE, site_keys, run_id)
    site = payload["site_id"]
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
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ContributionRejected("malformed", "n_train is not a non-negative integer")
    return payload


def verify_label_share(
    envelope: bytes,
    *,
    site_keys: Mapping[str, Ed25519PublicKey],
    run_id: str,
    model_digest: str,
    task: str,
    arrays_digest: str,
) -> dict[str, Any]:
    """Check one site's label share (statistics or calibration sums on the final model): the
    rules of :func:`verify_contribution` for signature, run and base (here the final model's
    digest) and arrays, plus [``wrong_task``] when it answers another exchange, and
    [``malformed``] when ``types`` is not a list of distinct strings. Returns the payload."""
    payload = _open_site_envelope(envelope, LABEL_SHARE_PAYLOAD_TYPE, site_keys, run_id)
    if payload.get("task") != task:
        raise ContributionRejected("wrong_task", f"task {payload.get('task')!r}, not {task!r}")
    if payload.get("base_digest") != model_digest:
        raise ContributionRejected("wrong_base", "computed on another model than was sent")
    if payload.get("share_digest") != arrays_digest:
        raise ContributionRejected(
            "digest_mismatch", "the arrays received are not the arrays signed"
        )
    types = payload.get("types")
    if (
        not isinstance(types, list)
        or not all(isinstance(t, str) for t in types)
        or len(set(types)) != len(types)
    ):
        raise ContributionRejected("malformed", "types is not a list of distinct names")
    return payload


def share_groups(task: str, arrays: Mapping[str, Any]) -> list[tuple[str, float]]:
    """The cell groups a label share of ``task`` sums over, as ``(what, cells)``: per type for
    ``label_statistics``; per type, per batch and all included cells for
    ``expression_statistics``; all the site's cells it covers for the moments and the two
    calibrations. An empty share (the site sent nothing) has none. [``malformed``] when the
    count arrays are missing or of the wrong shape."""
    if not arrays:
        return []
    try:
        if task == "label_statistics":
            counts = np.asarray(arrays["counts"], dtype=np.float64).reshape(-1)
            return [(f"type {i}", float(c)) for i, c in enumerate(counts)]
        if task == "expression_statistics":
            table = np.asarray(arrays["counts"], dtype=np.float64)
            if table.ndim != 2:
                raise ValueError("counts is not a type x batch table")
            return (
                [(f"type {i}", float(c)) for i, c in enumerate(table.sum(axis=1))]
                + [(f"batch {j}", float(c)) for j, c in enumerate(table.sum(axis=0))]
                + [("all included cells", float(table.sum()))]
            )
        if task == "expression_moments":
            return [("all labelled cells", float(np.asarray(arrays["count"]).reshape(-1)[0]))]
        if task in ("label_calibration", "expression_calibration"):
            scored = float(np.asarray(arrays["counts"]).reshape(-1)[0])
            return [("all scored cells", scored)] if scored > 0 else []
    except (KeyError, IndexError, TypeError, ValueError) as exc:
        raise ContributionRejected("malformed", f"{task} share counts: {exc}") from exc
    raise ContributionRejected("wrong_task", f"no label exchange {task!r}")


def check_share_minimum(task: str, arrays: Mapping[str, Any], minimum: int) -> None:
    """The per-site minimum (ADR 0038): every group a label share sums over
    (:func:`share_groups`) holds at least ``minimum`` of the site's cells, else
    [``below_site_minimum``]. A site never sends a smaller group; the coordinator and
    ``federate verify`` check it on every share, so a share that breaks the rule is neither
    pooled nor accepted in a record."""
    floor = max(1, int(minimum))
    small = [(what, n) for what, n in share_groups(task, arrays) if n < floor]
    if small:
        what, n = small[0]
        raise ContributionRejected(
            "below_site_minimum",
            f"{task}: {what} sums over {n:g} cells, fewer than the federation's per-site "
            f"minimum of {floor} ({len(small)} such group(s)); a site withholds groups that small",
        )


# -- chain verification ----------------------------------------------------------------------


@dataclass
class ChainReport:
    run_id: str
    rounds: int
    initial_digest: str
    final_digest: str
    contributions_verified: int
    excluded: list[dict[str, Any]] = field(default_factory=list)
    #: sites whose signed label shares the final bundle's label knowledge was built from
    label_shares_from: list[str] = field(default_factory=list)
    #: the floors the label knowledge was built under, as the signed label record names them:
    #: ``{"min_cells": k, "site_floor": per-site minimum}`` (ADRs 0038-0039); empty without labels
    label_floors: dict[str, int] = field(default_factory=dict)


def _verify_labels(
    final: Mapping[str, Any],
    run_id: Any,
    labels_envelope: bytes | None,
    shares: Mapping[tuple[str, str], bytes],
    *,
    coordinator_key: Ed25519PublicKey | Sequence[Ed25519PublicKey],
    site_keys: Mapping[str, Ed25519PublicKey],
) -> tuple[list[str], dict[str, int]]:
    """The label record the run's final entry names: signed by the coordinator, of this run,
    on the final aggregate, and every share it lists verifies under its site's key with the
    recorded envelope hash, task and model. Returns the sites that contributed statistics and
    the floors the record names (``min_cells``, ``site_floor``)."""
    if labels_envelope is None:
        raise FederationError("the run names label knowledge but its label record is missing")
    if envelope_sha256(labels_envelope) != final["labels"].get("record_sha256"):
        raise FederationError("the label record differs from the one the run names")
    rec = open_envelope(labels_envelope, LABELS_PAYLOAD_TYPE, coordinator_key)
    model = final.get("aggregate_digest")
    if rec.get("kind") != "federated_labels" or rec.get("run_id") != run_id:
        raise FederationError(f"the label record is not a federated_labels record of run {run_id}")
    if rec.get("model_digest") != model:
        raise FederationError("the label record was computed on another model than the final one")
    if rec.get("labels_digest") != final["labels"].get("labels_digest"):
        raise FederationError("the label record and the run name different label knowledge")
    sites = []
    for share in rec.get("shares", []):
        site, task = share.get("site_id"), share.get("task")
        env = shares.get((site, task))
        if env is None:
            raise FederationError(f"the {task} share of {site} is missing")
        if envelope_sha256(env) != share.get("envelope_sha256"):
            raise FederationError(f"the {task} share of {site} differs from the recorded")
        if site not in site_keys:
            raise FederationError(f"label share from {site}, which is not enrolled")
        payload = open_envelope(env, LABEL_SHARE_PAYLOAD_TYPE, site_keys[site])
        if (
            payload.get("run_id") != run_id
            or payload.get("task") != task
            or payload.get("base_digest") != model
            or payload.get("share_digest") != share.get("share_digest")
        ):
            raise FederationError(f"the {task} share of {site} does not match the label record")
        if task == LABEL_TASKS[0]:
            sites.append(str(site))
    named = {k: rec.get(k) for k in ("min_cells", "site_floor")}
    floors = {
        k: v for k, v in named.items() if isinstance(v, int) and not isinstance(v, bool) and v >= 1
    }
    if len(floors) != len(named):
        raise FederationError(f"the label record's floors {named} are not whole numbers >= 1")
    return sorted(sites), floors


def verify_round_chain(
    run_envelope: bytes,
    round_envelopes: Sequence[bytes],
    contribution_envelopes: Mapping[tuple[int, str], bytes],
    *,
    coordinator_key: Ed25519PublicKey | Sequence[Ed25519PublicKey],
    site_keys: Mapping[str, Ed25519PublicKey],
    bundle_digest: str | None = None,
    labels_envelope: bytes | None = None,
    label_share_envelopes: Mapping[tuple[str, str], bytes] | None = None,
) -> ChainReport:
    """Verify a run's signed records end to end (the rules of the module docstring).
    ``run_envelope`` is the coordinator-signed run record (initial digest, sites, and after
    training the final round and digest); ``contribution_envelopes`` maps (round, site id) to
    the site's envelope as received. When the run names label knowledge (``final.labels``),
    ``labels_envelope`` is the coordinator-signed ``federated_labels`` record and
    ``label_share_envelopes`` maps (site id, task) to each site's signed share. Raises
    :class:`FederationError` naming the first broken link."""
    run = open_envelope(run_envelope, RUN_PAYLOAD_TYPE, coordinator_key)
    run_id = run.get("run_id")
    prev = run.get("initial_digest")
    aggregates: dict[int, Any] = {}
    labelled_by: list[str] = []
    floors: dict[str, int] = {}
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
        if "labels" in final:
            labelled_by, floors = _verify_labels(
                final,
                run_id,
                labels_envelope,
                label_share_envelopes or {},
                coordinator_key=coordinator_key,
                site_keys=site_keys,
            )
        elif final.get("aggregate_digest") != final_digest:
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
        label_shares_from=labelled_by,
        label_floors=floors,
    )
