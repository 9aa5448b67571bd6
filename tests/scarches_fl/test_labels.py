"""Label transfer on constructed latent spaces where the right answer is known."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from scarches_fl import labels as L
from scarches_fl.metrics import unknown_detection_auroc

CENTERS = {"alpha": [0.0, 0.0, 0.0], "beta": [8.0, 0.0, 0.0], "delta": [0.0, 8.0, 0.0]}


def _gaussians(n_per: int = 60, seed: int = 0, centers=CENTERS, scale: float = 1.0):
    rng = np.random.default_rng(seed)
    z = np.concatenate([rng.normal(c, scale, size=(n_per, len(c))) for c in centers.values()])
    y = np.repeat(list(centers), n_per)
    return z, y


def _all_floats_finite(obj) -> bool:
    if isinstance(obj, float):
        return math.isfinite(obj)
    if isinstance(obj, dict):
        return all(isinstance(k, str) and _all_floats_finite(v) for k, v in obj.items())
    if isinstance(obj, list):
        return all(_all_floats_finite(v) for v in obj)
    return isinstance(obj, (str, int, bool)) or obj is None


@pytest.fixture(scope="module")
def knowledge():
    z, y = _gaussians()
    return L.build_label_knowledge(z, {"cell_type": y}, include_atlas=True)


def test_manifest_is_plain_finite_json(knowledge):
    manifest, tensors = knowledge
    text = json.dumps(manifest, allow_nan=False, sort_keys=True)
    assert json.loads(text) == manifest
    assert _all_floats_finite(manifest)
    assert manifest["knowledge"] == ["prototypes", "atlas"]
    assert set(tensors) == {"atlas.latent", "atlas.labels.0"}
    assert tensors["atlas.latent"].dtype == np.float32
    assert tensors["atlas.labels.0"].dtype == np.float32
    assert manifest["levels"]["cell_type"]["atlas"]["classes"] == ["alpha", "beta", "delta"]


def test_no_atlas_unless_opted_in():
    z, y = _gaussians()
    manifest, tensors = L.build_label_knowledge(z, {"cell_type": y})
    assert tensors == {}
    assert manifest["atlas"] == {"included": False}
    assert "atlas" not in manifest["levels"]["cell_type"]
    pred = L.predict_labels(manifest, {}, z, label_key="cell_type")
    assert pred.method == "prototype"
    with pytest.raises(L.LabelTransferError, match="atlas"):
        L.predict_labels(manifest, {}, z, label_key="cell_type", method="knn")


def test_same_seed_same_knowledge():
    z, y = _gaussians()
    a = L.build_label_knowledge(z, {"cell_type": y}, seed=3)[0]
    b = L.build_label_knowledge(z, {"cell_type": y}, seed=3)[0]
    assert json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)


@pytest.mark.parametrize("method", ["knn", "prototype"])
def test_separated_types_are_recovered_with_low_uncertainty(knowledge, method):
    manifest, tensors = knowledge
    zq, yq = _gaussians(n_per=30, seed=1)
    pred = L.predict_labels(manifest, tensors, zq, label_key="cell_type", method=method)
    assert np.mean(pred.top_label == yq) > 0.97
    # cells drawn like the reference are called Unknown at about the designed rate, tail / 2 =
    # 2.5 % (the reference's own farthest 2.5 %): here at most 3 of 90
    assert np.mean(pred.pred == "Unknown") <= 0.034
    assert np.mean(pred.pred == yq) > 0.96
    assert pred.uncertainty.dtype == np.float32
    assert np.median(pred.uncertainty) < 0.1
    assert np.all((pred.uncertainty >= 0) & (pred.uncertainty <= 1))
    np.testing.assert_allclose(pred.probabilities.sum(axis=1), 1.0, rtol=1e-5)


@pytest.mark.parametrize("method", ["knn", "prototype"])
def test_novel_type_far_away_is_unknown(knowledge, method):
    manifest, tensors = knowledge
    zq, yq = _gaussians(
        n_per=30, seed=2, centers={"beta": CENTERS["beta"], "novel": [0.0, 0.0, 12.0]}
    )
    pred = L.predict_labels(manifest, tensors, zq, label_key="cell_type", method=method)
    novel = yq == "novel"
    assert unknown_detection_auroc(pred.uncertainty, novel) > 0.99
    assert np.mean(pred.pred[novel] == L.UNKNOWN) > 0.9
    assert np.mean(pred.pred[~novel] == "beta") > 0.9


def test_novelty_factor_formula_and_tie_breaking_inside_the_range():
    # reference statistic uniform on [0, 10]: F = 1 - stat / 10 inside the range
    quantiles = np.linspace(0.0, 10.0, 41)
    stat = np.array([0.0, 2.0, 8.0, 9.9])
    f = L._novelty_factor(stat, quantiles, tail=0.05)
    frac = 1.0 - stat / 10.0
    expected = np.minimum(1.0, frac / 0.05) * (1.0 - L.RANGE_SLOPE * (1.0 - frac))
    np.testing.assert_allclose(f, expected, atol=1e-9)
    # inside the range a cell loses at most RANGE_SLOPE of its confidence, but the order of
    # the distances is kept (no ties at 1)
    assert np.all(np.diff(f) < 0)
    assert f[2] >= 1.0 - L.RANGE_SLOPE


@pytest.mark.parametrize("method", ["knn", "prototype"])
def test_cells_inside_the_reference_range_are_ranked_by_distance(knowledge, method):
    # a query group 2.5 sd off the beta centre along an axis the reference never varies on
    # more than that: inside the range, confidently beta, yet farther out than most reference
    # cells. Its uncertainty must rank above beta cells drawn like the reference.
    manifest, tensors = knowledge
    zq, yq = _gaussians(
        n_per=40, seed=4, centers={"beta": CENTERS["beta"], "off": [8.0, 0.0, 2.5]}, scale=0.3
    )
    pred = L.predict_labels(manifest, tensors, zq, label_key="cell_type", method=method)
    off = yq == "off"
    assert np.all(pred.top_label == "beta")
    assert unknown_detection_auroc(pred.uncertainty, off) > 0.95


def test_plain_scarches_uncertainty_ignores_distance(knowledge):
    """With novelty=False the kNN uncertainty is exactly 1 - top probability (scArches)."""
    manifest, tensors = knowledge
    zq = np.array([[0.0, 0.0, 30.0]])  # far from everything, but all neighbours are alpha
    plain = L.predict_labels(manifest, tensors, zq, label_key="cell_type", novelty=False)
    assert plain.pred[0] == "alpha"
    assert plain.uncertainty[0] == pytest.approx(1.0 - plain.probabilities[0].max(), abs=1e-6)
    full = L.predict_labels(manifest, tensors, zq, label_key="cell_type")
    assert full.pred[0] == L.UNKNOWN and full.uncertainty[0] > 0.99
    assert full.top_label[0] == "alpha"


def test_cell_between_two_types_is_uncertain():
    # two 1-D types with the query exactly in the middle: kNN gives ~half weight to each
    rng = np.random.default_rng(0)
    z = np.concatenate([rng.normal(-1, 0.3, (200, 1)), rng.normal(1, 0.3, (200, 1))])
    y = np.repeat(["a", "b"], 200)
    manifest, tensors = L.build_label_knowledge(z, {"t": y}, include_atlas=True)
    pred = L.predict_labels(manifest, tensors, np.zeros((1, 1)), label_key="t", novelty=False)
    assert 0.3 < pred.uncertainty[0] <= 0.5 + 1e-6
    proto = L.predict_labels(
        manifest, tensors, np.zeros((1, 1)), label_key="t", method="prototype", novelty=False
    )
    assert proto.uncertainty[0] == pytest.approx(0.5, abs=0.1)


def test_kernel_weights_follow_the_scarches_formula():
    dist = np.array([[1.0, 2.0, 3.0]])
    s = np.std(dist)
    raw = np.exp(-dist / (2.0 / s) ** 2)
    np.testing.assert_allclose(L._kernel_weights(dist), raw / raw.sum(), rtol=1e-12)


def test_threshold_is_configurable(knowledge):
    manifest, tensors = knowledge
    zq = np.array([[4.0, 0.0, 0.0], [0.0, 0.0, 0.0]])  # between alpha and beta; inside alpha
    strict = L.predict_labels(manifest, tensors, zq, label_key="cell_type", threshold=0.0)
    assert (strict.pred == L.UNKNOWN).all() or strict.uncertainty.min() == 0.0
    lenient = L.predict_labels(manifest, tensors, zq, label_key="cell_type", threshold=1.0)
    assert L.UNKNOWN not in set(lenient.pred)
    assert lenient.pred[1] == "alpha"


def test_min_cells_and_multimodal_prototypes():
    rng = np.random.default_rng(0)
    parts = [
        rng.normal([0, 0], 0.5, (80, 2)),  # "bi": two well separated modes
        rng.normal([20, 0], 0.5, (80, 2)),
        rng.normal([0, 20], 0.5, (120, 2)),  # "uni": one mode
        rng.normal([20, 20], 0.5, (10, 2)),  # "rare": below min_cells
    ]
    z = np.concatenate(parts)
    y = np.array(["bi"] * 160 + ["uni"] * 120 + ["rare"] * 10)
    manifest, _ = L.build_label_knowledge(z, {"t": y}, min_cells=20)
    proto = manifest["levels"]["t"]["prototype"]
    # every labelled type is a class; the rare one (below min_cells) gets one wider prototype
    assert proto["classes"] == ["bi", "rare", "uni"]
    assert proto["few_cell_types"] == {"rare": 10} and proto["excluded_types"] == {}
    assert proto["type_cell_counts"] == {"bi": 160, "rare": 10, "uni": 120}
    per_type = {c: [p for p in proto["prototypes"] if p["label"] == c] for c in proto["classes"]}
    assert len(per_type["bi"]) == 2 and len(per_type["uni"]) == 1 and len(per_type["rare"]) == 1
    assert per_type["rare"][0]["spread_inflation"] >= 1.1 - 1e-6
    assert all("spread_inflation" not in p for p in per_type["bi"] + per_type["uni"])
    means = sorted(tuple(np.round(p["mean"])) for p in per_type["bi"])
    assert means == [(0.0, 0.0), (20.0, 0.0)]
    assert all(len(p["std"]) == 2 and min(p["std"]) > 0 for p in proto["prototypes"])
    # with a lower minimum the rare type gets an ordinary prototype
    low = L.build_label_knowledge(z, {"t": y}, min_cells=5)[0]["levels"]["t"]["prototype"]
    assert "rare" in low["classes"] and low["few_cell_types"] == {}
    assert all("spread_inflation" not in p for p in low["prototypes"])


def test_large_types_are_fitted_on_a_sample_but_counted_whole():
    rng = np.random.default_rng(1)
    z = np.concatenate(
        [
            rng.normal([0, 0, 0], 1.0, (3000, 3)),  # big: sampled down to 500
            rng.normal([9, 0, 0], 1.0, (300, 3)),
        ]
    )  # small: fitted whole
    y = np.array(["big"] * 3000 + ["small"] * 300)
    capped = L.build_label_knowledge(z, {"t": y}, max_cells_per_type=500)[0]
    whole = L.build_label_knowledge(z, {"t": y}, max_cells_per_type=None)[0]
    pc, pw = (m["levels"]["t"]["prototype"] for m in (capped, whole))
    assert pc["fitted_on_cells_per_type"] == 500 and "fitted_on_cells_per_type" not in pw
    # priors and counts from every cell, not from the sample
    assert pc["cell_counts"] == pw["cell_counts"] == [3000, 300]
    np.testing.assert_allclose(pc["class_prior"], [3000 / 3300, 300 / 3300], rtol=1e-6)
    for c in ("big", "small"):
        assert sum(p["n_cells"] for p in pc["prototypes"] if p["label"] == c) == (
            3000 if c == "big" else 300
        )
    # the sample's prototype is the whole type's, within sampling error (sd 1 / sqrt(500))
    big_c = [p for p in pc["prototypes"] if p["label"] == "big"]
    assert len(big_c) == 1
    np.testing.assert_allclose(big_c[0]["mean"], z[:3000].mean(axis=0), atol=0.15)
    # and the predictions agree
    q = np.concatenate([rng.normal([0, 0, 0], 1.0, (200, 3)), rng.normal([9, 0, 0], 1.0, (200, 3))])
    a = L.predict_labels(capped, {}, q, label_key="t").pred
    b = L.predict_labels(whole, {}, q, label_key="t").pred
    assert np.mean(a == b) >= 0.99
    with pytest.raises(L.LabelTransferError, match="max_cells_per_type"):
        L.build_label_knowledge(z, {"t": y}, max_cells_per_type=5)


def test_several_label_levels_at_once():
    z, fine = _gaussians()
    coarse = np.where(fine == "alpha", "endocrine_a", "other")
    coarse[:5] = None  # unlabelled cells are allowed and skipped
    manifest, tensors = L.build_label_knowledge(
        z, {"coarse": coarse, "fine": fine}, include_atlas=True
    )
    assert list(manifest["levels"]) == ["coarse", "fine"]
    assert tensors["atlas.labels.0"][:5].tolist() == [-1.0] * 5
    zq, yq = _gaussians(n_per=20, seed=5)
    preds = L.predict_label_levels(manifest, tensors, zq)
    assert set(preds) == {"coarse", "fine"}
    assert np.mean(preds["fine"].pred == yq) > 0.95
    expected_coarse = np.where(yq == "alpha", "endocrine_a", "other")
    assert np.mean(preds["coarse"].pred == expected_coarse) > 0.95


def test_errors_name_the_fix(knowledge):
    manifest, tensors = knowledge
    with pytest.raises(L.LabelTransferError, match="has no label level 'fine'"):
        L.predict_labels(manifest, tensors, np.zeros((2, 3)), label_key="fine")
    with pytest.raises(L.LabelTransferError, match="same reference model"):
        L.predict_labels(manifest, tensors, np.zeros((2, 4)), label_key="cell_type")
    with pytest.raises(L.LabelTransferError, match="--label-key"):
        L.predict_labels({}, {}, np.zeros((2, 3)), label_key="cell_type")
    with pytest.raises(L.LabelTransferError, match="one label per latent row"):
        L.build_label_knowledge(np.zeros((5, 2)), {"t": ["a"] * 4})
    with pytest.raises(L.LabelTransferError, match="NaN"):
        L.build_label_knowledge(np.full((5, 2), np.nan), {"t": ["a"] * 5})
    with pytest.raises(L.LabelTransferError, match="mapping"):
        L.build_label_knowledge(np.zeros((5, 2)), ["a"] * 5)  # type: ignore[arg-type]


@pytest.mark.slow  # pynndescent's first call compiles with numba: minutes on 2 cores
def test_large_atlas_uses_pynndescent(monkeypatch):
    """Above the exact-kNN size the approximate index must give (nearly) the same answer."""
    z, y = _gaussians(n_per=200)
    manifest, tensors = L.build_label_knowledge(z, {"cell_type": y}, include_atlas=True)
    zq, yq = _gaussians(n_per=40, seed=9)
    exact = L.predict_labels(manifest, tensors, zq, label_key="cell_type")
    monkeypatch.setattr(L, "_KNN_EXACT_MAX", 100)
    monkeypatch.setattr(L, "_QUERY_CHUNK", 50)  # several chunks
    approx = L.predict_labels(manifest, tensors, zq, label_key="cell_type")
    assert np.mean(approx.top_label == exact.top_label) > 0.98
    assert np.mean(approx.pred == yq) > 0.95


@pytest.mark.parametrize("method", ["knn", "prototype"])
def test_chunked_scoring_matches_one_pass_and_builds_one_index(knowledge, monkeypatch, method):
    """Large queries are scored in chunks of ``_QUERY_CHUNK`` cells: same answer as one pass,
    and the kNN index over the atlas is built once per call, not once per chunk."""
    manifest, tensors = knowledge
    zq, _ = _gaussians(n_per=40, seed=5)  # 120 cells
    whole = L.predict_labels(manifest, tensors, zq, label_key="cell_type", method=method)
    built = []
    real_index = L._NeighbourIndex

    def counting_index(*args, **kwargs):
        built.append(1)
        return real_index(*args, **kwargs)

    monkeypatch.setattr(L, "_NeighbourIndex", counting_index)
    monkeypatch.setattr(L, "_QUERY_CHUNK", 7)  # 18 chunks, the last one short
    chunked = L.predict_labels(manifest, tensors, zq, label_key="cell_type", method=method)
    np.testing.assert_array_equal(chunked.pred, whole.pred)
    np.testing.assert_allclose(chunked.uncertainty, whole.uncertainty, atol=1e-7)
    np.testing.assert_allclose(chunked.probabilities, whole.probabilities, atol=1e-7)
    assert len(built) == (1 if method == "knn" else 0)


def test_knowledge_survives_canonical_json_and_bundle_round_trip(knowledge, tmp_path):
    """The labels dict is part of the signed manifest: canonical JSON, then back, same answers."""
    from protocols.bundle import make_bundle, read_bundle, write_bundle
    from protocols.canonical import canonical_json, parse_json_strict

    manifest, tensors = knowledge
    back = parse_json_strict(canonical_json(manifest), max_bytes=10_000_000)
    zq, _ = _gaussians(n_per=10, seed=4)
    for method in ("knn", "prototype"):
        a = L.predict_labels(manifest, tensors, zq, label_key="cell_type", method=method)
        b = L.predict_labels(back, tensors, zq, label_key="cell_type", method=method)
        np.testing.assert_array_equal(a.pred, b.pred)
        np.testing.assert_allclose(a.uncertainty, b.uncertainty, atol=1e-6)
    bundle_manifest = {
        "format": "scarches-fl.bundle",
        "format_version": 1,
        "model_class": "scarches_fl.CVAE",
        "hyperparameters": {},
        "genes": ["g1"],
        "conditions": ["ref/a"],
        "tensors": {
            name: {"role": "frozen", "dtype": "float32", "shape": list(arr.shape)}
            for name, arr in tensors.items()
        },
        "registration": {},
        "labels": manifest,
    }
    bundle = make_bundle(bundle_manifest, tensors)
    write_bundle(tmp_path / "b", bundle)
    loaded = read_bundle(tmp_path / "b")
    c = L.predict_labels(loaded.manifest["labels"], loaded.tensors, zq, label_key="cell_type")
    np.testing.assert_array_equal(
        c.pred, L.predict_labels(manifest, tensors, zq, label_key="cell_type").pred
    )


@pytest.mark.parametrize("method", ["knn", "prototype"])
def test_query_context_flags_a_query_only_population(knowledge, method):
    """A query population the reference lacks, lying between two reference types (so neither
    distance nor class overlap alone flags it reliably), is flagged once the query context is
    used; query cells of known types keep their labels."""
    manifest, tensors = knowledge
    z_known, y_known = _gaussians(n_per=40, seed=5)
    rng = np.random.default_rng(6)
    z_novel = rng.normal([4.0, 4.0, 0.0], 0.4, size=(60, 3))
    zq = np.concatenate([z_known, z_novel])
    novel = np.r_[np.zeros(len(z_known), bool), np.ones(len(z_novel), bool)]
    plain = L.predict_labels(manifest, tensors, zq, label_key="cell_type", method=method)
    ctx = L.predict_labels(
        manifest, tensors, zq, label_key="cell_type", method=method, query_context=True
    )
    assert np.array_equal(plain.top_label, ctx.top_label)
    assert np.all(ctx.uncertainty >= plain.uncertainty - 1e-6)
    assert ctx.uncertainty.dtype == np.float32
    assert 0.0 <= ctx.uncertainty.min() and ctx.uncertainty.max() <= 1.0
    assert unknown_detection_auroc(ctx.uncertainty, novel) >= 0.95
    assert np.mean(ctx.pred[novel] == "Unknown") >= 0.8
    assert np.mean(ctx.pred[~novel] == "Unknown") <= 0.1
    assert np.mean(ctx.pred[~novel] == y_known) >= 0.9


def test_reference_coverage_is_about_one_for_a_mixed_query():
    ref, _ = _gaussians(n_per=200, seed=1)
    query, _ = _gaussians(n_per=50, seed=2)
    cov = L._reference_coverage(ref, query, 30)
    assert 0.7 <= np.median(cov) <= 1.3
    far = L._reference_coverage(ref, query + 50.0, 30)
    assert np.all(far == 0.0)


def test_query_context_needs_enough_query_cells(knowledge):
    manifest, tensors = knowledge
    z, _ = _gaussians(n_per=5, seed=3)
    a = L.predict_labels(manifest, tensors, z, label_key="cell_type")
    b = L.predict_labels(manifest, tensors, z, label_key="cell_type", query_context=True)
    assert np.array_equal(a.uncertainty, b.uncertainty)
    with pytest.raises(L.LabelTransferError, match="context_floor"):
        L.predict_labels(
            manifest, tensors, z, label_key="cell_type", query_context=True, context_floor=0.0
        )


def _rare_type_split(n_rare_ref: int, seed: int = 0):
    """A latent with three common types and one rare type (``n_rare_ref`` reference cells),
    and a query with 40 cells of each, shifted a little (a new batch)."""
    rng = np.random.default_rng(seed)
    centres = {"a": [0, 0, 0, 0], "b": [6, 0, 0, 0], "c": [0, 6, 0, 0], "dc": [3, 3, 4, 0]}
    sizes = {"a": 400, "b": 300, "c": 300, "dc": n_rare_ref}
    z = np.concatenate([rng.normal(centres[t], 1.0, (n, 4)) for t, n in sizes.items()])
    y = np.concatenate([[t] * n for t, n in sizes.items()])
    zq = np.concatenate([rng.normal(np.add(centres[t], 0.3), 1.0, (40, 4)) for t in centres])
    yq = np.concatenate([[t] * 40 for t in centres])
    return z, y, zq, yq


@pytest.mark.parametrize("n_rare_ref", [10, 15, 19])
def test_rare_type_below_prototype_floor_is_named(n_rare_ref):
    z, y, zq, yq = _rare_type_split(n_rare_ref)
    manifest, tensors = L.build_label_knowledge(z, {"t": y}, min_cells=20)
    pred = L.predict_labels(manifest, tensors, zq, label_key="t", method="prototype")
    rare = yq == "dc"
    # named, not "Unknown", for most of its query cells
    assert np.mean(pred.pred[rare] == "dc") > 0.5
    assert np.mean(pred.top_label[rare] == "dc") > 0.7
    # the common types stay right: the rare class does not swallow its neighbours
    assert np.mean(pred.pred[~rare] == yq[~rare]) > 0.9


def test_rare_type_of_one_or_two_cells_does_not_break_calibration():
    z, y, zq, yq = _rare_type_split(2)
    manifest, tensors = L.build_label_knowledge(z, {"t": y}, min_cells=20)
    proto = manifest["levels"]["t"]["prototype"]
    assert proto["few_cell_types"] == {"dc": 2}
    assert np.isfinite(proto["calibration"]["temperature"])
    assert np.all(np.isfinite(proto["calibration"]["novelty_quantiles"]))
    pred = L.predict_labels(manifest, tensors, zq, label_key="t", method="prototype")
    assert np.mean(pred.pred[yq != "dc"] == yq[yq != "dc"]) > 0.9
