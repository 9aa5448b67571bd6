"""Issue 21: training stops on convergence with the reason reported, checks can fall inside an
epoch (streaming included: the validation cells are gathered in the precompute pass), and the
query embedding reuses the precomputed first layer."""

from __future__ import annotations

import os
import platform

import numpy as np
import pytest
import scipy.sparse as sp
import torch

from scarches_fl import train
from scarches_fl.module import CVAE, default_hyperparameters

G, C_OLD, C_NEW = 40, 3, 2


class _ArrayReader:
    """The ``source`` interface of :class:`~scarches_fl.train.StreamingCellData` over an
    in-memory CSR matrix, recording every row range read."""

    def __init__(self, x: sp.csr_matrix) -> None:
        self.x = x
        self.n_cells = x.shape[0]
        self.spans: list[tuple[int, int]] = []

    def read(self, lo: int, hi: int) -> sp.csr_matrix:
        self.spans.append((int(lo), int(hi)))
        return self.x[lo:hi]


def _counts(n: int, seed: int = 0) -> tuple[sp.csr_matrix, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.negative_binomial(2, 0.3, size=(n, G)).astype(np.float32)
    x[rng.random((n, G)) < 0.5] = 0
    x[:, 0] += 1
    cond = rng.integers(C_OLD, C_OLD + C_NEW, size=n)
    return sp.csr_matrix(x), cond


def _conditions_module(seed: int = 0) -> CVAE:
    hp = default_hyperparameters(n_hidden=16, n_latent=4)
    base = CVAE(hp, G, C_OLD, mode="reference")
    base.init_reference(torch.Generator().manual_seed(seed))
    m = CVAE(hp, G, C_OLD + C_NEW, n_new_conditions=C_NEW, mode="conditions")
    m.load_tensors(base.export_tensors())
    m.init_new_conditions()
    return m


def _cfg(**kw) -> train.TrainingConfig:
    base = {
        "max_epochs": 200,
        "batch_size": 32,
        "lr": 1e-2,
        "weight_decay": 0.0,
        "progress": False,
        "seed": 2,
    }
    base.update(kw)
    return train.TrainingConfig(**base)


@pytest.mark.parametrize(
    ("values", "rtol", "window", "expected"),
    [
        ([10.0, 9.0, 8.0], 1e-3, 3, False),  # fewer than window + 1 checks
        ([10.0, 9.0, 8.0, 7.0], 1e-3, 3, False),  # still improving by 30%
        ([10.0, 9.0, 9.0, 9.0, 9.0], 1e-3, 3, True),  # flat for three checks
        ([10.0, 9.0, 9.5, 9.7, 9.9], 1e-3, 3, True),  # noise upward is not progress
        ([100.0, 99.0, 98.99, 98.98], 1e-3, 2, True),  # 0.02 of 98.98 is under 1e-3
        ([100.0, 99.0, 98.0, 97.0], 1e-3, 2, False),
        ([-100.0, -101.0, -101.01, -101.02], 1e-3, 2, True),  # negative values: |best|
    ],
)
def test_convergence_rule(values, rtol, window, expected):
    assert train.has_converged(values, rtol=rtol, window=window) is expected


def test_stops_on_convergence_and_reports_why():
    x, cond = _counts(400)
    data = train.CellData(x, cond)
    m = _conditions_module()
    h = train.fit(m, data, _cfg(convergence_rtol=1e-3, convergence_window=3))
    assert h["stop_reason"] == "converged"
    assert 4 <= h["epochs"] < 200
    checks = [c["value"] for c in h["checks"]]
    assert len(checks) == h["epochs"]  # one check per epoch without check_every_cells
    assert train.has_converged(checks, rtol=1e-3, window=3)
    assert not train.has_converged(checks[:-1], rtol=1e-3, window=3)
    # the best checked weights are restored: validating again gives the best checked value
    cfg = _cfg()
    val_idx = train._split(
        400, cfg.validation_fraction, np.random.default_rng(cfg.seed), cfg.validation_max_cells
    )[1]
    again = train._validation_elbo(m, data, val_idx, torch.device("cpu"), None, None, cfg)
    assert again == pytest.approx(min(checks), rel=1e-5)


def test_epoch_ceiling_is_the_default_reason():
    x, cond = _counts(200)
    h = train.fit(_conditions_module(), train.CellData(x, cond), _cfg(max_epochs=3))
    assert h["stop_reason"] == "max_epochs" and h["epochs"] == 3 and h["checks"] == []
    assert h["passes"] == pytest.approx(3.0, abs=0.02)
    # wall and process CPU time of every epoch (the gene-selection speed benchmark reads both)
    assert len(h["epoch_seconds"]) == len(h["epoch_cpu_seconds"]) == 3
    assert all(v >= 0.0 for v in h["epoch_cpu_seconds"])


def test_checks_inside_an_epoch_in_memory_and_streaming():
    x, cond = _counts(3000, seed=1)
    cfg = _cfg(
        max_epochs=3,
        batch_size=64,
        convergence_rtol=0.0,
        convergence_window=50,
        check_every_cells=640,
        chunk_size=500,
    )
    mem = train.fit(_conditions_module(), train.CellData(x, cond), cfg)
    reader = _ArrayReader(x)
    stream = train.StreamingCellData(
        reader, cond, np.asarray(x.sum(1)).ravel(), block_rows=500, blocks_per_window=2
    )
    st = train.fit(_conditions_module(), stream, cfg)
    for h in (mem, st):
        assert h["stop_reason"] == "max_epochs"  # rtol 0 never converges on a falling loss
        passes = [c["passes"] for c in h["checks"]]
        n_train = h["n_train_cells"]
        # a check every 640 training cells (10 minibatches of 64), the first inside epoch 1
        assert 640 / n_train - 1e-4 <= passes[0] <= 704 / n_train + 1e-4  # rounded to 1e-4
        assert len(passes) == int(h["passes"] * n_train // 640)
        assert all(b > a for a, b in zip(passes, passes[1:], strict=False))
    # streaming: the precompute pass gathered the validation cells (checks began in epoch 1)
    # and every epoch read the file once more: 1 + 3 passes, never more
    assert sum(hi - lo for lo, hi in reader.spans) == 4 * 3000
    assert st["streaming"]["validation_cached_cells"] == st["n_validation_cells"]


def test_converges_inside_an_epoch_on_a_large_query():
    x, cond = _counts(6000, seed=3)
    h = train.fit(
        _conditions_module(),
        train.CellData(x, cond),
        _cfg(max_epochs=50, batch_size=64, lr=3e-2, convergence_rtol=1e-3, check_every_cells=512),
    )
    assert h["stop_reason"] == "converged"
    # stopped inside an epoch, long before the ceiling
    assert h["passes"] < h["epochs"] <= 5 and h["passes"] != int(h["passes"])


def test_posterior_mean_from_the_precomputed_first_layer():
    x, cond = _counts(500, seed=4)
    data = train.CellData(x, cond)
    m = _conditions_module()
    h = train.fit(m, data, _cfg(max_epochs=2), keep_first_layer=True)
    h0 = h["first_layer"]
    assert h0.shape == (500, 16)
    assert "first_layer" not in train.fit(m, data, _cfg(max_epochs=1))
    z_counts = train.posterior_mean(m, data, batch_size=128)
    z_h0 = train.posterior_mean(m, data, batch_size=128, h0=h0)
    np.testing.assert_allclose(z_h0, z_counts, rtol=0, atol=1e-5)


def test_checks_leave_a_run_that_hits_the_ceiling_bit_identical():
    """A small query checks less often than its epochs (here every 3,000 cells over 270-cell
    epochs: two checks, too few for the rule) and runs to its ceiling: it trains exactly as
    without the rule."""
    x, cond = _counts(300, seed=5)
    data = train.CellData(x, cond)
    plain, checked = _conditions_module(), _conditions_module()
    h1 = train.fit(plain, data, _cfg(max_epochs=30))
    h2 = train.fit(
        checked,
        data,
        _cfg(max_epochs=30, convergence_rtol=1e-9, convergence_window=3, check_every_cells=3000),
    )
    assert h2["stop_reason"] == "max_epochs" and len(h2["checks"]) == 2
    assert h1["train_loss"] == h2["train_loss"]
    assert h1["validation_elbo"] == h2["validation_elbo"]
    for (n1, p1), (n2, p2) in zip(
        plain.named_parameters(), checked.named_parameters(), strict=True
    ):
        assert n1 == n2 and torch.equal(p1, p2), n1


def test_thread_choice_follows_the_problem_size_and_the_idle_cores():
    # minibatch steps: one thread, whatever the machine
    assert train.choose_threads(128, cores=16, load=0.0) == 1
    assert train.choose_threads(train.PARALLEL_MIN_ROWS - 1, cores=16, load=0.0) == 1
    # whole-data chunks: the idle cores, at least one
    assert train.choose_threads(4096, cores=2, load=0.0) == 2
    assert train.choose_threads(4096, cores=2, load=0.4) == 1
    assert train.choose_threads(4096, cores=16, load=3.2) == 12
    assert train.choose_threads(4096, cores=2, load=14.0) == 1
    assert 1 <= train.choose_threads(4096) <= len(os.sched_getaffinity(0))


def test_thread_settings_are_restored():
    before = torch.get_num_threads()
    with train.intra_op_threads(1):
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == before
    x, cond = _counts(300, seed=6)
    h = train.fit(_conditions_module(), train.CellData(x, cond), _cfg(max_epochs=1))
    assert h["precompute_threads"] >= 1 and torch.get_num_threads() == before


def test_mmap_threshold_is_pinned_for_chunked_passes():
    from scarches_fl import _memory

    x, cond = _counts(200, seed=7)
    train.fit(_conditions_module(), train.CellData(x, cond), _cfg(max_epochs=1))
    # glibc: pinned by the fast path's precompute, and pinning again is a no-op
    if platform.libc_ver()[0] == "glibc":
        assert _memory._pinned is True
    assert _memory.pin_mmap_threshold() is _memory._pinned
