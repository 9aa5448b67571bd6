"""Training loop for :class:`scarches_fl.module.CVAE`: minibatches from sparse CSR counts, Adam,
KL warm-up, a validation split, early stopping (restoring the best weights), seeding and a tqdm
progress bar. The module never sees the optimizer; the optimizer only ever sees the module's
``Parameter`` s (frozen slots are buffers).

Fast query path: when the module's gene weights of the encoder's first layer are frozen
(``conditions`` mode), ``W_x x + b`` is computed once per cell (chunked, into a dense float32
``(n_cells, n_hidden)`` array) and every epoch only runs the cheap remainder. With a frozen NB
dispersion the lgamma terms of the log-likelihood are per-cell constants, computed once too.

Reproducibility: on CPU a seed fixes the split, the shuffling, dropout and the reparameterisation
noise, so two runs in the same environment give bit-identical weights.

Streaming (issue 10, ADR 0015): a :class:`StreamingCellData` keeps the counts on disk (a
:class:`scarches_fl.data.BackedCounts` reader) and only the per-cell scalars (condition, library
size, label) in memory. Each epoch shuffles the order of ``block_rows``-row blocks, loads
``blocks_per_window`` of them at a time into a window, and shuffles the cells within the window;
at most one window of counts is held. With a single block the minibatch order is exactly the
in-memory one, so results are bit-identical to :class:`CellData`. The validation cells' counts
are kept from the first epoch's windows (at most ``validation_max_cells`` rows), so every epoch
reads the file exactly once.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import scipy.sparse as sp
import torch

from scarches_fl.module import CVAE, Minibatch

__all__ = ["STOP_REASONS", "TrainingConfig", "CellData", "StreamingCellData", "choose_threads",
           "fit", "has_converged", "intra_op_threads", "negative_elbo", "posterior_mean",
           "precompute_first_layer", "resolve_device"]

log = logging.getLogger(__name__)


@dataclass
class TrainingConfig:
    max_epochs: int = 100
    batch_size: int = 128
    lr: float = 1e-3
    weight_decay: float = 1e-6
    adam_eps: float = 0.01
    kl_warmup_epochs: int = 0
    # The KL weight once warmed up (federated training: the round's weight, decided by the
    # coordinator).
    kl_weight: float = 1.0
    # FedProx: ``prox_mu / 2 * ||w - w_start||^2`` over the parameters named in ``prox_params``
    # (``named_parameters`` names; None: every trainable parameter), anchored at their values
    # when ``fit`` starts. 0 adds nothing.
    prox_mu: float = 0.0
    prox_params: tuple[str, ...] | None = None
    validation_fraction: float = 0.1
    # Cap on the validation cells (whatever the fraction). Streaming keeps the validation cells'
    # counts in memory after the first epoch so that each epoch reads the file once; the cap
    # bounds that cache (32,768 cells x ~700 nonzeros ~ 180 MB at 2,000 genes).
    validation_max_cells: int | None = 32768
    early_stopping: bool = False  # scvi-tools default; the validation ELBO is still recorded
    patience: int = 15
    min_delta: float = 0.0
    # Stop on convergence (issue 21, ADR 0080): at every check (every ``check_every_cells``
    # training cells, within or across epochs; None: every epoch), stop once the best monitored
    # value (validation ELBO; the training loss without validation cells) has improved by less
    # than ``convergence_rtol`` of itself over the last ``convergence_window`` checks, and restore
    # the best checked weights. None: run ``max_epochs`` (the ceiling either way) or early
    # stopping. Checks never change the training trajectory (validation has its own noise).
    convergence_rtol: float | None = None
    convergence_window: int = 3
    check_every_cells: int | None = None
    seed: int = 0
    device: str = "cpu"
    progress: bool = True
    precompute: bool = True  # use the fast path when the first layer's gene part is frozen
    chunk_size: int = 4096
    # Minibatches of 128 cells are too small for intra-op parallelism to pay off; on a shared
    # machine extra threads mostly wait on each other (measured 10x slower with 2 threads under
    # load). None keeps torch's setting.
    num_threads: int | None = 1
    # Threads of the whole-data chunked passes (the fast path's precompute: chunk_size rows at
    # once). None: ``choose_threads(chunk_size)`` (ADR 0081).
    pass_threads: int | None = None
    description: str = "training"

    def to_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


@dataclass
class CellData:
    """Counts on the model's genes (CSR float32), condition index and library size per cell."""

    x: sp.csr_matrix
    cond: np.ndarray  # int64
    lib: np.ndarray = field(default=None)  # type: ignore[arg-type]  # set in __post_init__
    labels: np.ndarray | None = None  # int64 codes, -1 = unlabelled (semi-supervised training)

    def __post_init__(self) -> None:
        self.x = sp.csr_matrix(self.x, dtype=np.float32)
        self.x.sort_indices()
        self.cond = np.asarray(self.cond, dtype=np.int64)
        if self.lib is None:
            self.lib = np.asarray(self.x.sum(axis=1), dtype=np.float32).ravel()
        # torch views of the CSR arrays (shared memory) for fast minibatch row gathers
        self._indptr = torch.from_numpy(self.x.indptr.astype(np.int64, copy=False))
        self._indices = torch.from_numpy(self.x.indices)
        self._data = torch.from_numpy(self.x.data)
        self._lib_t = torch.from_numpy(self.lib)
        self._cond_t = torch.from_numpy(self.cond)
        self._labels_t = (None if self.labels is None
                          else torch.from_numpy(np.asarray(self.labels, dtype=np.int64)))

    def rows(self, idx: np.ndarray) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The nonzeros of rows ``idx`` (in that order): (row in batch, gene, value)."""
        idx_t = torch.from_numpy(np.ascontiguousarray(idx, dtype=np.int64))
        starts = self._indptr[idx_t]
        lens = self._indptr[idx_t + 1] - starts
        offsets = torch.cumsum(lens, 0) - lens
        total = int(lens.sum())
        rows = torch.repeat_interleave(torch.arange(len(idx), dtype=torch.int64), lens)
        pos = torch.arange(total, dtype=torch.int64) + torch.repeat_interleave(
            starts - offsets, lens)
        return rows, self._indices[pos].long(), self._data[pos]

    @property
    def n_cells(self) -> int:
        return self.x.shape[0]


#: Rows per on-disk block and blocks per window of the streaming trainer (window 16,384 rows).
BLOCK_ROWS = 4096
BLOCKS_PER_WINDOW = 4


class StreamingCellData:
    """Counts on disk (``source.read(lo, hi)``), per-cell condition / library size / label in
    memory. Memory: one window of ``block_rows * blocks_per_window`` rows of counts, plus
    O(n_cells) scalars."""

    def __init__(self, source: Any, cond: np.ndarray, lib: np.ndarray,
                 labels: np.ndarray | None = None, *, block_rows: int = BLOCK_ROWS,
                 blocks_per_window: int = BLOCKS_PER_WINDOW) -> None:
        self.source = source
        self.cond = np.asarray(cond, dtype=np.int64)
        self.lib = np.asarray(lib, dtype=np.float32)
        self.labels = None if labels is None else np.asarray(labels, dtype=np.int64)
        self.block_rows = int(block_rows)
        self.blocks_per_window = int(blocks_per_window)
        self.max_window_rows = 0  # instrumentation: the most count rows held at once

    @property
    def n_cells(self) -> int:
        return int(self.source.n_cells)

    @property
    def n_blocks(self) -> int:
        return max(1, -(-self.n_cells // self.block_rows))

    def window(self, blocks: Sequence[int] | np.ndarray) -> tuple[CellData, np.ndarray]:
        """The cells of ``blocks`` (in that order) as an in-memory :class:`CellData`, and their
        global row indices."""
        parts = [self.source.read(int(b) * self.block_rows,
                                  min((int(b) + 1) * self.block_rows, self.n_cells))
                 for b in blocks]
        x = parts[0] if len(parts) == 1 else sp.vstack(parts, format="csr")
        idx = _block_rows(blocks, self.block_rows, self.n_cells)
        self.max_window_rows = max(self.max_window_rows, len(idx))
        labels = None if self.labels is None else self.labels[idx]
        return CellData(x, self.cond[idx], lib=self.lib[idx], labels=labels), idx


AnyCellData = CellData | StreamingCellData


def _windows(data: AnyCellData, chunk_size: int) -> Iterator[tuple[CellData, np.ndarray]]:
    """In-order passes over every cell: ``(cells, global rows)`` per chunk / window."""
    if isinstance(data, StreamingCellData):
        per = max(1, min(data.blocks_per_window, chunk_size // data.block_rows or 1))
        for b in range(0, data.n_blocks, per):
            yield data.window(range(b, min(b + per, data.n_blocks)))
        return
    yield data, np.arange(data.n_cells, dtype=np.int64)


def _take(arr: np.ndarray | None, rows: np.ndarray, full: bool) -> np.ndarray | None:
    if arr is None or full:
        return arr
    return arr[rows]


def resolve_device(device: str) -> torch.device:
    from scarches_fl.data import DataError

    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise DataError(
                f"device {device!r} requested but CUDA is not available in this torch build or "
                "machine; use --device cpu"
            )
    return torch.device(device)


def _minibatch(
    module: CVAE, data: CellData, idx: np.ndarray, device: torch.device, *,
    h0: np.ndarray | None, const: np.ndarray | None, need_input: bool,
) -> Minibatch:
    rows, cols, vals = data.rows(idx)
    idx_t = torch.from_numpy(np.ascontiguousarray(idx, dtype=np.int64))
    rows, cols, vals = rows.to(device), cols.to(device), vals.to(device)
    lib = data._lib_t[idx_t].to(device)
    cond = data._cond_t[idx_t].to(device)
    mb = Minibatch(cond=cond, lib=lib, rows=rows, cols=cols, vals=vals)
    if data._labels_t is not None:
        mb.labels = data._labels_t[idx_t].to(device)
    if h0 is not None:
        mb.h0 = torch.from_numpy(h0).index_select(0, idx_t).to(device)
    elif need_input:
        x_in = torch.zeros((len(idx), module.n_genes), dtype=torch.float32, device=device)
        x_in.view(-1)[mb.flat_index(module.n_genes)] = module.transform_values(vals, lib[rows])
        mb.x_in = x_in
    if const is not None:
        mb.const = torch.from_numpy(const).index_select(0, idx_t).to(device)
    return mb


#: Below this many rows per operation one intra-op thread is used, whatever the machine: a
#: 128-cell minibatch step ran 4-20x slower with two threads than with one (ADR 0081).
PARALLEL_MIN_ROWS = 2048


def choose_threads(rows_per_op: int, *, cores: int | None = None,
                   load: float | None = None) -> int:
    """Intra-op threads for operations on ``rows_per_op`` rows at once (ADR 0081): one below
    ``PARALLEL_MIN_ROWS``; otherwise the cores this process may use that the 1-minute load
    average leaves idle, at least one. ``cores`` / ``load`` default to the machine's."""
    if rows_per_op < PARALLEL_MIN_ROWS:
        return 1
    if cores is None:
        try:
            cores = len(os.sched_getaffinity(0))
        except (AttributeError, OSError):
            cores = os.cpu_count() or 1
    if load is None:
        try:
            load = os.getloadavg()[0]
        except (AttributeError, OSError):
            load = float(cores)
    return max(1, min(int(cores), int(cores) - math.ceil(float(load))))


@contextmanager
def intra_op_threads(n: int | None) -> Iterator[None]:
    """``torch.set_num_threads(n)`` for the block (``None``: unchanged), restored after."""
    old = torch.get_num_threads()
    if n:
        torch.set_num_threads(int(n))
    try:
        yield
    finally:
        torch.set_num_threads(old)


def _first_layer_frozen(module: CVAE) -> bool:
    names = ("encoder__layers__0__weight_x", "encoder__layers__0__bias")
    params = dict(module.named_parameters())
    return not any(n in params for n in names)


def _dispersion_frozen(module: CVAE) -> bool:
    if module.likelihood not in ("nb", "zinb"):
        return False
    params = dict(module.named_parameters())
    return not any(n.startswith("px_r") for n in params)


@torch.no_grad()
def precompute_first_layer(
    module: CVAE, data: AnyCellData, *, chunk_size: int = 4096,
    device: torch.device | None = None,
) -> np.ndarray:
    """``W_x x + b`` for every cell, chunk by chunk (dense float32, n_cells x n_hidden)."""
    h0, _ = _precompute(module, data, chunk_size=chunk_size,
                        device=device or torch.device("cpu"), nb_constant=False)
    return h0


@torch.no_grad()
def _precompute(
    module: CVAE, data: AnyCellData, *, chunk_size: int, device: torch.device,
    nb_constant: bool, on_window: Any = None,
) -> tuple[np.ndarray, np.ndarray | None]:
    """One pass over the cells: ``W_x x + b`` per cell and, with ``nb_constant``, the NB
    likelihood's per-cell lgamma constant. ``on_window(cells, rows)`` sees every window (the
    streaming trainer gathers its validation cells there, so validation is possible before the
    first epoch ends)."""
    n_hidden = int(module.hp["n_hidden"])
    h0 = np.empty((data.n_cells, n_hidden), dtype=np.float32)
    const = np.empty(data.n_cells, dtype=np.float32) if nb_constant else None
    for cells, rows in _windows(data, chunk_size):
        if on_window is not None:
            on_window(cells, rows)
        for start in range(0, cells.n_cells, chunk_size):
            idx = np.arange(start, min(start + chunk_size, cells.n_cells))
            mb = _minibatch(module, cells, idx, device, h0=None, const=None, need_input=True)
            h0[rows[idx]] = module.first_layer_genes(mb.dense_input()).cpu().numpy()
            if const is not None:
                const[rows[idx]] = module.nb_sparse_constant(mb).cpu().numpy()
    return h0, const


@torch.no_grad()
def posterior_mean(
    module: CVAE, data: AnyCellData, *, batch_size: int = 4096,
    device: str | torch.device = "cpu", h0: np.ndarray | None = None,
    threads: int | None = None,
) -> np.ndarray:
    """Posterior mean of q(z | x, s) for every cell, chunked (eval mode: no dropout); streaming
    data is read window by window. With ``h0`` (the precomputed ``W_x x + b`` of every cell,
    valid while the encoder's gene weights are frozen) no counts are read at all. ``threads``:
    intra-op threads (None: ``choose_threads(batch_size)``)."""
    with intra_op_threads(threads or choose_threads(batch_size)):
        return _posterior_mean(module, data, batch_size=batch_size, device=device, h0=h0)


def _posterior_mean(
    module: CVAE, data: AnyCellData, *, batch_size: int, device: str | torch.device,
    h0: np.ndarray | None,
) -> np.ndarray:
    device = torch.device(device)
    was_training = module.training
    module.eval()
    module.to(device)
    out = np.empty((data.n_cells, int(module.hp["n_latent"])), dtype=np.float32)
    try:
        if h0 is not None:
            cond = torch.from_numpy(np.asarray(data.cond, dtype=np.int64))
            for start in range(0, data.n_cells, batch_size):
                stop = min(start + batch_size, data.n_cells)
                mean, _ = module.encode(torch.from_numpy(h0[start:stop]).to(device),
                                        cond[start:stop].to(device))
                out[start:stop] = mean.cpu().numpy()
            return out
        for cells, rows in _windows(data, batch_size):
            for start in range(0, cells.n_cells, batch_size):
                idx = np.arange(start, min(start + batch_size, cells.n_cells))
                mb = _minibatch(module, cells, idx, device, h0=None, const=None,
                                need_input=True)
                mean, _ = module.encode(module.first_layer_genes(mb.dense_input()), mb.cond)
                out[rows[idx]] = mean.cpu().numpy()
    finally:
        module.train(was_training)
    return out


class _Adam:
    """Adam (Kingma & Ba) with L2 weight decay added to the gradient, as ``torch.optim.Adam``
    (``amsgrad=False``, ``maximize=False``): bias-corrected moments, ``eps`` added outside the
    square root, and, like torch, a parameter without a gradient in a step is skipped and its
    own step count does not advance (``tests/scarches_fl/test_train_optimizer.py``).

    Written out because ``torch.optim`` imports ``torch._dynamo`` on first use, which costs
    several seconds per process -- longer than training a small reference. It only ever holds
    the module's trainable ``Parameter`` s."""

    def __init__(self, params: list[torch.nn.Parameter], *, lr: float, weight_decay: float,
                 eps: float, betas: tuple[float, float] = (0.9, 0.999)) -> None:
        self.params = params
        self.lr, self.weight_decay, self.eps = lr, weight_decay, eps
        self.b1, self.b2 = betas
        self.m = [torch.zeros_like(p) for p in params]
        self.v = [torch.zeros_like(p) for p in params]
        self.steps = [0] * len(params)

    def zero_grad(self) -> None:
        for p in self.params:
            p.grad = None

    @torch.no_grad()
    def step(self) -> None:
        for i, (p, m, v) in enumerate(zip(self.params, self.m, self.v, strict=True)):
            if p.grad is None:
                continue
            self.steps[i] += 1
            t = self.steps[i]
            c1 = 1.0 - self.b1 ** t
            c2 = 1.0 - self.b2 ** t
            g = p.grad
            if self.weight_decay:
                g = g.add(p, alpha=self.weight_decay)
            m.mul_(self.b1).add_(g, alpha=1.0 - self.b1)
            v.mul_(self.b2).addcmul_(g, g, value=1.0 - self.b2)
            denom = (v / c2).sqrt_().add_(self.eps)
            p.addcdiv_(m, denom, value=-self.lr / c1)


def _split(n: int, fraction: float, rng: np.random.Generator,
           max_cells: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    n_val = int(round(n * fraction)) if fraction > 0 else 0
    if max_cells is not None:
        n_val = min(n_val, int(max_cells))
    if n_val < 1 or n - n_val < 2:
        return np.arange(n), np.arange(0)
    perm = rng.permutation(n)
    return np.sort(perm[n_val:]), np.sort(perm[:n_val])


def _epoch_windows(
    data: AnyCellData, train_idx: np.ndarray, is_train: np.ndarray,
    rng: np.random.Generator,
) -> Iterator[tuple[CellData, np.ndarray, np.ndarray, bool]]:
    """One epoch's shuffled training cells: ``(cells, window rows, local order, full)``.

    In memory, up to one window's worth of cells (16,384): ``train_idx`` permuted (the
    historical order); above that the streaming order over views of the in-memory arrays.
    Streaming: block order permuted, ``blocks_per_window`` blocks per window, the window's
    training cells permuted. A single block reproduces the in-memory order exactly."""
    if isinstance(data, StreamingCellData):
        block_rows, per, n_blocks = data.block_rows, data.blocks_per_window, data.n_blocks
    elif data.n_cells <= BLOCK_ROWS * BLOCKS_PER_WINDOW:
        yield data, train_idx, train_idx[rng.permutation(len(train_idx))], True
        return
    else:
        # Large in-memory data gets the streaming order too, over views of its own arrays, so a
        # minibatch gathers rows from one ~16k-row stretch of the CSR arrays instead of from all
        # of them (cache locality; at 1M cells the in-memory query epoch went from 1.16x to
        # 1.02x linear together with the no-copy input, the reference epoch stayed at 1.12x).
        block_rows, per = BLOCK_ROWS, BLOCKS_PER_WINDOW
        n_blocks = -(-data.n_cells // block_rows)
    order = rng.permutation(n_blocks) if n_blocks > 1 else np.zeros(1, dtype=np.int64)
    for w in range(0, n_blocks, per):
        blocks = order[w:w + per]
        if isinstance(data, StreamingCellData):
            cells, rows = data.window(blocks)
            local, full = np.flatnonzero(is_train[rows]), False
        else:
            cells, rows = data, _block_rows(blocks, block_rows, data.n_cells)
            local, full = rows[is_train[rows]], True
        yield cells, rows, local[rng.permutation(len(local))], full


def _block_rows(blocks: Sequence[int] | np.ndarray, block_rows: int, n_cells: int) -> np.ndarray:
    """Global row indices of ``blocks`` (in that order) of ``block_rows`` rows each."""
    return np.concatenate([
        np.arange(int(b) * block_rows, min((int(b) + 1) * block_rows, n_cells), dtype=np.int64)
        for b in blocks])


#: Why training stopped (``history["stop_reason"]``): the epoch ceiling, the convergence rule
#: (``TrainingConfig.convergence_rtol``), patience (``early_stopping``), nothing to train.
STOP_REASONS = ("max_epochs", "converged", "early_stopping", "no_parameters")


def has_converged(values: Sequence[float], *, rtol: float, window: int) -> bool:
    """The convergence rule: with ``b_i`` the best (lowest) of ``values[:i + 1]``, true once
    there are more than ``window`` values and ``b[-1 - window] - b[-1] <= rtol * |b[-1]|``,
    i.e. the best value improved by at most ``rtol`` of itself over the last ``window`` checks.
    A value that gets worse never resets the rule (noise upward is not progress)."""
    window = max(1, int(window))
    if len(values) <= window:
        return False
    best_then = min(values[:len(values) - window])
    best_now = min(values)
    return best_then - best_now <= float(rtol) * abs(best_now)


def fit(module: CVAE, data: AnyCellData, config: TrainingConfig, *,
        keep_first_layer: bool = False) -> dict[str, Any]:
    """Train ``module``'s parameters on ``data``. Returns a history dict (per-epoch losses,
    epochs run, best epoch, ``stop_reason`` (one of ``STOP_REASONS``), ``passes`` (training
    cells seen / training cells), the convergence ``checks``, seconds, seconds per epoch, the
    wall and process CPU seconds of each epoch (``epoch_seconds``, ``epoch_cpu_seconds``),
    trainable parameter count). With ``keep_first_layer`` and the fast path, the precomputed
    ``W_x x + b`` array is returned under ``"first_layer"`` (for :func:`posterior_mean`)."""
    device = resolve_device(config.device)
    params = [p for p in module.parameters() if p.requires_grad]
    n_trainable = sum(p.numel() for p in params)
    history: dict[str, Any] = {
        "train_loss": [], "validation_elbo": [], "epochs": 0, "best_epoch": None,
        "trainable_parameters": n_trainable, "config": config.to_dict(),
        "stop_reason": "no_parameters", "passes": 0.0, "checks": [],
    }
    if not params:
        return history
    if isinstance(data, StreamingCellData) or (config.precompute and _first_layer_frozen(module)):
        from scarches_fl._memory import pin_mmap_threshold

        pin_mmap_threshold()  # chunked passes over every cell: resident memory bounded, ADR 0082
    old_threads = torch.get_num_threads()
    if config.num_threads:
        torch.set_num_threads(int(config.num_threads))
    try:
        history = _fit(module, data, config, device, params, history)
    finally:
        torch.set_num_threads(old_threads)
    if not keep_first_layer:
        history.pop("first_layer", None)
    return history


def _fit(
    module: CVAE, data: AnyCellData, config: TrainingConfig, device: torch.device,
    params: list[torch.nn.Parameter], history: dict[str, Any],
) -> dict[str, Any]:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        rng = np.random.default_rng(config.seed)
        gen = torch.Generator().manual_seed(config.seed)
        module.to(device)
        train_idx, val_idx = _split(data.n_cells, config.validation_fraction, rng,
                                    config.validation_max_cells)
        is_train = np.zeros(data.n_cells, dtype=bool)
        is_train[train_idx] = True
        val_cache: _ValidationCache | None = None
        if isinstance(data, StreamingCellData):
            val_cache = _ValidationCache(val_idx, data.n_cells)

        t_pre = time.perf_counter()
        h0 = const = None
        if config.precompute and _first_layer_frozen(module):
            # one pass over the cells; a streaming run gathers its validation cells in it too
            threads = config.pass_threads or choose_threads(config.chunk_size)
            with intra_op_threads(threads):
                h0, const = _precompute(
                    module, data, chunk_size=config.chunk_size, device=device,
                    nb_constant=_dispersion_frozen(module),
                    on_window=None if val_cache is None else val_cache.collect)
            history["precompute_threads"] = threads
            history["first_layer"] = h0
        history["precompute_seconds"] = time.perf_counter() - t_pre

        if val_cache is not None:  # the cached validation rows' h0 / constant, in val_idx order
            h0_val, const_val = _take(h0, val_idx, False), _take(const, val_idx, False)

        def validate() -> float | None:
            if len(val_idx) == 0:
                return None
            if isinstance(data, CellData):
                return _validation_elbo(module, data, val_idx, device, h0, const, config)
            assert val_cache is not None  # streaming: the cached rows, in val_idx order
            return _validation_elbo(module, val_cache.data(), np.arange(len(val_idx)),
                                    device, h0_val, const_val, config)

        optimizer = _Adam(params, lr=config.lr, weight_decay=config.weight_decay,
                          eps=config.adam_eps)
        best = math.inf
        best_state: dict[str, torch.Tensor] | None = None
        bad_epochs = 0
        named = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
        prox = _prox_anchors(named, config)
        n_train = max(len(train_idx), 1)
        converge = config.convergence_rtol is not None
        check_cells = config.check_every_cells
        conv_rtol = float(config.convergence_rtol or 0.0)  # read only when ``converge``
        check_every = int(check_cells or 0)  # read only when ``sub_epoch``
        # checks every ``check_cells`` training cells (within an epoch or across epochs) need
        # validation cells, a fixed yardstick; otherwise the check is at the end of each epoch
        sub_epoch = converge and check_cells is not None and len(val_idx) > 0
        monitored: list[float] = []
        conv_best = math.inf
        conv_state: dict[str, torch.Tensor] | None = None
        stop_reason = "max_epochs"
        cells_seen = cells_since = 0

        def check(value: float, epoch_float: float) -> bool:
            """Record a convergence check; True when the rule says stop."""
            nonlocal conv_best, conv_state
            monitored.append(value)
            history["checks"].append({"passes": round(cells_seen / n_train, 4),
                                      "epoch": round(epoch_float, 4), "value": value})
            if value < conv_best:
                conv_best = value
                conv_state = {n: p.detach().clone() for n, p in named}
            return has_converged(monitored, rtol=conv_rtol,
                                 window=config.convergence_window)

        bar = None
        if config.progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=config.max_epochs, desc=config.description, unit="epoch",
                       leave=False)
        t0 = time.perf_counter()
        epoch_seconds: list[float] = []
        # process CPU time per epoch beside wall time: on a shared machine the wall time
        # includes waiting for a core, the CPU time does not (bench_gene_selection.py)
        epoch_cpu_seconds: list[float] = []
        try:
            for epoch in range(config.max_epochs):
                te, ce = time.perf_counter(), time.process_time()
                kl_weight = float(config.kl_weight) * (
                    min(1.0, epoch / config.kl_warmup_epochs)
                    if config.kl_warmup_epochs > 0 else 1.0)
                warm = epoch + 1 >= config.kl_warmup_epochs
                module.train()
                total, count = 0.0, 0
                stop = False
                for cells, rows, perm, full in _epoch_windows(data, train_idx, is_train, rng):
                    if val_cache is not None:
                        val_cache.collect(cells, rows)
                    h0_w, const_w = _take(h0, rows, full), _take(const, rows, full)
                    for s in range(0, len(perm), config.batch_size):
                        idx = perm[s:s + config.batch_size]
                        if len(idx) < 2 and len(perm) > 2:
                            continue
                        mb = _minibatch(module, cells, idx, device, h0=h0_w, const=const_w,
                                        need_input=True)
                        terms = module.loss(mb, kl_weight=kl_weight, generator=gen)
                        loss = terms.loss
                        if prox:
                            penalty = sum((p - p0).pow(2).sum() for p, p0 in prox)
                            loss = loss + 0.5 * float(config.prox_mu) * penalty
                        optimizer.zero_grad()
                        loss.backward()
                        optimizer.step()
                        total += float(terms.loss.detach()) * len(idx)
                        count += len(idx)
                        cells_seen += len(idx)
                        cells_since += len(idx)
                        if (sub_epoch and warm and cells_since >= check_every
                                and (val_cache is None or val_cache.ready())):
                            cells_since -= check_every
                            value = validate()
                            module.train()
                            assert value is not None
                            if check(value, cells_seen / n_train):
                                stop = True
                                break
                    if stop:
                        break
                train_loss = total / max(count, 1)
                history["train_loss"].append(train_loss)
                val = validate()
                history["validation_elbo"].append(val)
                epoch_seconds.append(time.perf_counter() - te)
                epoch_cpu_seconds.append(time.process_time() - ce)
                history["epochs"] = epoch + 1
                monitor = val if val is not None else train_loss
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(loss=f"{train_loss:.1f}",
                                    val=f"{val:.1f}" if val is not None else "-")
                if stop:
                    stop_reason = "converged"
                    log.info("converged after %.2f passes over the training cells",
                             cells_seen / n_train)
                    break
                if converge and warm and not sub_epoch and check(monitor, epoch + 1):
                    stop_reason = "converged"
                    log.info("converged at epoch %d", epoch + 1)
                    break
                if not warm or not config.early_stopping:
                    continue
                if monitor < best - config.min_delta:
                    best = monitor
                    history["best_epoch"] = epoch + 1
                    best_state = {n: p.detach().clone() for n, p in named}
                    bad_epochs = 0
                else:
                    bad_epochs += 1
                    if val is not None and bad_epochs >= config.patience:
                        log.info("early stopping at epoch %d (best %d)", epoch + 1,
                                 history["best_epoch"])
                        stop_reason = "early_stopping"
                        break
        finally:
            if bar is not None:
                bar.close()
        restore = None
        # stopped by the rule: the best checked weights (within the window); at the ceiling the
        # last weights, as without the rule (a small query that never converges within its
        # ceiling trains exactly as before)
        if stop_reason == "converged" and conv_state is not None:
            restore = conv_state
        elif best_state is not None and config.early_stopping:
            restore = best_state
        if restore is not None:
            with torch.no_grad():
                for n, p in named:
                    p.copy_(restore[n])
        module.eval()
        history["stop_reason"] = stop_reason
        history["passes"] = round(cells_seen / n_train, 4)
        history["seconds"] = time.perf_counter() - t0
        history["seconds_per_epoch"] = (float(np.mean(epoch_seconds)) if epoch_seconds
                                        else None)
        history["epoch_seconds"] = epoch_seconds
        history["epoch_cpu_seconds"] = epoch_cpu_seconds
        history["n_train_cells"] = int(len(train_idx))
        history["n_validation_cells"] = int(len(val_idx))
        if isinstance(data, StreamingCellData):
            history["streaming"] = {"block_rows": data.block_rows,
                                    "blocks_per_window": data.blocks_per_window,
                                    "max_window_rows": data.max_window_rows,
                                    "validation_cached_cells": int(len(val_idx))}
    return history


def _prox_anchors(
    named: list[tuple[str, torch.nn.Parameter]], config: TrainingConfig,
) -> list[tuple[torch.nn.Parameter, torch.Tensor]]:
    """(parameter, its value at the start) for the FedProx term; empty when ``prox_mu`` is 0."""
    if config.prox_mu <= 0:
        return []
    wanted = None if config.prox_params is None else set(config.prox_params)
    if wanted is not None:
        unknown = wanted - {n for n, _ in named}
        if unknown:
            raise ValueError(f"prox_params names no trainable parameter: {sorted(unknown)[:5]}")
    return [(p, p.detach().clone()) for n, p in named if wanted is None or n in wanted]


class _ValidationCache:
    """The validation cells' counts, gathered from the training windows of the first epoch (an
    epoch reads every block once, validation cells included), so that validation never reads
    the file again. Holds ``len(val_idx)`` rows, at most ``TrainingConfig.validation_max_cells``.
    """

    def __init__(self, val_idx: np.ndarray, n_cells: int) -> None:
        self.val_idx = val_idx
        self.is_val = np.zeros(n_cells, dtype=bool)
        self.is_val[val_idx] = True
        self._parts: list[tuple[np.ndarray, CellData]] = []
        self._data: CellData | None = None
        self._seen = np.zeros(n_cells, dtype=bool)  # rows already collected (each only once)
        self._n_collected = 0

    def ready(self) -> bool:
        """Every validation cell has been collected."""
        return self._data is not None or self._n_collected == len(self.val_idx)

    def collect(self, cells: CellData, rows: np.ndarray) -> None:
        if self._data is not None or len(self.val_idx) == 0:
            return
        local = np.flatnonzero(self.is_val[rows] & ~self._seen[rows])
        if len(local):
            self._seen[rows[local]] = True
            self._n_collected += len(local)
            self._parts.append((rows[local], _subset(cells, local)))

    def data(self) -> CellData:
        """The cached validation cells as one :class:`CellData`, row ``i`` = ``val_idx[i]``."""
        if self._data is None:
            rows = np.concatenate([r for r, _ in self._parts])
            order = np.argsort(rows, kind="stable")
            if not np.array_equal(rows[order], self.val_idx):
                raise RuntimeError("internal error: the first epoch did not read every "
                                   "validation cell")
            parts = [c for _, c in self._parts]
            x = sp.vstack([c.x for c in parts], format="csr")[order]
            labels = (None if parts[0].labels is None
                      else np.concatenate([c.labels for c in parts])[order])
            self._data = CellData(x, np.concatenate([c.cond for c in parts])[order],
                                  lib=np.concatenate([c.lib for c in parts])[order],
                                  labels=labels)
            self._parts = []
        return self._data


def _subset(cells: CellData, local: np.ndarray) -> CellData:
    labels = None if cells.labels is None else cells.labels[local]
    return CellData(cells.x[local], cells.cond[local], lib=cells.lib[local], labels=labels)


def negative_elbo(
    module: CVAE, data: CellData, *, seed: int = 0, chunk_size: int = 4096,
    device: str | torch.device = "cpu",
) -> float:
    """Mean negative ELBO per cell of ``module`` on every cell of ``data`` (KL weight 1, noise
    fixed by ``seed``): the validation loss :func:`fit` records, for cells held out elsewhere
    (a federated site scores the model it received). ``data`` must hold at least one cell."""
    config = TrainingConfig(seed=seed, chunk_size=chunk_size)
    device = torch.device(device)
    module.to(device)
    return _validation_elbo(module, data, np.arange(data.n_cells), device, None, None, config)


@torch.no_grad()
def _validation_elbo(
    module: CVAE, cells: CellData, rows: np.ndarray, device: torch.device,
    h0: np.ndarray | None, const: np.ndarray | None, config: TrainingConfig,
) -> float:
    """Negative ELBO per cell on the validation cells ``rows`` (at least one) of ``cells`` (KL
    weight 1, fixed noise), in ``rows`` order and chunks of ``chunk_size``."""
    module.eval()
    gen = torch.Generator().manual_seed(config.seed + 1)
    total = 0.0
    for s in range(0, len(rows), config.chunk_size):
        idx = rows[s:s + config.chunk_size]
        mb = _minibatch(module, cells, idx, device, h0=h0, const=const, need_input=True)
        terms = module.loss(mb, kl_weight=1.0, generator=gen)
        total += float(terms.reconstruction + terms.kl)
    return total / len(rows)
