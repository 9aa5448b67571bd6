"""Each metric on a constructed case whose answer is known."""

from __future__ import annotations

import math

import numpy as np
import pytest

from scarches_fl import metrics as M


def _blobs(n_per: int, centers: list[list[float]], scale: float, seed: int = 0):
    rng = np.random.default_rng(seed)
    z = np.concatenate([rng.normal(c, scale, size=(n_per, len(c))) for c in centers])
    y = np.repeat([f"t{i}" for i in range(len(centers))], n_per)
    return z, y


def test_ebm_zero_when_batches_are_separated():
    z, b = _blobs(100, [[0, 0], [100, 100]], 1.0)
    assert M.entropy_of_batch_mixing(z, b, seed=1) == 0.0


def test_ebm_near_one_when_batches_are_identically_distributed():
    rng = np.random.default_rng(0)
    z = rng.normal(size=(600, 5))
    b = np.tile(["a", "b"], 300)
    ebm = M.entropy_of_batch_mixing(z, b)
    # k=15 neighbours drawn i.i.d. from two equal batches: expected normalised entropy ~0.95
    assert 0.9 < ebm <= 1.0
    nats = M.entropy_of_batch_mixing(z, b, normalize=False)
    assert nats == pytest.approx(ebm * math.log(2))


def test_ebm_needs_two_batches():
    with pytest.raises(M.MetricError, match="2 batches"):
        M.entropy_of_batch_mixing(np.zeros((10, 2)), ["a"] * 10)


def test_knn_purity_one_for_separated_types_and_half_for_random_labels():
    z, y = _blobs(50, [[0, 0], [50, 0], [0, 50]], 1.0)
    assert M.knn_purity(z, y) == 1.0
    rng = np.random.default_rng(3)
    z = rng.normal(size=(2000, 3))
    y = rng.permutation(np.repeat(["a", "b"], 1000))
    assert M.knn_purity(z, y) == pytest.approx(0.5, abs=0.03)


def test_knn_purity_averages_over_labels_not_cells():
    # a big pure type and a tiny type whose 3 cells sit inside the big one: cell-average would
    # be ~0.99, label-average is (1 + ~0) / 2
    rng = np.random.default_rng(0)
    z = rng.normal(size=(300, 2))
    y = np.array(["big"] * 297 + ["tiny"] * 3)
    purity = M.knn_purity(z, y, k=15)
    assert 0.45 < purity < 0.6


def test_label_silhouette_of_tight_separated_clusters_is_near_one():
    z, y = _blobs(40, [[0, 0], [100, 0]], 0.1)
    assert M.label_silhouette(z, y) > 0.99
    # random labels in one blob: silhouette ~0 -> ~0.5
    rng = np.random.default_rng(1)
    z = rng.normal(size=(400, 2))
    y = rng.permutation(np.repeat(["a", "b"], 200))
    assert M.label_silhouette(z, y) == pytest.approx(0.5, abs=0.05)


def test_batch_silhouette_one_when_mixed_low_when_split():
    rng = np.random.default_rng(2)
    z = rng.normal(size=(400, 2))
    b = np.tile(["x", "y"], 200)
    y = np.array(["t"] * 400)
    assert M.batch_silhouette(z, b, y) > 0.9  # |s_i| is small noise around 0
    z_split = np.concatenate([rng.normal(0, 0.1, (200, 2)), rng.normal(50, 0.1, (200, 2))])
    b_split = np.repeat(["x", "y"], 200)
    assert M.batch_silhouette(z_split, b_split, y) < 0.01


def test_nmi_ari_one_for_separated_clusters():
    z, y = _blobs(30, [[0, 0], [20, 0], [0, 20]], 0.5)
    res = M.clustering_nmi_ari(z, y)
    assert res["nmi"] == pytest.approx(1.0)
    assert res["ari"] == pytest.approx(1.0)


def test_accuracy_and_macro_f1_by_hand():
    true = ["a", "a", "b", "b"]
    pred = ["a", "b", "b", "b"]
    assert M.label_accuracy(true, pred) == 0.75
    # F1_a: P=1, R=1/2 -> 2/3; F1_b: P=2/3, R=1 -> 4/5; mean = 11/15
    assert M.macro_f1(true, pred) == pytest.approx(11 / 15)
    # "Unknown" counts as wrong and is not a class of its own
    assert M.label_accuracy(true, ["a", "Unknown", "b", "b"]) == 0.75
    assert M.macro_f1(true, ["a", "Unknown", "b", "b"]) == pytest.approx((2 / 3 + 1.0) / 2)


def test_auroc_by_hand():
    u = [0.9, 0.4, 0.5, 0.1]
    novel = [True, True, False, False]
    # pairs (novel, known): 0.9>0.5, 0.9>0.1, 0.4<0.5, 0.4>0.1 -> 3/4
    assert M.unknown_detection_auroc(u, novel) == 0.75
    assert M.unknown_detection_auroc([1, 1, 0, 0], novel) == 1.0
    assert M.unknown_detection_auroc([0.3] * 4, novel) == 0.5
    with pytest.raises(M.MetricError):
        M.unknown_detection_auroc([0.1, 0.2], [True, True])


def test_label_transfer_metrics_novel_types():
    true = ["a", "a", "b", "z", "z"]
    pred = ["a", "a", "a", "Unknown", "b"]
    unc = [0.1, 0.2, 0.3, 0.9, 0.6]
    out = M.label_transfer_metrics(true, pred, unc, reference_labels=["a", "b"])
    assert out["accuracy"] == pytest.approx(2 / 5)
    assert out["accuracy_known_types"] == pytest.approx(2 / 3)
    assert out["novel_types"] == ["z"]
    assert out["novel_fraction_called_unknown"] == 0.5
    assert out["novel_auroc"] == 1.0
    assert out["fraction_unknown"] == pytest.approx(1 / 5)
    # open-set: the Unknown call on the "z" cell is right (z is not a reference type)
    assert out["open_set_accuracy"] == pytest.approx(3 / 5)


def test_label_transfer_metrics_with_an_unknown_reference_type():
    # annotations often carry an "Unknown" type of their own: the report must still score
    true = ["a", "Unknown", "z"]
    pred = ["a", "Unknown", "Unknown"]
    out = M.label_transfer_metrics(true, pred, [0.1, 0.9, 0.8],
                                   reference_labels=["a", "Unknown"])
    assert out["open_set_accuracy"] == 1.0 and out["accuracy"] == pytest.approx(2 / 3)


def test_open_set_accuracy_by_hand():
    true = ["a", "b", "z", "z", "a"]
    # right: a; Unknown for z (absent from the reference); wrong: b called Unknown, z called b,
    # a called b
    pred = ["a", "Unknown", "Unknown", "b", "b"]
    assert M.open_set_accuracy(true, pred, ["a", "b"]) == pytest.approx(2 / 5)
    # every type known: the same as label accuracy
    assert M.open_set_accuracy(true, pred, ["a", "b", "z"]) == M.label_accuracy(true, pred)
    with pytest.raises(M.MetricError, match="Unknown"):
        M.open_set_accuracy(true, pred, ["a", "Unknown"])


def test_integration_metrics_returns_every_metric():
    z, y = _blobs(40, [[0, 0], [30, 0]], 1.0)
    b = np.tile(["x", "y"], 40)
    out = M.integration_metrics(z, b, y)
    for key in (
        "entropy_of_batch_mixing",
        "batch_silhouette",
        "knn_purity",
        "label_silhouette",
        "nmi",
        "ari",
    ):
        assert 0.0 <= out[key] <= 1.0, key
    assert out["knn_purity"] == 1.0


def test_bad_inputs_are_typed_errors():
    with pytest.raises(M.MetricError, match="NaN"):
        M.knn_purity(np.array([[np.nan, 0], [0, 0]]), ["a", "b"])
    with pytest.raises(M.MetricError, match="entries"):
        M.knn_purity(np.zeros((3, 2)), ["a", "b"])
