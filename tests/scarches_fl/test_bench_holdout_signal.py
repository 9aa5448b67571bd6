"""The held-out-type signal baselines (``benchmarks/bench_holdout_signal.py``) on constructed
data where the answer is known."""

from __future__ import annotations

import numpy as np
import pytest

from benchmarks.bench_holdout_signal import (
    log_normalize,
    query_supervised_auroc,
    reference_baselines,
)


def _counts(rng, n: int, program: np.ndarray) -> np.ndarray:
    return rng.poisson(program[None, :] * rng.uniform(0.8, 1.2, size=(n, 1)))


def _case(novel_program_differs: bool, seed: int = 0):
    rng = np.random.default_rng(seed)
    g = 60
    base = rng.gamma(2.0, 2.0, size=g)
    programs = {}
    for i, t in enumerate(["a", "b", "c"]):
        p = base.copy()
        p[i * 10 : i * 10 + 10] *= 8.0  # each known type has its own 10 marker genes
        programs[t] = p
    if novel_program_differs:
        novel = base.copy()
        novel[40:50] *= 8.0  # markers no reference type has
    else:
        novel = programs["a"].copy()  # indistinguishable from type "a"
    xr = np.concatenate([_counts(rng, 60, programs[t]) for t in "abc"])
    yr = np.repeat(np.array(["a", "b", "c"]), 60)
    xq = np.concatenate([_counts(rng, 40, programs[t]) for t in "abc"] + [_counts(rng, 40, novel)])
    is_novel = np.r_[np.zeros(120, bool), np.ones(40, bool)]
    return log_normalize(xr), yr, log_normalize(xq), is_novel


def test_log_normalize_is_log1p_cp10k():
    x = np.array([[1.0, 3.0], [0.0, 0.0]])
    out = log_normalize(x)
    assert out[0] == pytest.approx(np.log1p([2500.0, 7500.0]))
    assert np.all(out[1] == 0.0)  # an empty cell stays zero instead of dividing by zero


def test_a_type_with_its_own_markers_is_found_by_every_baseline():
    xr, yr, xq, novel = _case(novel_program_differs=True)
    assert query_supervised_auroc(xq, novel) > 0.99
    res = reference_baselines(xr, yr, xq, novel)
    assert res["reference_expression_lr"] > 0.95
    assert res["reference_expression_knn"] > 0.95


def test_a_type_identical_to_a_known_one_cannot_be_told_apart():
    xr, yr, xq, novel = _case(novel_program_differs=False)
    res = reference_baselines(xr, yr, xq, novel)
    # the "novel" cells are type a: nothing can flag them beyond chance
    assert res["reference_expression_lr"] < 0.75
    assert res["reference_expression_knn"] < 0.75
