"""Federated reference training, the Flower-free part: which site holds which study, one site's
local epochs on shared weights, and how the coordinator combines the sites' results.

No ``flwr``, no keys, no networking here (the Flower apps in ``coordinator.federated_server``
and ``site_agent.federated_client`` are thin shells around these functions; what both sides
sign and verify is :mod:`protocols.federated`).

The rules, in one place:

* Every study (batch value) is held by exactly one site; its condition is named
  ``<site_id>/<batch>``. The global condition list is sorted, so every party derives the same
  column order from the same site descriptors.
* *Shared* tensors (role ``frozen`` in the bundle: every tensor that does not grow with the
  conditions) are averaged across contributing sites, weighted by their training cell counts
  (FedAvg). With FedProx (``prox_mu > 0``) a site adds ``mu / 2 * ||w - w_global||^2`` over the
  shared tensors to its local loss.
* *Condition* tensors (``W_s`` of the encoder and the decoder, a per-condition dispersion) are
  never averaged: column ``j`` is taken from the contribution of the site that owns condition
  ``j`` and from no other site. A site sends only its own columns. When the owner did not
  contribute in a round, the column keeps its previous value.
* The KL weight of a round is decided by the coordinator (linear warm-up over rounds). Each site
  reports the negative ELBO (KL weight 1) of the model it *received* on its held-out cells; the
  coordinator averages those weighted by held-out cells and stops early on that aggregate.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import scipy.sparse as sp

__all__ = [
    "SitePlan",
    "plan_sites",
    "site_ids",
    "condition_list",
    "LocalTrainingConfig",
    "LocalResult",
    "SiteDataset",
    "make_site_dataset",
    "initial_tensors",
    "local_train",
    "validation_loss",
    "site_latent",
    "contribution_tensors",
    "Contribution",
    "aggregate",
    "kl_weight_for_round",
    "EarlyStopping",
    "contribution_shape_error",
    "shared_tensor_names",
]

log = logging.getLogger(__name__)

_SITE_ID_FORMAT = "site-{:d}"


# -- which site holds what --------------------------------------------------------------------


@dataclass(frozen=True)
class SitePlan:
    """One virtual site of a simulation: its id and, for every study it holds, the cells (row
    indices into the source AnnData)."""

    site_id: str
    studies: dict[str, np.ndarray]  # batch name (possibly "<batch>.partK") -> row indices

    @property
    def n_cells(self) -> int:
        return int(sum(len(v) for v in self.studies.values()))


def site_ids(n_sites: int) -> list[str]:
    """``site-0`` ... ``site-{n-1}`` (valid condition namespaces)."""
    return [_SITE_ID_FORMAT.format(i) for i in range(int(n_sites))]


def plan_sites(batches: Sequence[str] | np.ndarray, n_sites: int, *, seed: int = 0) -> list[SitePlan]:
    """Split the studies of one dataset over ``n_sites`` virtual sites, each study at exactly one
    site, balancing cells (largest study first, to the site with the fewest cells).

    With more sites than studies, the largest studies are divided into cell-disjoint parts named
    ``<batch>.partK`` (each part then is a study of its own, with its own condition column) until
    there is one study per site: every site holds data.
    """
    batches = np.asarray(batches).astype(str)
    n_sites = int(n_sites)
    if n_sites < 1:
        raise ValueError("the number of sites must be at least 1")
    rng = np.random.default_rng(seed)
    studies: dict[str, np.ndarray] = {
        b: np.flatnonzero(batches == b) for b in sorted(set(batches.tolist()))
    }
    if n_sites > len(batches):
        raise ValueError(f"{n_sites} sites for {len(batches)} cells: use fewer sites")
    # Split the largest study in two until there are as many studies as sites.
    parts: dict[str, list[np.ndarray]] = {b: [idx] for b, idx in studies.items()}
    while sum(len(p) for p in parts.values()) < n_sites:
        b = max(parts, key=lambda k: max(len(x) for x in parts[k]))
        largest = max(range(len(parts[b])), key=lambda i: len(parts[b][i]))
        idx = parts[b].pop(largest)
        perm = rng.permutation(idx)
        half = len(perm) // 2
        parts[b].extend([np.sort(perm[:half]), np.sort(perm[half:])])
    units: list[tuple[str, np.ndarray]] = []
    for b in sorted(parts):
        if len(parts[b]) == 1:
            units.append((b, parts[b][0]))
        else:
            for k, idx in enumerate(sorted(parts[b], key=lambda a: int(a[0]))):
                units.append((f"{b}.part{k}", idx))
    units.sort(key=lambda u: (-len(u[1]), u[0]))
    load = [0] * n_sites
    held: list[dict[str, np.ndarray]] = [{} for _ in range(n_sites)]
    for name, idx in units:
        i = min(range(n_sites), key=lambda s: (load[s], s))
        held[i][name] = idx
        load[i] += len(idx)
    ids = site_ids(n_sites)
    return [SitePlan(ids[i], dict(sorted(held[i].items()))) for i in range(n_sites)]


def condition_list(site_studies: Mapping[str, Sequence[str]]) -> list[str]:
    """The global, sorted condition list ``<site_id>/<batch>`` from every site's study names.
    Raises ``ValueError`` when two sites claim the same condition."""
    out: list[str] = []
    for site, batches in site_studies.items():
        for b in batches:
            out.append(f"{site}/{b}")
    if len(set(out)) != len(out):
        raise ValueError("two sites declared the same condition")
    return sorted(out)


# -- tensors -----------------------------------------------------------------------------------


def _specs(hp: Mapping[str, Any], n_genes: int, n_conditions: int) -> dict[str, Any]:
    from scarches_fl.module import tensor_specs

    return tensor_specs(hp, n_genes, n_conditions)


def contribution_shape_error(
    specs: Mapping[str, Any], tensors: Mapping[str, Any], n_own: int,
) -> str | None:
    """Why a contribution's tensors do not fit the model (``None`` when they do): every tensor's
    shape must be the model's, with the site's own ``n_own`` columns in condition tensors."""
    for name, spec in specs.items():
        want = list(spec.shape)
        if spec.role == "condition":
            want[spec.axis] = n_own
        got = list(np.shape(tensors[name]))
        if got != want:
            return f"tensor {name} has shape {got}, expected {want}"
    return None


def shared_tensor_names(hp: Mapping[str, Any], n_genes: int, n_conditions: int) -> list[str]:
    """Names of the tensors that FedAvg averages (everything that is not a condition tensor)."""
    return [n for n, s in _specs(hp, n_genes, n_conditions).items() if s.role != "condition"]


def initial_tensors(
    hp: Mapping[str, Any], n_genes: int, n_conditions: int, *, seed: int = 0,
) -> dict[str, np.ndarray]:
    """The coordinator's seeded initial weights (``CVAE.init_reference``)."""
    import torch

    from scarches_fl.module import CVAE

    module = CVAE(hp, n_genes, n_conditions, mode="reference")
    module.init_reference(torch.Generator().manual_seed(int(seed)))
    return module.export_tensors()


# -- one site's data and local training --------------------------------------------------------


@dataclass
class SiteDataset:
    """A site's cells on the reference genes, split once into training and held-out cells."""

    x: sp.csr_matrix
    cond: np.ndarray  # int64 index into the global condition list
    lib: np.ndarray
    train_idx: np.ndarray
    val_idx: np.ndarray
    own_conditions: list[int] = field(default_factory=list)
    labels: np.ndarray | None = None  # int64 class codes, -1 = unlabelled (classifier head)
    _cells: dict[str, Any] = field(default_factory=dict, repr=False)

    @property
    def n_train(self) -> int:
        return int(len(self.train_idx))

    @property
    def n_val(self) -> int:
        return int(len(self.val_idx))

    def cells(self, part: str) -> Any:
        """The ``"train"`` or ``"val"`` cells as a :class:`scarches_fl.train.CellData` (built
        once)."""
        if part not in self._cells:
            from scarches_fl.train import CellData

            idx = self.train_idx if part == "train" else self.val_idx
            labels = None if self.labels is None else self.labels[idx]
            self._cells[part] = CellData(self.x[idx], self.cond[idx], lib=self.lib[idx],
                                         labels=labels)
        return self._cells[part]


def make_site_dataset(
    x: Any, conditions: Sequence[str], global_conditions: Sequence[str], *,
    validation_fraction: float = 0.1, seed: int = 0, labels: Any = None,
) -> SiteDataset:
    """``conditions``: per cell, the global condition name (``<site>/<batch>``); ``labels``:
    per cell, its class code for the classifier head (-1 unlabelled), or None."""
    x = sp.csr_matrix(x, dtype=np.float32)
    x.sort_indices()
    index = {c: i for i, c in enumerate(global_conditions)}
    missing = sorted(set(conditions) - set(index))
    if missing:
        raise ValueError(f"conditions {missing[:5]} are not in the federation's condition list")
    cond = np.asarray([index[c] for c in conditions], dtype=np.int64)
    lib = np.asarray(x.sum(axis=1), dtype=np.float32).ravel()
    n = x.shape[0]
    rng = np.random.default_rng(seed)
    n_val = int(round(n * validation_fraction)) if validation_fraction > 0 else 0
    if n_val < 1 or n - n_val < 2:
        train_idx, val_idx = np.arange(n), np.arange(0)
    else:
        perm = rng.permutation(n)
        train_idx, val_idx = np.sort(perm[n_val:]), np.sort(perm[:n_val])
    own = sorted(set(cond.tolist()))
    codes = None if labels is None else np.asarray(labels, dtype=np.int64)
    return SiteDataset(x=x, cond=cond, lib=lib, train_idx=train_idx, val_idx=val_idx,
                       own_conditions=own, labels=codes)


@dataclass
class LocalTrainingConfig:
    epochs: int = 1
    batch_size: int = 128
    lr: float = 1e-3
    weight_decay: float = 1e-6
    adam_eps: float = 0.01
    kl_weight: float = 1.0
    prox_mu: float = 0.0
    seed: int = 0


@dataclass
class LocalResult:
    tensors: dict[str, np.ndarray]  # the site's contribution (shared + own condition columns)
    n_train: int
    train_loss: float
    seconds: float


def _module(hp: Mapping[str, Any], n_genes: int, n_conditions: int,
            tensors: Mapping[str, np.ndarray]) -> Any:
    from scarches_fl.module import CVAE

    module = CVAE(hp, n_genes, n_conditions, mode="reference")
    module.load_tensors(tensors)
    return module


def contribution_tensors(
    tensors: Mapping[str, np.ndarray], hp: Mapping[str, Any], n_genes: int, n_conditions: int,
    own_conditions: Sequence[int],
) -> dict[str, np.ndarray]:
    """What a site sends: every shared tensor, and of each condition tensor only the columns of
    the site's own conditions (in ``own_conditions`` order)."""
    out: dict[str, np.ndarray] = {}
    own = np.asarray(list(own_conditions), dtype=np.int64)
    for name, spec in _specs(hp, n_genes, n_conditions).items():
        arr = np.asarray(tensors[name], dtype=np.float32)
        if spec.role == "condition":
            out[name] = np.ascontiguousarray(np.take(arr, own, axis=spec.axis))
        else:
            out[name] = np.ascontiguousarray(arr)
    return out


def local_train(
    hp: Mapping[str, Any], n_genes: int, n_conditions: int,
    global_tensors: Mapping[str, np.ndarray], data: SiteDataset, config: LocalTrainingConfig,
) -> LocalResult:
    """``config.epochs`` epochs on the site's training cells, starting from the received global
    weights, with the one training loop every model uses (:func:`scarches_fl.train.fit`: its
    Adam, minibatching and seeding; the round's constant KL weight; FedProx on the shared
    tensors). Returns the site's contribution (see :func:`contribution_tensors`)."""
    import time

    from scarches_fl.train import TrainingConfig, fit

    t0 = time.perf_counter()
    module = _module(hp, n_genes, n_conditions, global_tensors)
    shared = tuple(n.replace(".", "__") for n, s in module.specs.items() if s.role != "condition")
    history: dict[str, Any] = {"train_loss": []}
    if data.n_train > 0:
        history = fit(module, data.cells("train"), TrainingConfig(
            max_epochs=int(config.epochs), batch_size=int(config.batch_size), lr=config.lr,
            weight_decay=config.weight_decay, adam_eps=config.adam_eps, kl_warmup_epochs=0,
            kl_weight=float(config.kl_weight), prox_mu=float(config.prox_mu),
            prox_params=shared if config.prox_mu > 0 else None, validation_fraction=0.0,
            early_stopping=False, seed=int(config.seed), progress=False,
            description="federated round"))
    module.eval()
    out = contribution_tensors(module.export_tensors(), hp, n_genes, n_conditions,
                               data.own_conditions)
    losses = history["train_loss"]
    return LocalResult(tensors=out, n_train=data.n_train,
                       train_loss=float(np.mean(losses)) if losses else math.nan,
                       seconds=time.perf_counter() - t0)


def site_latent(
    hp: Mapping[str, Any], n_genes: int, n_conditions: int,
    tensors: Mapping[str, np.ndarray], data: SiteDataset,
) -> np.ndarray:
    """Posterior means under the model ``tensors`` of every cell of the site, training and
    held-out, in the site's cell order (for the label statistics of a federated reference)."""
    from scarches_fl.train import CellData, posterior_mean

    module = _module(hp, n_genes, n_conditions, tensors)
    return posterior_mean(module, CellData(data.x, data.cond, lib=data.lib))


def validation_loss(
    hp: Mapping[str, Any], n_genes: int, n_conditions: int,
    tensors: Mapping[str, np.ndarray], data: SiteDataset, *, seed: int = 0,
    chunk_size: int = 4096,
) -> tuple[float, int]:
    """Sum over the site's held-out cells of the negative ELBO (KL weight 1, fixed noise) of the
    model ``tensors``, and the number of held-out cells. ``(0.0, 0)`` without held-out cells."""
    from scarches_fl.train import negative_elbo

    if data.n_val == 0:
        return 0.0, 0
    module = _module(hp, n_genes, n_conditions, tensors)
    mean = negative_elbo(module, data.cells("val"), seed=int(seed), chunk_size=chunk_size)
    return mean * data.n_val, data.n_val


# -- the coordinator's side --------------------------------------------------------------------


@dataclass(frozen=True)
class Contribution:
    """One site's accepted result of a round."""

    site_id: str
    n_train: int
    own_conditions: tuple[int, ...]  # global indices, in the order of the condition slices
    tensors: Mapping[str, np.ndarray]


def aggregate(
    global_tensors: Mapping[str, np.ndarray], contributions: Sequence[Contribution],
    hp: Mapping[str, Any], n_genes: int, n_conditions: int,
    owners: Mapping[int, str],
) -> dict[str, np.ndarray]:
    """The next global model: FedAvg of the shared tensors weighted by ``n_train``; every
    condition column from its owner's contribution only (``owners``: condition index -> site
    id). Raises ``ValueError`` for a contribution with wrong shapes or a column it does not own
    (the coordinator checks these before, this is the last line of defence)."""
    specs = _specs(hp, n_genes, n_conditions)
    out = {k: np.array(v, dtype=np.float32, copy=True) for k, v in global_tensors.items()}
    usable = [c for c in contributions if c.n_train > 0]
    for c in usable:
        for j in c.own_conditions:
            if owners.get(int(j)) != c.site_id:
                raise ValueError(f"site {c.site_id!r} sent condition column {j} it does not own")
        problem = contribution_shape_error(specs, c.tensors, len(c.own_conditions))
        if problem:
            raise ValueError(f"site {c.site_id!r}: {problem}")
    if not usable:
        return out
    weights = np.asarray([c.n_train for c in usable], dtype=np.float64)
    weights /= weights.sum()
    for name, spec in specs.items():
        if spec.role == "condition":
            for c in usable:
                arr = np.asarray(c.tensors[name], dtype=np.float32)
                for k, j in enumerate(c.own_conditions):
                    src = np.take(arr, [k], axis=spec.axis)
                    sl = [slice(None)] * arr.ndim
                    sl[spec.axis] = slice(int(j), int(j) + 1)
                    out[name][tuple(sl)] = src
        else:
            acc = np.zeros(spec.shape, dtype=np.float64)
            for w, c in zip(weights, usable, strict=True):
                acc += w * np.asarray(c.tensors[name], dtype=np.float64)
            out[name] = acc.astype(np.float32)
    return out


def kl_weight_for_round(server_round: int, warmup_rounds: int) -> float:
    """Linear KL warm-up over rounds (1-based): ``min(1, (round - 1) / warmup_rounds)``; 1 when
    ``warmup_rounds`` is 0. The first round trains with a small positive weight."""
    if warmup_rounds <= 0:
        return 1.0
    return float(min(1.0, max(server_round - 1, 0) / float(warmup_rounds)) or
                 1.0 / (2.0 * warmup_rounds))


@dataclass
class EarlyStopping:
    """Early stopping on the aggregated validation loss, counted only once the KL warm-up is
    over (before that the losses of different rounds are not comparable objectives)."""

    patience: int = 5
    min_delta: float = 0.0
    best: float = math.inf
    best_round: int | None = None
    bad_rounds: int = 0

    def update(self, server_round: int, value: float | None, *, warm: bool) -> bool:
        """Record the validation loss of the model after ``server_round``; True when training
        should stop now."""
        if value is None or not math.isfinite(value):
            return False
        if not warm:
            return False
        if value < self.best - self.min_delta:
            self.best, self.best_round, self.bad_rounds = value, server_round, 0
            return False
        self.bad_rounds += 1
        return self.bad_rounds >= self.patience
