"""The site agent's flows: ``map`` (pull, verify, map, guard, sign, submit, receipt) and
``retry`` (deliver what the outbox still holds).

Order of ``map`` and what each step may touch::

    pull + verify   (site_agent.verify)       network in, nothing out
    map             (site_agent.mapping)      private data, the mapped .h5ad written locally
    build update    (protocols.diff/update)   the condition slices and the payload
    privacy guard   (site_agent.guard)        refuses anything but the declared slices
    outbox          (site_agent.outbox)       the exact bytes, with a readable summary
    -- --dry-run stops here --
    sequence        (site_agent.state)        allocated durably before signing, never reused
    sign            (protocols.dsse)          with the site key, which never leaves the site
    submit          (RegistryClient)          envelope + diff, nothing else
    receipt         (site_agent.verify)       inclusion + consistency, stored with the update

An unreachable coordinator leaves the signed update in the outbox as ``pending``; ``site retry``
sends the same bytes again (same sequence number; the coordinator answers a second arrival with
the original receipt, so it is never a second entry).
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from protocols.errors import ConfigError, ScarchesFLError, TransportError, VerificationError
from protocols.policy import TrustPolicy
from site_agent.config import SiteConfig
from site_agent.guard import GuardPolicy, check_outgoing
from site_agent.outbox import DELIVERED, PENDING, REJECTED, Outbox, OutboxEntry
from site_agent.state import SiteState
from site_agent.verify import VerifiedReference, load_trust, pull_and_verify, verify_receipt

if TYPE_CHECKING:
    from anndata import AnnData
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from protocols.update import UpdatePayload

__all__ = [
    "SiteSigningKey",
    "MapReport",
    "DeliveryError",
    "UpdateRejectedBySiteError",
    "load_site_key",
    "connect",
    "run_map",
    "deliver",
    "retry_pending",
]

logger = logging.getLogger(__name__)


class DeliveryError(TransportError):
    """The signed update could not be delivered; it waits in the outbox for ``site retry``."""

    exit_code = 4


class UpdateRejectedBySiteError(ScarchesFLError):
    """The coordinator rejected the update (stable reason code in the message)."""

    exit_code = 3


@dataclass(frozen=True)
class SiteSigningKey:
    """This site's private signing key, loaded from its key file, with its id and public text."""

    private: Any
    key_id: str
    public_text: str


def load_site_key(path: Any) -> SiteSigningKey:
    from protocols.keys import key_id, load_private_key, public_key_text

    priv = load_private_key(path)
    return SiteSigningKey(private=priv, key_id=key_id(priv), public_text=public_key_text(priv))


def connect(config: SiteConfig, trust: TrustPolicy) -> Any:
    from protocols.registry_client import RegistryClient

    assert config.coordinator is not None
    if config.insecure:
        print(
            "WARNING: --insecure: talking to the coordinator WITHOUT TLS. Use this only on "
            "loopback for development.", file=sys.stderr,
        )
        return RegistryClient(config.coordinator, insecure=True, timeout=config.timeout_s,
                              retries=1)
    if not trust.tls_root_pem:
        raise ConfigError(
            f"the pinned trust.json of {config.coordinator} carries no TLS root certificate "
            "(tls_root_pem); ask the operator for a trust.json written by `scarches-fl "
            "coordinator init`, or use --insecure on loopback only"
        )
    return RegistryClient(config.coordinator, trust=trust.tls_root_pem.encode(),
                          timeout=config.timeout_s, retries=1)


@dataclass
class MapReport:
    """What a ``site map`` run did, for the CLI to print."""

    verified: VerifiedReference
    out_path: Any
    n_cells: int
    new_conditions: list[str]
    notes: list[str] = field(default_factory=list)
    entry: OutboxEntry | None = None
    summary_text: str = ""
    receipt: dict[str, Any] | None = None
    delivered: bool = False
    dry_run: bool = False
    #: the label contribution (``--contribute-labels``): outbox entry, summary, receipt
    label_entry: OutboxEntry | None = None
    label_summary_text: str = ""
    label_receipt: dict[str, Any] | None = None


def _say(printer: Callable[[str], None] | None, text: str) -> None:
    if printer is not None:
        printer(text)


def run_map(
    config: SiteConfig, *, dry_run: bool = False, var_names_column: str | None = None,
    printer: Callable[[str], None] | None = print, client_factory: Callable[..., Any] = connect,
    force: bool = False, backed: bool | None = None,
) -> MapReport:
    """The whole ``site map`` flow (see the module docstring)."""
    from protocols.diff import diff_from_bytes, diff_to_bytes
    from protocols.limits import DEFAULT_LIMITS
    from protocols.update import build_update_payload
    from site_agent.mapping import map_query, open_query, write_mapped

    config.require("coordinator", "trust", "key", "site_id", "state", "data", "batch_key", "out")
    assert config.state and config.trust and config.key and config.site_id and config.data
    assert config.out is not None
    from scarches_fl.data import DataError
    from scarches_fl.query import check_output_path
    from site_agent.mapping import SiteDataError

    try:
        check_output_path(config.out, force=force)
    except DataError as exc:
        raise SiteDataError(str(exc)) from exc
    state = SiteState(config.state)
    with state.locked():
        trust = load_trust(state.pin_trust(config.trust), source=str(config.trust))
        key = load_site_key(config.key)
        state.remember(coordinator=config.coordinator, site_id=config.site_id,
                       key_id=key.key_id, insecure=bool(config.insecure))
        outbox = Outbox(state.outbox_path)
        with client_factory(config, trust) as client:
            if not dry_run and outbox.pending():
                _say(printer, f"delivering {len(outbox.pending())} update(s) still in the outbox "
                              "first")
                for entry in outbox.pending():
                    deliver(client, entry, state=state, trust=trust, printer=printer)
            _say(printer, f"pulling the reference from {config.coordinator} and verifying it")
            verified = pull_and_verify(client, state=state, trust=trust, site_id=config.site_id,
                                       key_id=key.key_id)
            _say(printer, (
                f"verified: checkpoint size {verified.tree_size} (root {verified.root_hex[:16]}...),"
                f" signed by the pinned log key"
                + (f", cosigned by {len(verified.cosigned_by)} witness(es)"
                   if verified.cosigned_by else "")
                + (f", consistent with size {verified.previous_size}"
                   if verified.previous_size else " (first contact: pinned)")
                + f"; reference digest {verified.digest}; site key {key.key_id[:16]}... enrolled"
            ))
            from scarches_fl.model import ReferenceModel

            model = ReferenceModel.from_bundle(verified.bundle)
            _use_label_knowledge(model, config, verified, printer)
            th = config.thresholds
            _say(printer, f"mapping {config.data} (stays at this site)")
            with open_query(config.data, backed=backed) as adata:
                if config.contribute_labels:
                    _check_contribution_setup(config, adata, verified)
                outcome = map_query(
                    adata, model, site_id=config.site_id, batch_key=config.batch_key or "",
                    label_key=config.label_key, layer=config.layer, batches=config.batches,
                    min_gene_coverage=th.min_gene_coverage, label_threshold=th.label_uncertainty,
                    min_cells_per_batch=th.min_cells_per_batch, max_epochs=config.max_epochs,
                    seed=config.seed, var_names_column=var_names_column,
                    label_method=config.label_method,
                )
                scores = (
                    _contribution_expression(config, outcome) if config.contribute_labels
                    else None
                )
            for n in outcome.notes:
                _say(printer, f"  {n}")
            provenance = {
                "tree_size": verified.tree_size,
                "checkpoint_root": verified.root_hex,
                "origin": trust.origin,
                "site_id": config.site_id,
            }
            write_mapped(outcome, config.out, provenance=provenance)
            _say(printer, f"wrote {config.out}: obsm['X_scarches']"
                 + (f", obs['{config.label_key}_pred'], obs['{config.label_key}_uncertainty']"
                    if config.label_key else "")
                 + f" (mapped on reference version {verified.tree_size})")
            report = MapReport(verified=verified, out_path=config.out,
                               n_cells=int(outcome.adata.n_obs),
                               new_conditions=list(outcome.new_conditions), notes=outcome.notes,
                               dry_run=dry_run)

            if not outcome.diff:
                _say(printer, "no new condition columns: every batch is already in the reference")
                if config.contribute_labels:
                    _contribute_labels(config, outcome, report, client=client, state=state,
                                       trust=trust, key=key, verified=verified, outbox=outbox,
                                       dry_run=dry_run, printer=printer, expression=scores)
                return report

            # -- the update: diff bytes, payload, privacy guard --
            diff_bytes = diff_to_bytes(outcome.diff)
            sent_back = diff_from_bytes(diff_bytes, max_bytes=DEFAULT_LIMITS.max_diff_bytes)
            if dry_run:
                sequence = max(state.last_sequence(), verified.site_record.last_sequence) + 1
            else:
                sequence = state.allocate_sequence(at_least=verified.site_record.last_sequence)
            payload = build_update_payload(
                origin=trust.origin, site_id=config.site_id, site_key_id=key.key_id,
                sequence=sequence, base_size=verified.tree_size,
                base_root=bytes(verified.checkpoint.root_hash), base_digest=verified.digest,
                new_conditions=list(outcome.new_conditions), diff=sent_back,
                diff_bytes=diff_bytes,
            )
            payload_bytes = bytes(payload.to_bytes())
            guard = check_outgoing(
                payload_bytes=payload_bytes,
                diff_bytes=diff_bytes, diff_tensors=sent_back,
                base_manifest=verified.reference.manifest, new_conditions=outcome.new_conditions,
                base_size=verified.tree_size, base_digest=verified.digest,
                policy=GuardPolicy(site_id=config.site_id, max_value_abs=th.max_value_abs),
            )
            text = guard.render()
            entry = outbox.create(
                sequence=None if dry_run else sequence, payload_bytes=payload_bytes,
                diff_bytes=diff_bytes, summary=guard.to_dict() | {"sequence": sequence},
                summary_text=text,
            )
            report.entry = entry
            report.summary_text = text
            _say(printer, f"privacy guard passed; outbox entry {entry.id}:")
            _say(printer, text.rstrip("\n"))
            if dry_run:
                _say(printer, f"--dry-run: nothing was signed or sent. The update is in "
                              f"{entry.path}")
                if config.contribute_labels:
                    _contribute_labels(config, outcome, report, client=client, state=state,
                                       trust=trust, key=key, verified=verified, outbox=outbox,
                                       dry_run=True, printer=printer, after_sequence=sequence,
                                       expression=scores)
                return report

            # -- sign, submit, receipt --
            envelope = _sign_checked(payload, payload_bytes, key.private)
            entry.write_envelope(envelope)
            _say(printer, f"signed update {entry.id} (sequence {sequence}) with key "
                          f"{key.key_id[:16]}...; sending envelope.json ({len(envelope):,} bytes)"
                          f" and diff.safetensors ({len(diff_bytes):,} bytes), nothing else")
            rec = deliver(client, entry, state=state, trust=trust, printer=printer)
            report.receipt = rec
            report.delivered = True
            if config.contribute_labels:
                _contribute_labels(config, outcome, report, client=client, state=state,
                                   trust=trust, key=key, verified=verified, outbox=outbox,
                                   dry_run=False, printer=printer, expression=scores)
            return report


def _use_label_knowledge(model: Any, config: SiteConfig, verified: VerifiedReference,
                         printer: Callable[[str], None] | None) -> None:
    """Predict with the label knowledge of the verified version: the reference's own plus every
    accepted label contribution (the same replay the auditor runs), unless
    ``genesis_labels_only``."""
    from protocols.labels import merge_label_knowledge

    labels_state = verified.site_record.labels
    if not config.label_key or labels_state is None or not model.labels:
        return
    n = sum(len(c.prototypes) for c in labels_state.contributions)
    if config.genesis_labels_only:
        if n:
            _say(printer, f"label knowledge: the reference's own only (--genesis-labels-only; "
                          f"{n} contributed prototype(s) left out)")
        return
    if n:
        model.labels = merge_label_knowledge(model.labels, labels_state)
        _say(printer, f"label knowledge: the reference's own plus {n} prototype(s) from "
                      f"{len(labels_state.contributions)} label contribution(s) in the ledger")


def _study_key(adata: AnnData, config: SiteConfig) -> str:
    from scarches_fl.data import condition_names

    batches = list(dict.fromkeys(adata.obs[config.batch_key].astype(str).to_numpy()))
    return ",".join(sorted(condition_names(batches, config.site_id or "").values()))


def _check_contribution_setup(config: SiteConfig, adata: AnnData, verified: VerifiedReference) -> None:
    """Fail fast, before any training: what ``--contribute-labels`` needs."""
    from protocols.labels import reference_levels
    from site_agent.labels import EpsilonLedger, LabelContributionError, choose_dp

    if not config.label_key:
        raise LabelContributionError(
            "--contribute-labels needs --label-key L: the obs column with this site's own cell "
            "type annotation"
        )
    if config.label_key not in adata.obs.columns:
        raise LabelContributionError(
            f"--contribute-labels: obs has no column {config.label_key!r}; the prototypes are "
            "computed from this site's own annotation of its cells"
        )
    levels = reference_levels(verified.reference.manifest.get("labels"))
    if config.label_key not in levels:
        raise LabelContributionError(
            f"--contribute-labels: the reference carries no prototypes for {config.label_key!r} "
            f"(it has {sorted(levels) or 'none'}), so there is nothing to extend"
        )
    labels_state = verified.site_record.labels
    assert labels_state is not None  # the ledger replay always records it
    dp = choose_dp(labels_state.policy, site_epsilon=config.label_dp_epsilon,
                   site_delta=config.label_dp_delta, site_clip_norm=config.label_dp_clip_norm)
    if config.label_epsilon_budget is not None:
        if dp is None:
            raise LabelContributionError(
                "label_epsilon_budget is set, but neither the label policy nor this site's "
                "configuration asks for the Gaussian mechanism: a contribution without it has "
                "no epsilon. Set label_dp_epsilon (with label_dp_delta, label_dp_clip_norm)"
            )
        assert config.state is not None
        EpsilonLedger(config.state).check(_study_key(adata, config), dp.epsilon,
                                          config.label_epsilon_budget)


def _contribution_expression(config: SiteConfig, outcome: Any) -> Any:
    """The query's scores on the reference's public expression subspace, for the expression
    part of a label contribution (ADR 0045); None where the reference has no expression
    prototypes for the label level (the contribution is then latent only, format version 1)."""
    from scarches_fl.refine import has_expression_prototypes, query_scores

    model = outcome.mapped.model
    tensors = model.tensors()
    if not config.label_key or not has_expression_prototypes(model.labels, tensors,
                                                             config.label_key):
        return None
    return query_scores(model.labels["expression"], tensors, outcome.mapped.adata, model.genes,
                        layer=config.layer)


def _contribute_labels(
    config: SiteConfig, outcome: Any, report: MapReport, *, client: Any, state: SiteState,
    trust: TrustPolicy, key: SiteSigningKey, verified: VerifiedReference, outbox: Outbox,
    dry_run: bool, printer: Callable[[str], None] | None, after_sequence: int | None = None,
    expression: Any = None,
) -> None:
    """Build, guard, show, sign and send the label contribution (``--contribute-labels``);
    ``expression``: the cells' scores on the reference's expression subspace, or None."""
    from protocols.labels import build_contribution_payload, sign_contribution
    from site_agent.labels import (
        EpsilonLedger,
        build_site_prototypes,
        check_outgoing_labels,
        choose_dp,
        render_contribution,
    )

    assert config.label_key and config.state
    labels_state = verified.site_record.labels
    assert labels_state is not None  # the ledger replay always records it
    policy = labels_state.policy
    dp = choose_dp(policy, site_epsilon=config.label_dp_epsilon, site_delta=config.label_dp_delta,
                   site_clip_norm=config.label_dp_clip_norm)
    adata = outcome.adata
    study = _study_key(adata, config)
    eps_ledger = EpsilonLedger(config.state)
    if dp is not None:
        eps_ledger.check(study, dp.epsilon, config.label_epsilon_budget)
    if expression is not None and dp is not None:
        # under DP the two parts share one mechanism, and at tens of cells per type the
        # expression part is noise (sigma 5-8 per component at epsilon 4) while it costs the
        # latent part sqrt(2) more noise: the agent sends the latent part only (ADR 0045)
        _say(printer, "label contribution under DP: latent prototypes only (format version 1); "
                      "the expression part is not sent (ADR 0045)")
        expression = None
    contrib = build_site_prototypes(
        outcome.mapped.latent, adata.obs[config.label_key].astype(object).to_numpy(),
        label_key=config.label_key, policy=policy, dp=dp, seed=config.seed,
        expression=expression,
    )
    if not contrib.prototypes:
        _say(printer, f"no label contribution: no type of {config.label_key!r} has k={policy.k} "
                      "cells or more")
        for name, why in sorted(contrib.kept_back.items()):
            _say(printer, f"  stays here: {name!r} ({why})")
        return
    if dry_run:
        sequence = (after_sequence if after_sequence is not None else
                    max(state.last_sequence(), verified.site_record.last_sequence)) + 1
    else:
        sequence = state.allocate_sequence(at_least=verified.site_record.last_sequence)
    payload = build_contribution_payload(
        origin=trust.origin, site_id=config.site_id or "", site_key_id=key.key_id,
        sequence=sequence, base_size=verified.tree_size,
        base_root=bytes(verified.checkpoint.root_hash), base_digest=verified.digest,
        label_key=config.label_key, prototypes=contrib.prototypes, privacy=contrib.privacy,
    )
    obj = payload.to_json_obj()
    check_outgoing_labels(obj, policy=policy, n_latent=int(outcome.mapped.latent.shape[1]),
                          cell_names=list(map(str, adata.obs_names)),
                          payload_bytes=payload.to_bytes(),
                          n_expression=None if expression is None else int(expression.shape[1]))
    spent = eps_ledger.spent(study) if dp is not None else None
    text = render_contribution(contrib, sequence=sequence, base_size=verified.tree_size,
                               spent=spent, budget=config.label_epsilon_budget)
    summary = {
        "kind": "label_contribution", "sequence": sequence, "label_key": config.label_key,
        "base": {"tree_size": verified.tree_size, "digest": verified.digest},
        "privacy": contrib.privacy, "study": study,
        "epsilon_spent_before": spent,
        "prototypes": [
            {"name": p["name"], "cells_here": contrib.local_counts[p["name"]], "count": p["count"],
             "sigma": p["sigma"], "mean": [float(x) for x in p["mean"]],
             "std": None if p["std"] is None else [float(x) for x in p["std"]],
             **({} if p.get("expression") is None else {"expression": {
                 "sigma": p["expression"]["sigma"],
                 "mean": [float(x) for x in p["expression"]["mean"]],
                 "std": None if p["expression"]["std"] is None
                 else [float(x) for x in p["expression"]["std"]]}})}
            for p in contrib.prototypes
        ],
        "kept_back": contrib.kept_back,
    }
    entry = outbox.create(sequence=None if dry_run else sequence, payload_bytes=payload.to_bytes(),
                          diff_bytes=b"", summary=summary, summary_text=text)
    report.label_entry = entry
    report.label_summary_text = text
    _say(printer, f"label privacy guard passed; outbox entry {entry.id}:")
    _say(printer, text.rstrip("\n"))
    if dry_run:
        _say(printer, f"--dry-run: the label contribution was not signed or sent ({entry.path})")
        return
    envelope = sign_contribution(payload, key.private)
    entry.write_envelope(envelope)
    if dp is not None:  # spent once it is signed and may leave
        total = eps_ledger.charge(study, dp.epsilon)
        _say(printer, f"epsilon spent on study {study!r}: {total:g}"
                      + (f" of {config.label_epsilon_budget:g}" if config.label_epsilon_budget
                         is not None else ""))
    _say(printer, f"signed label contribution {entry.id} (sequence {sequence}); sending "
                  f"envelope.json ({len(envelope):,} bytes), nothing else")
    report.label_receipt = deliver(client, entry, state=state, trust=trust, printer=printer)


def deliver(
    client: Any, entry: OutboxEntry, *, state: SiteState, trust: TrustPolicy,
    printer: Callable[[str], None] | None = print,
) -> dict[str, Any]:
    """Send one signed outbox entry (its exact bytes), verify and store the receipt."""
    envelope = entry.envelope_bytes
    if envelope is None:
        raise UpdateRejectedBySiteError(
            f"outbox entry {entry.id} was never signed (a dry run); run `site map` to build a "
            "signed update"
        )
    if entry.state == DELIVERED:
        rec = entry.receipt() or {}
        _say(printer, f"{entry.id} was delivered already (log index {rec.get('leaf_index')})")
        return rec
    diff = entry.diff_bytes
    try:
        result = client.submit_update(envelope, diff)
    except TransportError as exc:
        entry.record_attempt("unreachable", str(exc))
        raise DeliveryError(
            f"could not deliver {entry.id}: {exc}. The signed update stays in the outbox "
            f"({entry.path}); send it later with `scarches-fl site retry --state {state.path} "
            "--coordinator HOST:PORT --trust TRUST_JSON`"
        ) from exc
    if result.rejection is not None:
        rj = result.rejection
        if rj.retry_after_s and rj.retry_after_s > 0:
            entry.record_attempt("rate_limited", f"{rj.reason_code}: {rj.message}")
            raise DeliveryError(
                f"the coordinator asks to retry {entry.id} in {rj.retry_after_s:.0f} s "
                f"({rj.reason_code}: {rj.message}); it stays in the outbox; run `scarches-fl "
                "site retry` later"
            )
        entry.record_attempt("rejected", f"{rj.reason_code}: {rj.message}")
        entry.set_state(REJECTED, reason_code=rj.reason_code, message=rj.message)
        raise UpdateRejectedBySiteError(
            f"the coordinator rejected {entry.id} [{rj.reason_code}]: {rj.message}"
        )
    receipt = result.receipt
    assert receipt is not None
    verified = verify_receipt(client, receipt, envelope=envelope, state=state, trust=trust)
    rec = verified.to_dict() | {
        "leaf_hash": bytes(receipt.leaf_hash).hex(),
        "inclusion_proof": [bytes(h).hex() for h in receipt.inclusion_proof],
    }
    entry.store_receipt(rec, receipt.signed_note)
    entry.record_attempt("delivered", f"log index {verified.leaf_index}")
    entry.set_state(DELIVERED, leaf_index=verified.leaf_index, tree_size=verified.tree_size)
    summ = entry.summary()
    state.record_contribution({
        "outbox_id": entry.id, "sequence": entry.sequence, "leaf_index": verified.leaf_index,
        "tree_size": verified.tree_size, "new_conditions": summ.get("new_conditions", []),
        "kind": summ.get("kind", "site_update"),
        "label_types": [str(p.get("name")) for p in summ.get("prototypes", [])],
        "base_tree_size": summ.get("base", {}).get("tree_size"),
        "duplicate": verified.duplicate,
    })
    _say(printer, (
        f"delivered {entry.id}: log index {verified.leaf_index} in tree size "
        f"{verified.tree_size}{' (already logged before: same entry)' if verified.duplicate else ''}"
        "; receipt verified (inclusion proof and consistency with this site's view) and stored"
    ))
    return rec


def with_remembered_coordinator(config: SiteConfig, state: SiteState) -> SiteConfig:
    """``config`` with the coordinator address (and ``insecure``) of the last ``site map`` from
    ``state`` when none was given."""
    import dataclasses

    if config.coordinator is not None:
        return config
    last = state.remembered()
    return dataclasses.replace(
        config, coordinator=last.get("coordinator"),
        insecure=bool(config.insecure or last.get("insecure", False)),
    )


def retry_pending(
    config: SiteConfig, *, ids: Sequence[str] = (), printer: Callable[[str], None] | None = print,
    client_factory: Callable[..., Any] = connect,
) -> list[dict[str, Any]]:
    """Deliver pending outbox entries (all, or ``ids``) in sequence order."""
    config.require("state")
    assert config.state is not None
    state = SiteState(config.state).require_existing()
    config = with_remembered_coordinator(config, state)
    config.require("coordinator")
    with state.locked():
        pinned = state.pinned_trust()
        if pinned is None:
            raise UpdateRejectedBySiteError(
                f"{state.path} has no pinned trust.json; nothing was ever mapped from it"
            )
        if config.trust is not None:
            pinned = state.pin_trust(config.trust)
        trust = load_trust(pinned, source=str(state.trust_path))
        outbox = Outbox(state.outbox_path)
        entries = [outbox.get(i) for i in ids] if ids else outbox.pending()
        entries.sort(key=lambda e: e.sequence or 0)
        if not entries:
            _say(printer, "nothing to retry: no pending update in the outbox")
            return []
        out = []
        with client_factory(config, trust) as client:
            for entry in entries:
                if entry.state not in (PENDING, DELIVERED):
                    raise UpdateRejectedBySiteError(
                        f"outbox entry {entry.id} is {entry.state}; only pending updates are "
                        "retried"
                    )
                out.append(deliver(client, entry, state=state, trust=trust, printer=printer))
        return out


def _sign_checked(payload: UpdatePayload, checked_bytes: bytes, key: Ed25519PrivateKey) -> bytes:
    """Sign ``payload`` with the site key; the signed bytes must be exactly the bytes the
    privacy guard checked."""
    from protocols.dsse import parse_envelope
    from protocols.update import sign_update

    envelope = sign_update(payload, key)
    if parse_envelope(envelope).payload != checked_bytes:
        raise VerificationError(
            "the envelope would carry other bytes than the privacy guard checked; nothing was "
            "sent (a bug: report it)", reason_code="E_INTERNAL",
        )
    return envelope
