"""Label knowledge of a federated reference from per-site statistics: pooling is exact, a type
below the site floor never leaves a site, a type below k never enters the bundle, and the
calibration read off pooled sums matches the one computed on the pooled cells."""

from __future__ import annotations

import numpy as np
import pytest

from scarches_fl import _federated_labels as FL
from scarches_fl import labels as L


def _cells(seed: int, n: dict[str, int], d: int = 4):
    rng = np.random.default_rng(seed)
    centres = {"alpha": 0.0, "beta": 3.0, "delta": -3.0, "gamma": 6.0}
    z = np.concatenate(
        [rng.normal(centres[t], 1.0 + 0.1 * i, size=(k, d)) for i, (t, k) in enumerate(n.items())]
    )
    y = np.concatenate([[t] * k for t, k in n.items()]).astype(object)
    return z, y


def test_pooled_statistics_equal_those_of_the_pooled_cells():
    za, ya = _cells(0, {"alpha": 40, "beta": 12, "delta": 3})
    zb, yb = _cells(1, {"alpha": 25, "beta": 30, "delta": 9})
    shares = [FL.site_statistics(za, ya, site_floor=5), FL.site_statistics(zb, yb, site_floor=5)]
    assert "delta" not in shares[0] and shares[1]["delta"].n == 9  # 3 cells never leave site A
    pooled = FL.pool_statistics(shares)
    for t in ("alpha", "beta"):
        zt = np.concatenate([za[ya == t], zb[yb == t]])
        r = zt - zt.mean(axis=0)
        assert pooled[t].n == len(zt)
        np.testing.assert_allclose(pooled[t].mean, zt.mean(axis=0), rtol=1e-12)
        np.testing.assert_allclose(pooled[t].scatter, r.T @ r, rtol=1e-10, atol=1e-10)
    # k = 20 on the pooled count: delta (9 cells that left a site) stays out of the bundle.
    model = FL.prototype_model(pooled, min_cells=20)
    assert model["classes"] == ["alpha", "beta"]
    assert model["type_cell_counts"] == {"alpha": 65, "beta": 42}
    with pytest.raises(ValueError, match="no cell type has 100"):
        FL.prototype_model(pooled, min_cells=100)


def test_arrays_round_trip_and_bad_shares_are_refused():
    z, y = _cells(2, {"alpha": 10, "beta": 8})
    names, arrays = FL.statistics_to_arrays(FL.site_statistics(z, y))
    back = FL.statistics_from_arrays(names, arrays, n_latent=4)
    assert {t: s.n for t, s in back.items()} == {"alpha": 10, "beta": 8}
    bad = dict(arrays, counts=arrays["counts"] + 0.5)
    with pytest.raises(ValueError, match="positive integers"):
        FL.statistics_from_arrays(names, bad, n_latent=4)
    with pytest.raises(ValueError, match="shape"):
        FL.statistics_from_arrays(names, arrays, n_latent=3)
    nan = dict(arrays, sums=np.full_like(arrays["sums"], np.nan))
    with pytest.raises(ValueError, match="NaN"):
        FL.statistics_from_arrays(names, nan, n_latent=4)


def test_calibration_from_site_sums_matches_the_pooled_cells():
    za, ya = _cells(3, {"alpha": 200, "beta": 150, "gamma": 80})
    zb, yb = _cells(4, {"alpha": 120, "beta": 60, "gamma": 90})
    pooled = FL.pool_statistics([FL.site_statistics(za, ya), FL.site_statistics(zb, yb)])
    model = FL.prototype_model(pooled, min_cells=20)
    cal = FL.calibrate([FL.site_calibration(model, za, ya), FL.site_calibration(model, zb, yb)])
    z, y = np.concatenate([za, zb]), np.concatenate([ya, yb])
    classes = model["classes"]
    yk = np.array([classes.index(v) for v in y])
    logits, maha = L._proto_scores(z, model, classes)
    assert cal["temperature"] == pytest.approx(L._fit_temperature(logits, yk), rel=1e-6)
    exact = np.quantile(maha, np.linspace(0, 1, L._N_QUANTILES))
    got = np.asarray(cal["novelty_quantiles"])
    # binned quantiles: within one bin width (4.7 %) of the exact ones inside the range
    np.testing.assert_allclose(got[1:-1], exact[1:-1], rtol=0.05)
    assert cal["out_of_fold_accuracy"] == pytest.approx(np.mean(logits.argmax(1) == yk), abs=1e-6)
    knowledge = FL.label_knowledge("cell_type", model, cal, n_latent=4)
    pred = L.predict_labels(knowledge, {}, z, label_key="cell_type", method="prototype")
    assert np.mean(pred.pred == y) > 0.9
