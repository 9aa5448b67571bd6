"""The coordinator's Flower ServerApp for federated reference training.

One run (see ``docs/federated.md``):

1. **Describe.** Every connected SuperNode is asked (``query``) for its signed site descriptor:
   site id, the studies it holds with cell counts, its gene list. The keys come from the
   coordinator's ledger (ADR 0085). A run in two steps: ``federate init-model``
   (``init_only``) reads the descriptors before any ledger exists, only to design the initial
   model (global condition list ``<site_id>/<study>`` sorted, seeded weights), and writes it;
   ``federate run --ledger`` starts from the ledger's current model (``initial_model``) and
   leaves out a site without an active key in the ledger, whose signature does not verify, or
   whose genes or studies are not the model's (and says so in the log). The simulation does
   both in one run (``trust_initial_model`` publishes the initial model in its throw-away
   ledger, and the descriptors read before are then verified under that ledger's keys).
2. **Rounds.** Flower's ``Strategy.start`` drives the rounds with
   :class:`coordinator.federated_strategy.OwnedColumnsFedAvg` (a ``FedAvg`` subclass). Each
   round sends the current model (all tensors, the manifest, the KL weight of the round) as a
   ``train`` message to every described site still connected. A site replies with its shared
   tensors, its own condition columns, its cell counts, and the validation loss of the model it
   received, all bound by its signature. Contributions are verified
   (``protocols.federated.verify_contribution``); the accepted ones are aggregated
   (``scarches_fl._federated.aggregate``: FedAvg by cells for shared tensors, condition columns
   from their owner only). A site that does not answer within the round timeout, or answers with
   an error, is recorded as missing; the round completes with the others; the site is asked
   again next round.
3. **Stop.** Early stopping on the cell-weighted validation loss (after the KL warm-up); a final
   ``evaluate`` exchange scores the last aggregate. The best aggregate becomes the federated
   reference bundle (a genesis for ``coordinator init``; sites extend it by surgery).
4. **Records.** Every round is a ``federated_round`` record signed by the ledger's operator
   key, with the contribution envelopes beside it; the run record names the initial and final
   digests.
"""

from __future__ import annotations

import json
import logging
import secrets
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from flwr.serverapp import ServerApp

    from coordinator.federated_strategy import RoundRecord

from protocols.federated import (
    DESCRIPTOR_PAYLOAD_TYPE,
    LABELS_PAYLOAD_TYPE,
    ROUND_PAYLOAD_TYPE,
    RUN_PAYLOAD_TYPE,
    ContributionRejected,
    FederationError,
    check_share_minimum,
    envelope_sha256,
    labels_digest,
    open_envelope,
    peek_payload,
    sign_payload,
    tensor_digest,
    verify_label_share,
)

__all__ = [
    "FederationSettings",
    "FederationResult",
    "run_federation",
    "build_server_app",
    "app",
]

log = logging.getLogger(__name__)


@dataclass
class FederationSettings:
    """Everything the ServerApp needs. ``site_keys``: site id -> Ed25519 public key (the
    ledger's enrolled, non-revoked sites; ``None`` while no ledger exists: the init step);
    ``coordinator_key``: the Ed25519 private key that signs round records (the ledger's
    operator key). ``initial_model``: the bundle the run starts from (the ledger's current
    model); ``None`` designs one from the sites' descriptors. ``init_only``: stop once the
    initial model is written (``federate init-model``). ``trust_initial_model``: called with
    the designed initial model, returns ``(site_keys, coordinator_key)`` of a ledger that
    publishes it (the simulation's throw-away ledger)."""

    out_dir: str  # signed records, summary
    site_keys: Mapping[str, Any] | None
    coordinator_key: Any
    rounds: int = 10
    local_epochs: int = 5
    lr: float = 1e-3
    batch_size: int = 128
    prox_mu: float = 0.0
    kl_warmup_rounds: int = 0  # 0: half the rounds
    patience: int = 5
    min_sites: int = 1
    round_timeout: float = 600.0
    describe_timeout: float = 120.0
    wait_for_sites: float = 60.0
    seed: int = 0
    likelihood: str = "nb"
    n_hidden: int = 128
    n_layers: int = 2
    n_latent: int = 10
    batch_key: str = "batch"
    label_key: str | None = None
    label_min_cells: int = 5  # k: a type enters the bundle with this many cells pooled (ADR 0039)
    label_site_floor: int = 5  # a type leaves a site with this many labelled cells there
    classifier_weight: float = 10.0  # with a label key (scarches_fl.model.DEFAULT_CLASSIFIER_WEIGHT)
    run_id: str = ""
    bundle_dir: str | None = None  # default: <out_dir>/bundle
    keep_models: bool = True  # write the initial model and every aggregate under out_dir/models
    initial_model: Any = None  # protocols.bundle.ReferenceBundle
    init_only: bool = False
    trust_initial_model: Callable[[Any], tuple[Mapping[str, Any], Any]] | None = None
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class FederationResult:
    run_id: str
    bundle_dir: str
    bundle_digest: str  # the bundle: the final aggregate plus, with a label key, label knowledge
    final_round: int
    rounds: list[RoundRecord]  # coordinator.federated_strategy.RoundRecord
    conditions: list[str]
    sites: list[str]
    stopped_early: bool
    aggregate_digest: str = ""  # the final aggregate (weights only): what the ledger serves


# -- helpers -------------------------------------------------------------------------------------


def _kl_warmup(settings: FederationSettings) -> int:
    return (
        settings.kl_warmup_rounds if settings.kl_warmup_rounds > 0 else max(1, settings.rounds // 2)
    )


class _Federation:
    def __init__(self, grid: Any, settings: FederationSettings) -> None:
        self.grid = grid
        self.s = settings
        self.run_id = settings.run_id or secrets.token_hex(8)
        self.out = Path(settings.out_dir)
        self.records_dir = self.out / "rounds"
        self.node_site: dict[int, str] = {}
        self.left_out: set[int] = set()
        self.site_studies: dict[str, dict[str, int]] = {}
        self.site_label_types: dict[str, list[str]] = {}
        #: the expression prototypes' tensors of the final bundle (with a label key)
        self.label_tensors: dict[str, np.ndarray] = {}
        self.genes: list[str] | None = None
        #: site id -> public key (None until a ledger gives them: see FederationSettings)
        self.site_keys: Mapping[str, Any] | None = settings.site_keys
        self.coordinator_key = settings.coordinator_key
        self.label_key = settings.label_key
        #: the descriptor envelope each site sent (re-verified once keys are known)
        self.descriptors: dict[str, bytes] = {}
        #: with an initial model: its conditions (a site must announce exactly its own)
        self.conditions: list[str] = []
        self.fixed_conditions = False
        self.hp: dict[str, Any] = {}
        self.registration: dict[str, Any] = {}

    # -- messaging -------------------------------------------------------------------------

    def _exchange(
        self, contents: Mapping[int, Any], message_type: str, timeout: float
    ) -> dict[int, Any]:
        from flwr.app import Message

        messages = [
            Message(content=c, dst_node_id=int(n), message_type=message_type)
            for n, c in contents.items()
        ]
        replies = self.grid.send_and_receive(messages, timeout=timeout)
        return {int(r.metadata.src_node_id): r for r in replies}

    def _describe(self, node_ids: Iterable[int]) -> None:
        from flwr.app import ConfigRecord, RecordDict

        # A node that failed to describe itself is not asked again (each ask costs up to
        # describe_timeout in a deployment); a site that reconnects gets a new node id.
        ask = [n for n in node_ids if n not in self.node_site and n not in self.left_out]
        if not ask:
            return
        config: dict[str, Any] = {"run-id": self.run_id}
        if self.label_key:
            config.update({"label-key": str(self.label_key),
                           "site-floor": int(self.s.label_site_floor)})
        contents = {n: RecordDict({"config": ConfigRecord(config)}) for n in ask}
        replies = self._exchange(contents, "query", self.s.describe_timeout)
        for node, reply in replies.items():
            if reply.has_error():
                log.warning("node %s failed to describe itself: %s", node, reply.error.reason)
                self.left_out.add(node)
                continue
            try:
                env = bytes(reply.content.config_records["signature"]["envelope"])
                claimed = peek_payload(env)
                site = claimed.get("site_id")
                if not isinstance(site, str):
                    raise FederationError(f"site id {site!r} is not a string")
                if self.site_keys is None:
                    # No ledger yet (the init step): read only to design the initial model,
                    # which the operator publishes; the run verifies every descriptor again.
                    desc = claimed
                elif site not in self.site_keys:
                    raise FederationError(
                        f"site {site!r} has no active key in the ledger (not enrolled, or "
                        "revoked)"
                    )
                else:
                    desc = open_envelope(env, DESCRIPTOR_PAYLOAD_TYPE, self.site_keys[site])
                if desc.get("run_id") != self.run_id:
                    raise FederationError("descriptor is for another run")
                genes = [str(g) for g in desc["genes"]]
                if self.genes is None:
                    self.genes = genes
                elif genes != self.genes:
                    raise FederationError(
                        f"site {site} has other genes than the federation; "
                        "align every site to the same gene list first"
                    )
                studies = {str(k): int(v) for k, v in desc["studies"].items()}
                label_types = [str(t) for t in desc.get("label_types", [])]
                if self.fixed_conditions:
                    own = sorted(
                        c.split("/", 1)[1] for c in self.conditions if c.startswith(site + "/")
                    )
                    if sorted(studies) != own:
                        raise FederationError(
                            f"site {site} holds studies {sorted(studies)}, the initial model "
                            f"has {own} for it"
                        )
            except (FederationError, KeyError, TypeError, ValueError) as exc:
                log.warning("node %s left out: %s", node, exc)
                self.left_out.add(node)
                continue
            if site in self.node_site.values():
                # A site that reconnected under a new node id: forget the old id.
                self.node_site = {k: v for k, v in self.node_site.items() if v != site}
            self.node_site[node] = site
            self.descriptors.setdefault(site, env)
            self.site_studies.setdefault(site, studies)
            self.site_label_types.setdefault(site, label_types)
            log.info(
                "node %s is site %s with %d studies, %d cells",
                node,
                site,
                len(studies),
                sum(studies.values()),
            )

    # -- model bookkeeping ------------------------------------------------------------------

    def _model_bundle(
        self,
        tensors: Mapping[str, np.ndarray],
        labels: Mapping[str, Any] | None = None,
        extra_tensors: Mapping[str, np.ndarray] | None = None,
    ) -> Any:
        from scarches_fl.model import ReferenceModel
        from scarches_fl.module import CVAE

        module = CVAE(
            self.hp,
            len(self.genes or []),
            len(self.conditions),
            n_new_conditions=0,
            mode="conditions",
        )
        module.load_tensors(tensors)
        module.eval()
        model = ReferenceModel(
            module,
            genes=self.genes or [],
            conditions=self.conditions,
            registration=self.registration,
            labels=labels,
            extra_tensors=extra_tensors,
        )
        return model.to_bundle()

    # -- records ------------------------------------------------------------------------------

    def _sign_and_write(self, name: str, payload_type: str, payload: Mapping[str, Any]) -> bytes:
        from protocols.bundle import atomic_write

        env = sign_payload(self.coordinator_key, payload_type, payload)
        atomic_write(self.records_dir / name, env)
        return env

    def _on_round(
        self, rec: Any, envelopes: Mapping[str, bytes], tensors: Mapping[str, np.ndarray]
    ) -> None:
        """The strategy finished round ``rec.round``: keep its aggregate (so the rounds can be
        appended to the ledger, ``federate publish``), the contribution envelopes, and the
        coordinator-signed round record."""
        from protocols.bundle import atomic_write, write_bundle

        if self.s.keep_models:
            write_bundle(
                self.out / "models" / f"round-{rec.round:04d}", self._model_bundle(tensors)
            )
        for site, env in envelopes.items():
            atomic_write(self.records_dir / f"round-{rec.round:04d}.{site}.contribution.json", env)
        payload = {
            "kind": "federated_round",
            "run_id": self.run_id,
            **{k: v for k, v in asdict(rec).items() if k not in ("seconds",)},
        }
        if payload["validation_loss"] is None:
            del payload["validation_loss"]
        self._sign_and_write(f"round-{rec.round:04d}.json", ROUND_PAYLOAD_TYPE, payload)

    # -- label knowledge -------------------------------------------------------------------

    def _label_exchange(
        self,
        task: str,
        tensors: Mapping[str, np.ndarray],
        model_digest: str,
        config: Mapping[str, Any],
        per_site: Mapping[str, Mapping[str, Any]] | None = None,
    ) -> tuple[
        dict[str, tuple[dict[str, Any], dict[str, np.ndarray], bytes]], list[dict[str, Any]]
    ]:
        """Ask every described site (with ``per_site``: every site it names, each with its own
        additions to ``config``) for its ``task`` share on the final model; returns the
        verified shares by site (payload, arrays, envelope) and the excluded sites."""
        from flwr.app import ConfigRecord, RecordDict

        from coordinator.federated_strategy import arrays_to_record

        targets = {n: site for n, site in self.node_site.items() if site in self.site_studies}
        if per_site is not None:
            targets = {n: site for n, site in targets.items() if site in per_site}
        record = arrays_to_record(tensors)
        content = {
            n: RecordDict(
                {
                    "arrays": record,
                    "config": ConfigRecord({**config, **(per_site or {}).get(site, {})}),
                }
            )
            for n, site in targets.items()
        }
        replies = self._exchange(content, f"query.{task}", self.s.round_timeout)
        shares: dict[str, tuple[dict[str, Any], dict[str, np.ndarray], bytes]] = {}
        excluded: list[dict[str, Any]] = []
        for node, site in sorted(targets.items(), key=lambda kv: kv[1]):
            reply = replies.get(node)
            if reply is None:
                excluded.append({"site_id": site, "task": task, "reason": "missing"})
                continue
            if reply.has_error():
                excluded.append(
                    {
                        "site_id": site,
                        "task": task,
                        "reason": "site_error",
                        "detail": " ".join(str(reply.error.reason).split())[-200:],
                    }
                )
                continue
            try:
                env = bytes(reply.content.config_records["signature"]["envelope"])
                arrays = {k: a.numpy() for k, a in reply.content.array_records["arrays"].items()}
                payload = verify_label_share(
                    env,
                    site_keys=self.site_keys or {},
                    run_id=self.run_id,
                    model_digest=model_digest,
                    task=task,
                    arrays_digest=tensor_digest(arrays),
                )
                if payload["site_id"] != site:
                    raise ContributionRejected("wrong_site", f"signed as {payload['site_id']}")
                # no group smaller than the per-site minimum is pooled (ADR 0038)
                check_share_minimum(task, arrays, self.s.label_site_floor)
            except ContributionRejected as exc:
                log.warning("%s share of %s excluded: %s", task, site, exc)
                excluded.append(
                    {
                        "site_id": site,
                        "task": task,
                        "reason": exc.reason,
                        "reason_code": exc.reason_code,
                        "detail": str(exc)[:200],
                    }
                )
                continue
            except (KeyError, TypeError, ValueError) as exc:
                excluded.append(
                    {"site_id": site, "task": task, "reason": "malformed", "detail": str(exc)[:200]}
                )
                continue
            shares[site] = (payload, arrays, env)
        return shares, excluded

    def _label_knowledge(
        self, tensors: Mapping[str, np.ndarray], model_digest: str, manifest_bytes: bytes
    ) -> tuple[dict[str, Any], dict[str, Any]]:
        """Statistics, pooling, calibration (``scarches_fl._federated_labels``); the signed
        ``federated_labels`` record and the shares are written beside the round records.
        Returns (the bundle's label knowledge, what the run record names of it)."""
        import safetensors.numpy as safetensors_numpy

        from protocols.bundle import atomic_write
        from scarches_fl import _federated_labels as FL

        s = self.s
        config = {
            "run-id": self.run_id,
            "base-digest": model_digest,
            "manifest": manifest_bytes,
            "seed": int(s.seed),
            "label-key": str(self.label_key),
            "site-floor": int(s.label_site_floor),
        }
        stats, excluded = self._label_exchange("label_statistics", tensors, model_digest, config)
        per_site = {}
        for site, (payload, arrays, _env) in stats.items():
            try:
                per_site[site] = FL.statistics_from_arrays(
                    payload["types"], arrays, n_latent=int(self.hp["n_latent"])
                )
            except ValueError as exc:
                excluded.append(
                    {
                        "site_id": site,
                        "task": "label_statistics",
                        "reason": "malformed",
                        "detail": str(exc)[:200],
                    }
                )
        pooled = FL.pool_statistics(list(per_site.values()))
        try:
            model = FL.prototype_model(pooled, min_cells=s.label_min_cells)
        except ValueError as exc:
            raise FederationError(str(exc)) from exc
        calib_config = {**config, "prototype-model": json.dumps(model, sort_keys=True).encode()}
        calib, calib_excluded = self._label_exchange(
            "label_calibration", tensors, model_digest, calib_config
        )
        excluded += calib_excluded
        calibration = FL.calibrate([arrays for _p, arrays, _e in calib.values()])
        labels = FL.label_knowledge(
            str(self.label_key), model, calibration, n_latent=int(self.hp["n_latent"])
        )
        accepted: list[tuple[str, Mapping[str, Any], set[str]]] = [
            ("label_statistics", stats, set(per_site)),
            ("label_calibration", calib, set(calib)),
        ]
        expression = self._expression_knowledge(tensors, model_digest, config, model["classes"])
        extra: dict[str, np.ndarray] = {}
        expression_record: dict[str, Any] | None = None
        if expression is not None:
            projection, level, extra, exchanged, expression_excluded = expression
            labels["expression"] = projection
            labels["levels"][str(self.label_key)]["expression"] = level
            accepted += exchanged
            excluded += expression_excluded
            expression_record = {
                "classes": list(level["classes"]),
                "cells": {
                    c: int(n) for c, n in zip(level["classes"], level["cell_counts"], strict=True)
                },
                "n_components": int(projection["n_components"]),
                "tensors": sorted(extra),
                "tensors_digest": tensor_digest(extra),
            }
        shares = []
        for task, source, sites in accepted:
            for site in sorted(sites):
                payload, arrays, env = source[site]
                atomic_write(self.records_dir / f"labels.{site}.{task}.json", env)
                # the arrays themselves, so that a verifier recomputes what was built from them
                atomic_write(
                    self.records_dir / f"labels.{site}.{task}.safetensors",
                    safetensors_numpy.save(
                        {k: np.ascontiguousarray(v) for k, v in arrays.items()}
                    ),
                )
                share = {
                    "site_id": site,
                    "task": task,
                    "key_id": payload.get("key_id"),
                    "share_digest": payload["share_digest"],
                    "envelope_sha256": envelope_sha256(env),
                }
                if task == "label_statistics":
                    share["cells"] = {t: int(v.n) for t, v in sorted(per_site[site].items())}
                shares.append(share)
        record = {
            "kind": "federated_labels",
            "run_id": self.run_id,
            "model_digest": model_digest,
            "label_key": str(self.label_key),
            "min_cells": int(s.label_min_cells),
            "site_floor": int(s.label_site_floor),
            "types": {t: int(v.n) for t, v in sorted(pooled.items())},
            "kept": list(model["classes"]),
            "shares": shares,
            "excluded": excluded,
            "labels_digest": labels_digest(labels),
            **({"expression": expression_record} if expression_record else {}),
        }
        env = self._sign_and_write("labels.json", LABELS_PAYLOAD_TYPE, record)
        log.info(
            "label knowledge for %r: %d types from %d sites (%d below the floor of %d cells)%s",
            self.label_key,
            len(model["classes"]),
            len(per_site),
            len(pooled) - len(model["classes"]),
            s.label_min_cells,
            ", with expression prototypes" if expression_record else "",
        )
        self.label_tensors = extra
        return labels, {
            "record_sha256": envelope_sha256(env),
            "labels_digest": record["labels_digest"],
        }

    def _expression_knowledge(
        self,
        tensors: Mapping[str, np.ndarray],
        model_digest: str,
        config: Mapping[str, Any],
        classes: list[str],
    ) -> (
        tuple[
            dict[str, Any],
            dict[str, Any],
            dict[str, np.ndarray],
            list[tuple[str, Mapping[str, Any], set[str]]],
            list[dict[str, Any]],
        ]
        | None
    ):
        """The bundle's expression prototypes from three exchanges of sums
        (``scarches_fl._expression_sums``, ADR 0037): the sites' expression moments give the
        subspace, their (type, batch) groups the type model, their out-of-fold sums the
        calibration. Returns (``labels["expression"]``, the level's ``expression`` section, the
        tensors, the accepted shares by task, the excluded sites), or ``None`` where the gene
        panel is too large or no site sent moments (the bundle then has latent prototypes
        only)."""
        from scarches_fl import _expression_sums as ES
        from scarches_fl import _federated_expression as FE

        n_genes = len(self.genes or [])
        if n_genes > ES.EXACT_PCA_MAX_GENES:
            log.warning(
                "no expression prototypes: %d genes is more than the %d whose covariance sites "
                "send; train on fewer genes (--n-top-genes) for map's default label rule",
                n_genes,
                ES.EXACT_PCA_MAX_GENES,
            )
            return None
        excluded: list[dict[str, Any]] = []

        def read(task: str, got: Mapping[str, Any], parse: Any) -> dict[str, Any]:
            out = {}
            for site, (payload, arrays, _env) in sorted(got.items()):
                if not arrays:
                    excluded.append({"site_id": site, "task": task, "reason": "below_floor"})
                    continue
                try:
                    out[site] = parse(site, payload, arrays)
                except ValueError as exc:
                    excluded.append(
                        {"site_id": site, "task": task, "reason": "malformed",
                         "detail": str(exc)[:200]}
                    )
            return out

        task = "expression_moments"
        got_moments, ex = self._label_exchange(task, tensors, model_digest, config)
        excluded += ex
        moments = read(
            task, got_moments, lambda _s, _p, a: ES.moments_from_arrays(a, n_genes=n_genes)
        )
        if not moments or sum(m.n for m in moments.values()) < 3:
            log.warning("no expression prototypes: no site sent the moments of its cells")
            return None
        p, projection, n_cells = FE.federated_subspace(list(moments.values()), n_genes)
        config = {
            **config,
            "expression-n-components": p,
            "expression-gene-mean": projection[0].astype("<f4").tobytes(),
            "expression-components": projection[1].astype("<f4").tobytes(),
            "expression-classes": json.dumps(list(classes)).encode(),
        }
        task = "expression_statistics"
        got_groups, ex = self._label_exchange(
            task, tensors, model_digest, config, per_site={site: {} for site in moments}
        )
        excluded += ex
        groups = read(
            task,
            got_groups,
            lambda site, payload, a: ES.sums_from_arrays(
                payload["types"],
                a,
                n_components=p,
                classes=classes,
                floor=int(self.s.label_site_floor),
                batch_prefix=f"{site}/",
            ),
        )
        if not groups:
            log.warning("no expression prototypes: no site sent sums over the site floor")
            return None
        model = ES.type_model(ES.pool_sums(list(groups.values())), p)
        per_site = {
            site: {
                "expression-model": ES.model_to_json(FE.site_view(model, site)),
                "expression-kappa": float(ES.DEFAULT_KAPPA),
            }
            for site in groups
        }
        task = "expression_calibration"
        got_calib, ex = self._label_exchange(
            task, tensors, model_digest, config, per_site=per_site
        )
        excluded += ex
        calibration = read(task, got_calib, lambda _s, _p, a: FE.check_calibration_arrays(a))
        try:
            projection_info, level, out_tensors = FE.federated_expression(
                model, projection, p, n_cells, list(calibration.values())
            )
        except ValueError as exc:
            log.warning("no expression prototypes: %s", exc)
            return None
        exchanged: list[tuple[str, Mapping[str, Any], set[str]]] = [
            ("expression_moments", got_moments, set(moments)),
            ("expression_statistics", got_groups, set(groups)),
            ("expression_calibration", got_calib, set(calibration)),
        ]
        return projection_info, level, out_tensors, exchanged, excluded

    # -- the initial model ------------------------------------------------------------------

    def _wait_for_sites(self) -> list[str]:
        """Describe the connected nodes until ``min_sites`` sites did (or the wait is over);
        the sorted site ids."""
        s = self.s
        deadline = time.monotonic() + s.wait_for_sites
        while True:
            self._describe(self.grid.get_node_ids())
            if len(set(self.node_site.values())) >= s.min_sites or time.monotonic() > deadline:
                break
            time.sleep(1.0)
        sites = sorted(set(self.node_site.values()))
        if len(sites) < s.min_sites or self.genes is None:
            raise FederationError(
                f"only {len(sites)} enrolled sites described themselves, {s.min_sites} needed; "
                "check that the SuperNodes are connected and their site keys are enrolled"
            )
        return sites

    def _adopt(self, bundle: Any) -> None:
        """Start from ``bundle`` (the ledger's current model): its genes, conditions,
        hyperparameters and registration; the run id and label key of the step that designed
        it, so that its records name the same run."""
        manifest = bundle.manifest
        self.genes = [str(g) for g in bundle.genes]
        self.conditions = [str(c) for c in bundle.conditions]
        self.fixed_conditions = True
        self.hp = dict(manifest["hyperparameters"])
        self.registration = dict(manifest.get("registration", {}))
        federated = self.registration.get("federated") or {}
        if federated.get("run_id"):
            self.run_id = str(federated["run_id"])
        self.label_key = self.registration.get("label_key") or None

    def _design(self, sites: list[str]) -> dict[str, np.ndarray]:
        """The initial model from the sites' descriptors: conditions, hyperparameters,
        registration, seeded weights."""
        from scarches_fl import _federated as F
        from scarches_fl.module import default_hyperparameters

        s = self.s
        self.conditions = F.condition_list(
            {site: sorted(self.site_studies[site]) for site in sites}
        )
        # With a label key the model gets the classifier head a central reference trained with
        # labels has (semi-supervised; ADR 0036): its classes are the types the sites announced.
        classes = sorted({t for site in sites for t in self.site_label_types.get(site, [])})
        self.hp = default_hyperparameters(
            likelihood=s.likelihood,
            n_hidden=s.n_hidden,
            n_layers=s.n_layers,
            n_latent=s.n_latent,
            n_labels=len(classes),
            classifier_weight=float(s.classifier_weight) if classes else 0.0,
        )
        self.registration = {
            "batch_key": s.batch_key,
            "label_key": self.label_key,
            "layer": None,
            "likelihood": s.likelihood,
            "input": (
                "raw counts; encoder sees log1p(x)"
                if s.likelihood == "nb"
                else "counts; encoder and reconstruction use log1p(x / total * 1e4)"
            ),
            "federated": {
                "run_id": self.run_id,
                "sites": sites,
                "aggregation": "fedavg-cells" + ("+fedprox" if s.prox_mu > 0 else ""),
                "n_cells": int(sum(sum(v.values()) for v in self.site_studies.values())),
            },
        }
        if classes:
            self.registration["classifier_classes"] = classes
        return F.initial_tensors(self.hp, len(self.genes or []), len(self.conditions), seed=s.seed)

    def _verify_descriptors(self) -> list[str]:
        """Once a ledger gives the keys: every descriptor read before must verify under its
        site's key; a site without an active key, or whose descriptor does not verify, is left
        out. The sorted site ids that remain."""
        assert self.site_keys is not None
        for site, env in sorted(self.descriptors.items()):
            try:
                if site not in self.site_keys:
                    raise FederationError(f"site {site!r} has no active key in the ledger")
                open_envelope(env, DESCRIPTOR_PAYLOAD_TYPE, self.site_keys[site])
            except FederationError as exc:
                log.warning("site %s left out: %s", site, exc)
                self.node_site = {n: v for n, v in self.node_site.items() if v != site}
                self.site_studies.pop(site, None)
                del self.descriptors[site]
        sites = sorted(set(self.node_site.values()))
        if len(sites) < self.s.min_sites:
            raise FederationError(
                f"only {len(sites)} sites verify under the ledger's keys, "
                f"{self.s.min_sites} needed"
            )
        return sites

    def _initial_model_only(self, bundle: Any, sites: list[str]) -> FederationResult:
        """``federate init-model``: the initial model is written; say what it is built from
        (each site's studies and the key id its descriptor names, to check against the keys
        the operator enrols)."""
        from protocols.bundle import atomic_write

        announced = {
            site: {
                "key_id": str(peek_payload(self.descriptors[site]).get("key_id", "")),
                "studies": dict(sorted(self.site_studies[site].items())),
            }
            for site in sites
        }
        summary = {
            "run_id": self.run_id,
            "initial_model": str(self.out / "models" / "round-0000"),
            "initial_digest": bundle.digest,
            "sites": announced,
            "conditions": self.conditions,
            "genes": len(self.genes or []),
        }
        atomic_write(
            self.out / "initial-model.json",
            json.dumps(summary, indent=2, sort_keys=True).encode(),
        )
        return FederationResult(
            run_id=self.run_id,
            bundle_dir=str(self.out / "models" / "round-0000"),
            bundle_digest=bundle.digest,
            final_round=0,
            rounds=[],
            conditions=self.conditions,
            sites=sites,
            stopped_early=False,
            aggregate_digest=bundle.digest,
        )

    # -- the run ----------------------------------------------------------------------------

    def run(self) -> FederationResult:
        from coordinator.federated_strategy import (
            FederationModel,
            OwnedColumnsFedAvg,
            arrays_to_record,
        )
        from protocols.bundle import atomic_write, write_bundle

        s = self.s
        self.records_dir.mkdir(parents=True, exist_ok=True)
        if s.initial_model is not None:
            self._adopt(s.initial_model)
        elif self.site_keys is None and not s.init_only and s.trust_initial_model is None:
            raise FederationError(
                "no site keys: a run takes them from the coordinator's ledger "
                "(`federate run --ledger STATE`)"
            )
        sites = self._wait_for_sites()
        if s.initial_model is not None:
            tensors = {k: np.asarray(v) for k, v in s.initial_model.tensors.items()}
            base_bundle = self._model_bundle(tensors)
            if base_bundle.digest != s.initial_model.digest:
                raise FederationError(
                    f"the ledger's model {s.initial_model.digest} is not one this run can "
                    f"rebuild (got {base_bundle.digest}); start from the model "
                    "`federate init-model` wrote"
                )
        else:
            tensors = self._design(sites)
            base_bundle = self._model_bundle(tensors)
        initial_digest = base_bundle.digest
        if s.keep_models or s.init_only:
            write_bundle(self.out / "models" / "round-0000", base_bundle)
        if s.init_only:
            return self._initial_model_only(base_bundle, sites)
        if s.initial_model is None and s.trust_initial_model is not None:
            self.site_keys, self.coordinator_key = s.trust_initial_model(base_bundle)
            sites = self._verify_descriptors()
        G, C = len(self.genes or []), len(self.conditions)
        warmup = _kl_warmup(s)
        strategy = OwnedColumnsFedAvg(
            FederationModel(
                run_id=self.run_id,
                hp=self.hp,
                n_genes=G,
                conditions=self.conditions,
                site_keys=self.site_keys or {},
                node_site=self.node_site,
                describe=lambda: self._describe(self.grid.get_node_ids()),
                bundle_digest=lambda t: self._model_bundle(t).digest,
                on_round=self._on_round,
                manifest_bytes=json.dumps(base_bundle.manifest, sort_keys=True).encode(),
                settings=s,
                warmup_rounds=warmup,
            ),
            num_rounds=s.rounds,
        )
        log.info(
            "federated run %s: %d sites, %d conditions, %d genes, up to %d rounds",
            self.run_id,
            len(sites),
            C,
            G,
            s.rounds,
        )
        strategy.start(
            grid=self.grid,
            initial_arrays=arrays_to_record(tensors),
            num_rounds=s.rounds,
            timeout=s.round_timeout,
        )
        records = strategy.records
        best_round, best_tensors = strategy.final_model()
        final_model = self._model_bundle(best_tensors)
        recorded = {r.round: r.aggregate_digest for r in records}
        if recorded.get(best_round) != final_model.digest:
            raise FederationError("internal: the final bundle is not a recorded aggregate")
        bundle, labels_named = final_model, None
        if self.label_key:
            labels, labels_named = self._label_knowledge(
                best_tensors, final_model.digest, strategy.model.manifest_bytes
            )
            bundle = self._model_bundle(
                best_tensors, labels=labels, extra_tensors=self.label_tensors
            )
        bundle_dir = Path(s.bundle_dir) if s.bundle_dir else self.out / "bundle"
        write_bundle(bundle_dir, bundle)
        run_payload = {
            "kind": "federated_run",
            "run_id": self.run_id,
            "initial_digest": initial_digest,
            "sites": sites,
            "conditions": self.conditions,
            "rounds": len(records),
            "stopped_early": strategy.stopped,
            "settings": {
                "local_epochs": s.local_epochs,
                "lr": s.lr,
                "prox_mu": s.prox_mu,
                "kl_warmup_rounds": warmup,
                "patience": s.patience,
                "batch_size": s.batch_size,
                "seed": s.seed,
            },
            "final": {
                "round": best_round,
                "aggregate_digest": final_model.digest,
                "bundle_digest": bundle.digest,
                **({"labels": labels_named} if labels_named else {}),
            },
        }
        self._sign_and_write("run.json", RUN_PAYLOAD_TYPE, run_payload)
        summary = {
            "run_id": self.run_id,
            "bundle": str(bundle_dir),
            "bundle_digest": bundle.digest,
            "final_round": best_round,
            "sites": sites,
            "conditions": self.conditions,
            "stopped_early": strategy.stopped,
            "rounds": [asdict(r) for r in records],
        }
        atomic_write(
            self.out / "federation-summary.json",
            json.dumps(summary, indent=2, sort_keys=True).encode(),
        )
        return FederationResult(
            run_id=self.run_id,
            bundle_dir=str(bundle_dir),
            bundle_digest=bundle.digest,
            final_round=best_round,
            rounds=records,
            conditions=self.conditions,
            sites=sites,
            stopped_early=strategy.stopped,
            aggregate_digest=final_model.digest,
        )


def run_federation(grid: Any, settings: FederationSettings) -> FederationResult:
    """Run a whole federated training on ``grid`` (any Flower Grid)."""
    return _Federation(grid, settings).run()


def build_server_app(settings: FederationSettings) -> ServerApp:
    """A ``ServerApp`` bound to ``settings`` (the Simulation Engine path)."""
    from flwr.serverapp import ServerApp

    server_app = ServerApp()

    @server_app.main()
    def _main(grid: Any, context: Any) -> None:
        result = run_federation(grid, settings)
        settings.extra["result"] = result

    return server_app


def settings_from_run_config(run_config: Mapping[str, Any]) -> FederationSettings:
    """Deployment: the run config written by ``scarches-fl federate init-model`` (``init-only``:
    design and write the initial model, no keys yet) or ``federate run`` (``ledger``: the
    coordinator state directory whose replayed ledger gives the site keys, the operator key
    that signs the records, and the initial model), with the training budget."""

    def get(key: str, default: Any) -> Any:
        return run_config.get(key, default)

    init_only = bool(get("init-only", False))
    site_keys: Mapping[str, Any] | None = None
    coordinator_key: Any = None
    initial_model: Any = None
    if not init_only:
        from coordinator.federated_ledger import run_keys

        ledger = str(get("ledger", ""))
        if not ledger:
            raise FederationError(
                "the run config names no ledger; start the run with "
                "`scarches-fl federate run --ledger STATE`"
            )
        keys = run_keys(ledger)
        site_keys, coordinator_key, initial_model = (
            keys.site_keys,
            keys.signing_key,
            keys.model,
        )
    return FederationSettings(
        out_dir=str(run_config["out"]),
        bundle_dir=str(get("bundle", "")) or None,
        site_keys=site_keys,
        coordinator_key=coordinator_key,
        initial_model=initial_model,
        init_only=init_only,
        rounds=int(get("rounds", 10)),
        local_epochs=int(get("local-epochs", 5)),
        lr=float(get("lr", 1e-3)),
        batch_size=int(get("batch-size", 128)),
        prox_mu=float(get("prox-mu", 0.0)),
        kl_warmup_rounds=int(get("kl-warmup-rounds", 0)),
        patience=int(get("patience", 5)),
        min_sites=int(get("min-sites", 1)),
        round_timeout=float(get("round-timeout", 600.0)),
        describe_timeout=float(get("describe-timeout", 120.0)),
        wait_for_sites=float(get("wait-for-sites", 60.0)),
        seed=int(get("seed", 0)),
        likelihood=str(get("likelihood", "nb")),
        n_hidden=int(get("n-hidden", 128)),
        n_layers=int(get("n-layers", 2)),
        n_latent=int(get("n-latent", 10)),
        batch_key=str(get("batch-key", "batch")),
        label_key=str(get("label-key", "")) or None,
        label_min_cells=int(get("label-min-cells", 5)),
        label_site_floor=int(get("label-site-floor", 5)),
    )


def _make_deployment_app() -> ServerApp:
    from flwr.serverapp import ServerApp

    server_app = ServerApp()

    @server_app.main()
    def _main(grid: Any, context: Any) -> None:
        # The ServerApp process is Flower's: show our round log in the run's log stream.
        pkg = logging.getLogger("coordinator")
        if not pkg.handlers:
            handler = logging.StreamHandler()
            handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
            pkg.addHandler(handler)
            pkg.setLevel(logging.INFO)
        settings = settings_from_run_config(context.run_config)
        result = run_federation(grid, settings)
        if settings.init_only:
            log.info(
                "initial model %s of %d sites written to %s",
                result.bundle_digest,
                len(result.sites),
                result.bundle_dir,
            )
            return
        log.info(
            "federated reference %s (round %d) written to %s",
            result.bundle_digest,
            result.final_round,
            result.bundle_dir,
        )

    return server_app


app: ServerApp | None
try:  # the Deployment Engine loads ``coordinator.federated_server:app``
    app = _make_deployment_app()
except ImportError:  # pragma: no cover - flwr not installed (extra "flower")
    app = None
