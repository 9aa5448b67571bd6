"""The aggregation of federated reference training as a Flower ``Strategy``.

:class:`OwnedColumnsFedAvg` subclasses Flower 1.41's ``flwr.serverapp.strategy.FedAvg`` (the
Message API: ``configure_train`` / ``aggregate_train`` / ``configure_evaluate`` /
``aggregate_evaluate``, driven by ``Strategy.start``) and changes what FedAvg would do in three
ways:

* **Condition-column ownership.** Shared tensors are averaged weighted by the cells each site
  *signed* (not by the unsigned ``num-examples`` metric); a condition column is taken only from
  the site that owns the study, never averaged (``scarches_fl._federated.aggregate``).
* **Verified replies.** A reply enters the aggregate only when its DSSE envelope verifies under
  the site's enrolled key and binds this run, this round, the model sent, and exactly the arrays
  received (``protocols.federated.verify_contribution``), and its tensors have the model's shapes
  with the site's own columns. Everything else is excluded with a reason and recorded.
* **Records and early stopping.** Every round ends in a ``federated_round`` record signed by the
  coordinator key. Each site scores the model it *received* on its held-out cells; the
  cell-weighted mean drives early stopping (after the KL warm-up). Once stopped, later rounds
  send nothing. Only the last round is followed by an ``evaluate`` exchange, scoring the final
  aggregate.

The model a round sends is the previous round's aggregate; the one the run keeps is the best
aggregate by validation loss (:attr:`OwnedColumnsFedAvg.best_round`).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from protocols.federated import (
    ContributionRejected,
    envelope_sha256,
    tensor_digest,
    verify_contribution,
)
from scarches_fl import _federated as F

__all__ = ["OwnedColumnsFedAvg", "RoundRecord", "FederationModel", "arrays_to_record"]

log = logging.getLogger(__name__)


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
class FederationModel:
    """What the strategy needs to know about the run the coordinator set up: the model's shape,
    who owns which condition column, the keys, and the callbacks that touch the disk."""

    run_id: str
    hp: Mapping[str, Any]
    n_genes: int
    conditions: list[str]
    site_keys: Mapping[str, Any]
    node_site: dict[int, str]  # node id -> site id (updated by ``describe``)
    describe: Callable[[], None]  # ask newly connected nodes who they are
    bundle_digest: Callable[[Mapping[str, np.ndarray]], str]  # content digest of a model
    on_round: Callable[[RoundRecord, Mapping[str, bytes], Mapping[str, np.ndarray]], None]
    manifest_bytes: bytes
    settings: Any  # FederationSettings: epochs, lr, batch size, prox, seed, patience, warm-up
    warmup_rounds: int
    owners: dict[int, str] = field(init=False)
    site_conditions: dict[str, list[str]] = field(init=False)

    def __post_init__(self) -> None:
        self.owners = {i: c.split("/", 1)[0] for i, c in enumerate(self.conditions)}
        sites = sorted(set(self.owners.values()))
        self.site_conditions = {
            s: [c for c in self.conditions if c.split("/", 1)[0] == s] for s in sites
        }


def arrays_to_record(tensors: Mapping[str, np.ndarray]) -> ArrayRecord:
    return ArrayRecord(
        {k: Array(np.ascontiguousarray(v, dtype=np.float32)) for k, v in tensors.items()}
    )


def _record_bytes(record: ArrayRecord) -> int:
    return int(sum(len(a.data) for a in record.values()))


def _arrays_from_record(record: ArrayRecord) -> dict[str, np.ndarray]:
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


class OwnedColumnsFedAvg(FedAvg):
    """FedAvg over verified, signed contributions with the condition-column ownership rule
    (module docstring). Drive it with ``start(grid=..., initial_arrays=..., num_rounds=...,
    timeout=round_timeout)``."""

    def __init__(self, model: FederationModel, *, num_rounds: int) -> None:
        n = max(1, len(model.site_conditions))
        super().__init__(
            fraction_train=1.0,
            fraction_evaluate=1.0,
            min_train_nodes=n,
            min_evaluate_nodes=n,
            min_available_nodes=n,
            weighted_by_key="num-examples",
        )
        self.model = model
        self.num_rounds = int(num_rounds)
        self.stopper = F.EarlyStopping(patience=model.settings.patience)
        self.stopped = False
        self.records: list[RoundRecord] = []
        self.last_round = 0
        self.best_round = 0
        self.best_tensors: dict[str, np.ndarray] | None = None
        self._current: tuple[ArrayRecord, dict[str, np.ndarray], str] | None = None
        self._targets: dict[int, str] = {}
        self._sent_bytes = 0
        self._t0 = 0.0
        self._kl = 1.0

    # -- Strategy API --------------------------------------------------------------------

    def summary(self) -> None:
        log.info(
            "OwnedColumnsFedAvg: %d sites, %d conditions; shared tensors by signed cells, "
            "condition columns from their owner only; patience %d after %d warm-up rounds",
            len(self.model.site_conditions),
            len(self.model.conditions),
            self.stopper.patience,
            self.model.warmup_rounds,
        )

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        if self.stopped:
            return []
        self._t0 = time.perf_counter()
        self.model.describe()
        self._kl = F.kl_weight_for_round(server_round, self.model.warmup_rounds)
        return self._messages(server_round, arrays, MessageType.TRAIN, self._kl)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        if self.stopped or self._current is None:
            return None, None
        record, tensors, base_digest = self._current
        sent = self._sent_bytes
        accepted, excluded, missing, val, received = self._collect(
            replies, server_round, base_digest, with_arrays=True
        )
        m = self.model
        contribs = [
            F.Contribution(
                site, p["n_train"], tuple(m.conditions.index(c) for c in p["conditions"]), arrays
            )
            for site, (p, arrays, _env) in accepted.items()
        ]
        new_tensors = F.aggregate(tensors, contribs, m.hp, m.n_genes, len(m.conditions), m.owners)
        agg_digest = m.bundle_digest(new_tensors)
        contributors, envelopes = [], {}
        for site, (p, _arrays, env) in sorted(accepted.items()):
            envelopes[site] = env
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
            round=server_round,
            base_digest=base_digest,
            aggregate_digest=agg_digest,
            kl_weight=self._kl,
            contributors=contributors,
            excluded=excluded,
            missing=missing,
            validation_loss=val,
            seconds=time.perf_counter() - self._t0,
            bytes_sent=sent,
            bytes_received=received,
        )
        m.on_round(rec, envelopes, new_tensors)
        self.records.append(rec)
        self.last_round = server_round
        log.info(
            "round %d: %d contributed, %d excluded, %d missing, validation %s, %.1f s",
            server_round,
            len(contributors),
            len(excluded),
            len(missing),
            f"{val:.2f}" if val is not None else "-",
            rec.seconds,
        )
        # ``val`` scores the model of round server_round - 1 (what the sites received).
        prev_warm = (
            server_round - 1 >= 1
            and F.kl_weight_for_round(server_round - 1, m.warmup_rounds) >= 1.0
        )
        if val is not None and prev_warm and val < self.stopper.best - self.stopper.min_delta:
            self.best_tensors, self.best_round = tensors, server_round - 1
        if self.stopper.update(server_round - 1, val, warm=prev_warm):
            self.stopped = True
            log.info("early stopping after round %d (best round %s)", server_round, self.best_round)
        out = arrays_to_record(new_tensors)
        self._current = (out, new_tensors, agg_digest)
        metrics: dict[str, int | float | list[int] | list[float]] = {
            "num-examples": int(sum(c["n_train"] for c in contributors))
        }
        if val is not None:
            metrics["validation-loss"] = float(val)
        return out, MetricRecord(metrics)

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        # Each round's train replies already score the model sent; only the final aggregate
        # needs an evaluate exchange of its own.
        if self.stopped or server_round != self.num_rounds:
            self._targets = {}
            return []
        return self._messages(server_round + 1, arrays, MessageType.EVALUATE, 1.0)

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        if not self._targets or self._current is None:
            return None
        _, tensors, digest = self._current
        _, _, _, val, _ = self._collect(replies, server_round + 1, digest, with_arrays=False)
        warm = F.kl_weight_for_round(self.last_round, self.model.warmup_rounds) >= 1.0
        if val is not None and warm and val < self.stopper.best - self.stopper.min_delta:
            self.best_tensors, self.best_round = tensors, self.last_round
            self.stopper.update(self.last_round, val, warm=warm)
        return MetricRecord({"validation-loss": float(val)}) if val is not None else None

    # -- the run's choice ---------------------------------------------------------------

    def final_model(self) -> tuple[int, dict[str, np.ndarray]]:
        """The round whose aggregate the run keeps and its tensors: the best by validation
        loss, or the last aggregate when no warm round was scored."""
        if self.best_round == 0 or self.best_tensors is None:
            if self._current is None:
                raise RuntimeError("no round ran")
            return self.last_round, self._current[1]
        return self.best_round, self.best_tensors

    # -- helpers ------------------------------------------------------------------------

    def _messages(
        self, rnd: int, arrays: ArrayRecord, message_type: str, kl_weight: float
    ) -> list[Message]:
        m, s = self.model, self.model.settings
        if self._current is None or arrays is not self._current[0]:
            tensors = {k: a.numpy() for k, a in arrays.items()}
            self._current = (arrays, tensors, m.bundle_digest(tensors))
        self._targets = {n: site for n, site in m.node_site.items() if site in m.site_conditions}
        cfg = ConfigRecord(
            {
                "run-id": m.run_id,
                "round": int(rnd),
                "kl-weight": float(kl_weight),
                "local-epochs": int(s.local_epochs),
                "lr": float(s.lr),
                "batch-size": int(s.batch_size),
                "prox-mu": float(s.prox_mu),
                "seed": int(s.seed),
                "base-digest": self._current[2],
                "manifest": m.manifest_bytes,
            }
        )
        self._sent_bytes = _record_bytes(arrays) * len(self._targets)
        record = RecordDict({self.arrayrecord_key: arrays, self.configrecord_key: cfg})
        return list(self._construct_messages(record, sorted(self._targets), message_type))

    def _check_shapes(self, site: str, arrays: Mapping[str, np.ndarray]) -> None:
        """Exactly the model's tensors, condition tensors holding the site's own columns."""
        from scarches_fl.module import tensor_specs

        m = self.model
        specs = tensor_specs(m.hp, m.n_genes, len(m.conditions))
        if set(arrays) != set(specs):
            raise ContributionRejected(
                "wrong_tensors",
                f"tensor names {sorted(set(arrays) ^ set(specs))[:5]} differ from the model's",
            )
        problem = F.contribution_shape_error(specs, arrays, len(m.site_conditions[site]))
        if problem:
            raise ContributionRejected("wrong_tensors", problem)

    def _collect(
        self, replies: Iterable[Message], rnd: int, base_digest: str, *, with_arrays: bool
    ) -> tuple[
        dict[str, tuple[dict[str, Any], dict[str, np.ndarray], bytes]],
        list[dict[str, Any]],
        list[str],
        float | None,
        int,
    ]:
        by_node = {int(r.metadata.src_node_id): r for r in replies}
        accepted: dict[str, tuple[dict[str, Any], dict[str, np.ndarray], bytes]] = {}
        excluded: list[dict[str, Any]] = []
        val_sum, val_n, received = 0.0, 0, 0
        answered = set()
        for node, site in sorted(self._targets.items(), key=lambda kv: kv[1]):
            reply = by_node.get(node)
            if reply is None:
                continue
            answered.add(site)
            if reply.has_error():
                excluded.append(
                    {
                        "site_id": site,
                        "reason": "site_error",
                        "detail": _error_text(reply.error.reason),
                    }
                )
                continue
            try:
                content = reply.content
                if with_arrays and "arrays" in content.array_records:
                    received += _record_bytes(content.array_records["arrays"])
                env = content.config_records["signature"]["envelope"]
                if not isinstance(env, bytes):
                    raise TypeError("the contribution's envelope is not bytes")
                arrays = _arrays_from_record(content.array_records["arrays"]) if with_arrays else {}
                payload = verify_contribution(
                    env,
                    site_keys=self.model.site_keys,
                    run_id=self.model.run_id,
                    server_round=rnd,
                    base_digest=base_digest,
                    arrays_digest=tensor_digest(arrays),
                    expected_conditions=self.model.site_conditions,
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
        missing = [s for s in sorted(self.model.site_conditions) if s not in answered]
        val = val_sum / val_n if val_n > 0 else None
        return accepted, excluded, missing, val, received
