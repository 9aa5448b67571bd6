"""The growth benchmark's explanation of a missed new type (``benchmarks/bench_growth.py``):
how far one type's means at two sites differ once each site's frame is removed."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from benchmarks.bench_growth import site_to_site_residuals


def _contribution(means: dict[str, np.ndarray], counts: dict[str, int]) -> SimpleNamespace:
    return SimpleNamespace(
        prototypes=[
            {"name": t, "count": counts[t], "expression": {"mean": m.tolist()}}
            for t, m in means.items()
        ]
    )


def test_a_frame_offset_leaves_only_the_type_specific_difference():
    ref = np.array([[0.0, 0.0, 0.0], [5.0, 0.0, 0.0], [0.0, 5.0, 0.0]])
    level = {
        "classes": ["a", "b", "c"],
        "cell_counts": [200, 200, 200],
        "means_tensor": "m",
        "covariance_tensor": "s",
    }
    tensors = {"m": ref, "s": np.diag([4.0, 4.0, 4.0])}  # whitened units: half the raw ones
    new = np.array([0.0, 0.0, 6.0])
    frame_a, frame_c = np.array([1.0, -2.0, 0.5]), np.array([-3.0, 0.0, 2.0])
    counts = {"a": 40, "b": 20, "new": 30}
    site_a = {"a": ref[0] + frame_a, "b": ref[1] + frame_a, "new": new + frame_a}
    site_c = {"a": ref[0] + frame_c, "b": ref[1] + frame_c, "new": new + frame_c}
    same = site_to_site_residuals(
        _contribution(site_a, counts), _contribution(site_c, counts), level, tensors
    )
    assert same == {"a": 0.0, "b": 0.0, "new": 0.0}  # one offset per site explains it all
    site_c["new"] = site_c["new"] + np.array([0.0, 3.0, 4.0])  # C's cells of it differ: |d| 5
    apart = site_to_site_residuals(
        _contribution(site_a, counts), _contribution(site_c, counts), level, tensors
    )
    assert apart["new"] == pytest.approx(2.5)  # 5 raw units at standard deviation 2
    assert apart["a"] == apart["b"] == 0.0
