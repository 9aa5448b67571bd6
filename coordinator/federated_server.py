"""The coordinator's Flower ServerApp for federated reference training.

One run (see ``docs/federated.md``):

1. **Describe.** Every connected SuperNode is asked (``query``) for its signed site descriptor:
   site id, the studies it holds with cell counts, its gene list. Sites not enrolled in the
   policy, or whose genes differ from the first site's, are left out (and say so in the log).
   The global condition list is ``<site_id>/<study>`` sorted; the coordinator seeds the initial
   weights.
2. **Rounds.** Each round sends the current model (all tensors, the manifest, the KL weight of
   the round) as a ``train`` message to every described site still connected. A site replies
   with its shared tensors, its own condition columns, its cell counts, and the validation loss
   of the model it received, all bound by its signature. Contributions are verified
   (``protocols.federated.verify_contribution``); the accepted ones are aggregated
   (``scarches_fl._federated.aggregate``: FedAvg by cells for shared tensors, condition columns
   from their owner only). A site that does not answer within the round timeout, or answers with
   an error, is recorded as missing; the round completes with the others; the site is asked
   again next round.
3. **Stop.** Early stopping on the cell-weighted validation loss (after the KL warm-up); a final
   ``evaluate`` exchange scores the last aggregate. The best aggregate becomes the federated
   reference bundle (a genesis for ``coordinator init``; sites extend it by surgery).
4. **Records.** Every round is a ``federated_round`` record signed by the coordinator key, with
   the contribution envelopes beside it; the run record names the initial and final digests.
"""

from __future__ import annotations

import json
import logging
import math
import secrets
import time
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from protocols.federated import (
    DESCRIPTOR_PAYLOAD_TYPE,
    ROUND_PAYLOAD_TYPE,
    RUN_PAYLOAD_TYPE,
    ContributionRejected,
    FederationError,
    envelope_sha256,
    open_envelope,
    peek_payload,
    sign_payload,
    tensor_digest,
    verify_contribution,
)

__all__ = [
    "FederationSettings",
    "FederationResult",
    "RoundRecord",
    "run_federation",
    "build_server_app",
    "app",
]

log = logging.getLogger(__name__)

@dataclass
class FederationSettings:
    """Everything the ServerApp needs. ``site_keys``: site id -> Ed25519 public key (the
    policy); ``coordinator_key``: the Ed25519 private key that signs round records."""

    out_dir: str  # signed records, summary
    site_keys: Mapping[str, Any]
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
    run_id: str = ""
    bundle_dir: str | None = None  # default: <out_dir>/bundle
    keep_models: bool = True  # write the initial model and every aggregate under out_dir/models
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class RoundRecord:
    round: int
    base_digest: str
    aggregate_digest: str
    kl_weight: float
    contributors: list[dict[str, Any]]
    excluded: list[dict[str, Any]]
    missing: list[str]
    validation_loss: float | None
    seconds: float
    bytes_sent: int
    bytes_received: int


@dataclass
class FederationResult:
    run_id: str
    bundle_dir: str
    bundle_digest: str
    final_round: int
    rounds: list[RoundRecord]
    conditions: list[str]
    sites: list[str]
    stopped_early: bool


# -- helpers -------------------------------------------------------------------------------------


def _arrays_to_record(tensors: Mapping[str, np.ndarray]):
    from flwr.app import Array, ArrayRecord

    return ArrayRecord(
        {k: Array(np.ascontiguousarray(v, dtype=np.float32)) for k, v in tensors.items()}
    )


def _record_bytes(record: Any) -> int:
    return int(sum(len(a.data) for a in record.values()))


def _arrays_from_record(record: Any) -> dict[str, np.ndarray]:
    out: dict[str, np.ndarray] = {}
    for k, a in record.items():
        if a.dtype != "float32":
            raise ContributionRejected("malformed", f"array {k} has dtype {a.dtype}, not float32")
        arr = a.numpy()
        if not np.all(np.isfinite(arr)):
            raise ContributionRejected("non_finite", f"array {k} holds NaN or infinity")
        out[k] = arr
    return out


def _error_text(reason: Any) -> str:
    """A site's error reply, without terminal colours and engine wrapping, at most 200 chars."""
    import re

    text = re.sub(r"\x1b\[[0-9;]*m", "", str(reason))
    if "Message:" in text:
        text = text.rsplit("Message:", 1)[1]
    return " ".join(text.split())[:200]


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
        self.genes: list[str] | None = None
        self.bytes_sent = 0
        self.bytes_received = 0

    # -- messaging -------------------------------------------------------------------------

    def _exchange(
        self, contents: Mapping[int, Any], message_type: str, timeout: float
    ) -> dict[int, Any]:
        from flwr.app import Message

        messages = [
            Message(content=c, dst_node_id=int(n), message_type=message_type)
            for n, c in contents.items()
        ]
        for c in contents.values():
            if "arrays" in c.array_records:
                self.bytes_sent += _record_bytes(c.array_records["arrays"])
        replies = self.grid.send_and_receive(messages, timeout=timeout)
        out: dict[int, Any] = {}
        for r in replies:
            out[int(r.metadata.src_node_id)] = r
            if r.has_content() and "arrays" in r.content.array_records:
                self.bytes_received += _record_bytes(r.content.array_records["arrays"])
        return out

    def _describe(self, node_ids: Iterable[int]) -> None:
        from flwr.app import ConfigRecord, RecordDict

        # A node that failed to describe itself is not asked again (each ask costs up to
        # describe_timeout in a deployment); a site that reconnects gets a new node id.
        ask = [n for n in node_ids if n not in self.node_site and n not in self.left_out]
        if not ask:
            return
        contents = {n: RecordDict({"config": ConfigRecord({"run-id": self.run_id})}) for n in ask}
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
                if site not in self.s.site_keys:
                    raise FederationError(f"site {site!r} is not enrolled in the policy")
                desc = open_envelope(env, DESCRIPTOR_PAYLOAD_TYPE, self.s.site_keys[site])
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
            except (FederationError, KeyError, TypeError, ValueError) as exc:
                log.warning("node %s left out: %s", node, exc)
                self.left_out.add(node)
                continue
            if site in self.node_site.values():
                # A site that reconnected under a new node id: forget the old id.
                self.node_site = {k: v for k, v in self.node_site.items() if v != site}
            self.node_site[node] = site
            self.site_studies.setdefault(site, studies)
            log.info(
                "node %s is site %s with %d studies, %d cells",
                node,
                site,
                len(studies),
                sum(studies.values()),
            )

    # -- model bookkeeping ------------------------------------------------------------------

    def _model_bundle(self, tensors: Mapping[str, np.ndarray]) -> Any:
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
        )
        return model.to_bundle()

    def _sign_and_write(self, name: str, payload_type: str, payload: Mapping[str, Any]) -> bytes:
        from protocols.bundle import atomic_write

        env = sign_payload(self.s.coordinator_key, payload_type, payload)
        atomic_write(self.records_dir / name, env)
        return env

    # -- the run ----------------------------------------------------------------------------

    def run(self) -> FederationResult:
        from protocols.bundle import atomic_write, write_bundle
        from scarches_fl import _federated as F
        from scarches_fl.module import default_hyperparameters

        s = self.s
        self.records_dir.mkdir(parents=True, exist_ok=True)
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
        self.conditions = F.condition_list(
            {site: sorted(self.site_studies[site]) for site in sites}
        )
        self.owners = {i: c.split("/", 1)[0] for i, c in enumerate(self.conditions)}
        self.site_conditions = {
            site: [c for c in self.conditions if c.split("/", 1)[0] == site] for site in sites
        }
        self.hp = default_hyperparameters(
            likelihood=s.likelihood, n_hidden=s.n_hidden, n_layers=s.n_layers, n_latent=s.n_latent
        )
        G, C = len(self.genes), len(self.conditions)
        self.registration = {
            "batch_key": s.batch_key,
            "label_key": s.label_key,
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
        tensors = F.initial_tensors(self.hp, G, C, seed=s.seed)
        base_bundle = self._model_bundle(tensors)
        manifest_bytes = json.dumps(base_bundle.manifest, sort_keys=True).encode()
        initial_digest = base_digest = base_bundle.digest
        if s.keep_models:
            write_bundle(self.out / "models" / "round-0000", base_bundle)
        warmup = _kl_warmup(s)
        stopper = F.EarlyStopping(patience=s.patience)
        best_tensors, best_round = tensors, 0
        records: list[RoundRecord] = []
        contribution_envs: dict[str, bytes] = {}
        stopped = False
        log.info(
            "federated run %s: %d sites, %d conditions, %d genes, up to %d rounds",
            self.run_id,
            len(sites),
            C,
            G,
            s.rounds,
        )
        last_round = 0
        for rnd in range(1, s.rounds + 1):
            t0 = time.perf_counter()
            sent0, recv0 = self.bytes_sent, self.bytes_received
            self._describe(self.grid.get_node_ids())
            kl_w = F.kl_weight_for_round(rnd, warmup)
            replies = self._send_model("train", tensors, base_digest, manifest_bytes, rnd, kl_w)
            accepted, excluded, missing, val = self._collect(
                replies, rnd, base_digest, with_arrays=True
            )
            contribs = [
                F.Contribution(
                    site,
                    p["n_train"],
                    tuple(self.conditions.index(c) for c in p["conditions"]),
                    arrays,
                )
                for site, (p, arrays, env) in accepted.items()
            ]
            new_tensors = F.aggregate(tensors, contribs, self.hp, G, C, self.owners)
            agg_bundle = self._model_bundle(new_tensors)
            agg_digest = agg_bundle.digest
            if s.keep_models:
                # Every aggregate, so the rounds can be appended to the coordinator's ledger
                # (``scarches-fl federate publish``).
                write_bundle(self.out / "models" / f"round-{rnd:04d}", agg_bundle)
            contributors = []
            for site, (p, _arrays, env) in sorted(accepted.items()):
                name = f"round-{rnd:04d}.{site}.contribution.json"
                atomic_write(self.records_dir / name, env)
                contribution_envs[name] = env
                contributors.append(
                    {
                        "site_id": site,
                        "key_id": p.get("key_id"),
                        "contribution_digest": p["contribution_digest"],
                        "n_train": p["n_train"],
                        "envelope_sha256": envelope_sha256(env),
                    }
                )
            rec = RoundRecord(
                round=rnd,
                base_digest=base_digest,
                aggregate_digest=agg_digest,
                kl_weight=kl_w,
                contributors=contributors,
                excluded=excluded,
                missing=missing,
                validation_loss=val,
                seconds=time.perf_counter() - t0,
                bytes_sent=self.bytes_sent - sent0,
                bytes_received=self.bytes_received - recv0,
            )
            payload = {
                "kind": "federated_round",
                "run_id": self.run_id,
                **{k: v for k, v in asdict(rec).items() if k not in ("seconds",)},
            }
            if payload["validation_loss"] is None:
                del payload["validation_loss"]
            self._sign_and_write(f"round-{rnd:04d}.json", ROUND_PAYLOAD_TYPE, payload)
            records.append(rec)
            log.info(
                "round %d: %d contributed, %d excluded, %d missing, validation %s, %.1f s",
                rnd,
                len(contributors),
                len(excluded),
                len(missing),
                f"{val:.2f}" if val is not None else "-",
                rec.seconds,
            )
            last_round = rnd
            # ``val`` scores the model of round rnd-1 (what the sites received).
            prev_warm = rnd - 1 >= 1 and F.kl_weight_for_round(rnd - 1, warmup) >= 1.0
            if val is not None and prev_warm and val < stopper.best - stopper.min_delta:
                best_tensors, best_round = tensors, rnd - 1
            if stopper.update(rnd - 1, val, warm=prev_warm):
                stopped = True
                tensors, base_digest = new_tensors, agg_digest
                log.info("early stopping after round %d (best round %s)", rnd, best_round)
                break
            tensors, base_digest = new_tensors, agg_digest
        if not stopped:
            # Score the last aggregate with one evaluate exchange.
            replies = self._send_model(
                "evaluate", tensors, base_digest, manifest_bytes, last_round + 1, 1.0
            )
            _, _, _, val = self._collect(replies, last_round + 1, base_digest, with_arrays=False)
            warm = F.kl_weight_for_round(last_round, warmup) >= 1.0
            if val is not None and warm and val < stopper.best - stopper.min_delta:
                best_tensors, best_round = tensors, last_round
                stopper.update(last_round, val, warm=warm)
            if best_round == 0:
                best_tensors, best_round = tensors, last_round
        if best_round == 0:
            best_tensors, best_round = tensors, last_round
        bundle = self._model_bundle(best_tensors)
        recorded = {r.round: r.aggregate_digest for r in records}
        if recorded.get(best_round) != bundle.digest:
            raise FederationError("internal: the final bundle is not a recorded aggregate")
        bundle_dir = Path(s.bundle_dir) if s.bundle_dir else self.out / "bundle"
        write_bundle(bundle_dir, bundle)
        run_payload = {
            "kind": "federated_run",
            "run_id": self.run_id,
            "initial_digest": initial_digest,
            "sites": sites,
            "conditions": self.conditions,
            "rounds": len(records),
            "stopped_early": stopped,
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
                "aggregate_digest": bundle.digest,
                "bundle_digest": bundle.digest,
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
            "stopped_early": stopped,
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
            stopped_early=stopped,
        )

    def _check_shapes(self, site: str, arrays: Mapping[str, np.ndarray]) -> None:
        """Exactly the model's tensors, condition tensors holding the site's own columns."""
        from scarches_fl.module import tensor_specs

        specs = tensor_specs(self.hp, len(self.genes or []), len(self.conditions))
        if set(arrays) != set(specs):
            raise ContributionRejected(
                "wrong_tensors", f"tensor names {sorted(set(arrays) ^ set(specs))[:5]} differ "
                "from the model's")
        from scarches_fl._federated import contribution_shape_error

        problem = contribution_shape_error(specs, arrays, len(self.site_conditions[site]))
        if problem:
            raise ContributionRejected("wrong_tensors", problem)

    def _send_model(
        self,
        message_type: str,
        tensors: Mapping[str, np.ndarray],
        base_digest: str,
        manifest_bytes: bytes,
        rnd: int,
        kl_weight: float,
    ) -> dict[str, Any]:
        from flwr.app import ConfigRecord, RecordDict

        s = self.s
        targets = {n: site for n, site in self.node_site.items() if site in self.site_conditions}
        contents = {}
        arrays = _arrays_to_record(tensors)
        for node in targets:
            cfg = ConfigRecord(
                {
                    "run-id": self.run_id,
                    "round": int(rnd),
                    "kl-weight": float(kl_weight),
                    "local-epochs": int(s.local_epochs),
                    "lr": float(s.lr),
                    "batch-size": int(s.batch_size),
                    "prox-mu": float(s.prox_mu),
                    "seed": int(s.seed),
                    "base-digest": base_digest,
                    "manifest": manifest_bytes,
                }
            )
            contents[node] = RecordDict({"arrays": arrays, "config": cfg})
        timeout = s.round_timeout
        replies = self._exchange(contents, message_type, timeout) if contents else {}
        return {"targets": targets, "replies": replies}

    def _collect(self, sent: Mapping[str, Any], rnd: int, base_digest: str, *, with_arrays: bool):

        targets, replies = sent["targets"], sent["replies"]
        accepted: dict[str, tuple[dict[str, Any], dict[str, np.ndarray], bytes]] = {}
        excluded: list[dict[str, Any]] = []
        missing: list[str] = []
        val_sum, val_n = 0.0, 0
        answered_sites = set()
        for node, site in sorted(targets.items(), key=lambda kv: kv[1]):
            reply = replies.get(node)
            if reply is None:
                continue
            if reply.has_error():
                excluded.append(
                    {
                        "site_id": site,
                        "reason": "site_error",
                        "detail": _error_text(reply.error.reason),
                    }
                )
                answered_sites.add(site)
                continue
            answered_sites.add(site)
            try:
                content = reply.content
                env = bytes(content.config_records["signature"]["envelope"])
                arrays = _arrays_from_record(content.array_records["arrays"]) if with_arrays else {}
                payload = verify_contribution(
                    env,
                    site_keys=self.s.site_keys,
                    run_id=self.run_id,
                    server_round=rnd,
                    base_digest=base_digest,
                    arrays_digest=tensor_digest(arrays),
                    expected_conditions=self.site_conditions,
                )
                if payload["site_id"] != site:
                    raise ContributionRejected(
                        "wrong_site",
                        f"node of site {site} sent a contribution signed as {payload['site_id']}",
                    )
                kind = "contribution" if with_arrays else "evaluation"
                if payload.get("kind") != kind:
                    raise ContributionRejected("malformed", f"payload kind is not {kind}")
                if with_arrays:
                    self._check_shapes(site, arrays)
            except ContributionRejected as exc:
                log.warning("round %d: contribution of %s excluded: %s", rnd, site, exc)
                excluded.append({"site_id": site, "reason": exc.reason, "detail": str(exc)[:200]})
                continue
            except (KeyError, TypeError, ValueError) as exc:
                excluded.append({"site_id": site, "reason": "malformed", "detail": str(exc)[:200]})
                continue
            v, nv = payload.get("validation_loss_sum"), payload.get("n_validation")
            if isinstance(v, (int, float)) and isinstance(nv, int) and nv > 0 and math.isfinite(v):
                val_sum += float(v)
                val_n += nv
            accepted[site] = (payload, arrays, env)
        for site in sorted(self.site_conditions):
            if site not in answered_sites:
                missing.append(site)
        val = val_sum / val_n if val_n > 0 else None
        return accepted, excluded, missing, val


def run_federation(grid: Any, settings: FederationSettings) -> FederationResult:
    """Run a whole federated training on ``grid`` (any Flower Grid)."""
    return _Federation(grid, settings).run()


def build_server_app(settings: FederationSettings):
    """A ``ServerApp`` bound to ``settings`` (the Simulation Engine path)."""
    from flwr.serverapp import ServerApp

    server_app = ServerApp()

    @server_app.main()
    def _main(grid: Any, context: Any) -> None:
        result = run_federation(grid, settings)
        settings.extra["result"] = result

    return server_app


def settings_from_run_config(run_config: Mapping[str, Any]) -> FederationSettings:
    """Deployment: the run config written by ``scarches-fl federate run`` names the
    coordinator key, the policy file and the training budget."""
    from coordinator.federated_files import read_federation_policy
    from protocols.keys import load_private_key

    def get(key: str, default: Any) -> Any:
        return run_config.get(key, default)

    policy = read_federation_policy(Path(str(run_config["policy"]))).sites
    label_key = str(get("label-key", "")) or None
    return FederationSettings(
        out_dir=str(run_config["out"]),
        bundle_dir=str(get("bundle", "")) or None,
        site_keys=policy,
        coordinator_key=load_private_key(Path(str(run_config["coordinator-key"]))),
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
        label_key=label_key,
    )


def _make_deployment_app():
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
        result = run_federation(grid, settings_from_run_config(context.run_config))
        log.info("federated reference %s (round %d) written to %s", result.bundle_digest,
                 result.final_round, result.bundle_dir)

    return server_app


try:  # the Deployment Engine loads ``coordinator.federated_server:app``
    app = _make_deployment_app()
except ImportError:  # pragma: no cover - flwr not installed (extra "flower")
    app = None
