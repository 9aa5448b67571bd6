"""Expression prototypes (scarches_fl.refine, ADR 0070): fitted from reference counts, read at
the query with a per-batch offset. These tests need no VAE: the expression rule alone (no latent
classifier to start from) on simulated counts."""

from __future__ import annotations

import json

import numpy as np
import pytest
import scipy.sparse as sp

from scarches_fl import metrics as M
from scarches_fl.labels import LabelTransferError
from scarches_fl.refine import (
    EXPRESSION_COMPONENTS,
    EXPRESSION_GENE_MEAN,
    expression_label_posteriors,
    fit_expression_prototypes,
    has_expression_prototypes,
    latent_classifier_probabilities,
    lognormalize,
    predict_cell_labels,
    project_counts,
    sample_reference_rows,
)
from scarches_fl.simulate import simulate_counts


def _split(adata, query_batches=("batch4", "batch5")):
    is_query = adata.obs["batch"].isin(query_batches).to_numpy()
    return adata[~is_query].copy(), adata[is_query].copy()


def _fit(ref, **kw):
    labels = ref.obs["cell_type"].astype(str).to_numpy()
    info, tensors = fit_expression_prototypes(
        ref.X, {"cell_type": labels}, batches=ref.obs["batch"].to_numpy(), **kw
    )
    manifest = {
        "novelty_tail": 0.05,
        "expression": info["projection"],
        "levels": {"cell_type": {"expression": info["levels"]["cell_type"]}},
    }
    return manifest, tensors


def _labels(manifest, tensors, query, **kw):
    scores = project_counts(manifest["expression"], tensors, query.X)
    return predict_cell_labels(
        manifest,
        tensors,
        scores,
        query.obs["batch"].to_numpy(),
        np.zeros((query.n_obs, 2)),
        label_key="cell_type",
        **kw,
    )


@pytest.fixture(scope="module")
def strong_shift():
    adata = simulate_counts(
        1500,
        n_genes=300,
        n_batches=6,
        n_cell_types=5,
        seed=3,
        shift_batches=(4, 5),
        shift_strength=2.0,
        shift_genes=60,
    )
    return _split(adata)


def test_lognormalize_matches_the_formula_and_keeps_empty_cells_zero():
    x = sp.csr_matrix(np.array([[1.0, 3.0, 0.0], [0.0, 0.0, 0.0]], dtype=np.float32))
    got = lognormalize(x).toarray()
    np.testing.assert_allclose(got[0], np.log1p(np.array([2500.0, 7500.0, 0.0])), rtol=1e-6)
    assert not got[1].any()


def test_fit_stores_summaries_only_and_is_deterministic(strong_shift):
    ref, _query = strong_shift
    manifest, tensors = _fit(ref, n_components=20, seed=0)
    again_manifest, again = _fit(ref, n_components=20, seed=0)
    assert set(tensors) == set(again)
    for name in tensors:
        np.testing.assert_array_equal(tensors[name], again[name])
    assert json.dumps(manifest) == json.dumps(again_manifest)
    level = manifest["levels"]["cell_type"]["expression"]
    k = len(level["classes"])
    assert tensors[EXPRESSION_GENE_MEAN].shape == (ref.n_vars,)
    assert tensors[EXPRESSION_COMPONENTS].shape == (20, ref.n_vars)
    assert tensors[level["means_tensor"]].shape == (k, 20)
    assert tensors[level["covariance_tensor"]].shape == (20, 20)
    # nothing per cell: every tensor is sized by genes, components and types
    assert all(ref.n_obs not in t.shape for t in tensors.values())
    counts = ref.obs["cell_type"].astype(str).value_counts()
    assert level["cell_counts"] == [int(counts[c]) for c in level["classes"]]
    assert level["temperature"] > 0 and len(level["novelty_quantiles"]) == 41
    assert all(t.dtype == np.float32 for t in tensors.values())
    assert has_expression_prototypes(manifest, tensors, "cell_type")
    assert not has_expression_prototypes(manifest, {}, "cell_type")
    assert not has_expression_prototypes(manifest, tensors, "other_level")


def test_the_per_batch_offset_recovers_labels_under_a_strong_shift(strong_shift):
    ref, query = strong_shift
    manifest, tensors = _fit(ref, n_components=30)
    level = manifest["levels"]["cell_type"]["expression"]
    truth = query.obs["cell_type"].astype(str).to_numpy()
    scores = project_counts(manifest["expression"], tensors, query.X)
    batches = query.obs["batch"].to_numpy()
    # a start like a latent head under a shift: right for 70 % of the cells, sure of itself
    rng = np.random.default_rng(0)
    codes = np.array([level["classes"].index(t) for t in truth])
    wrong = rng.random(len(codes)) < 0.3
    codes[wrong] = (codes[wrong] + rng.integers(1, len(level["classes"]), wrong.sum())) % len(
        level["classes"]
    )
    start = np.full((len(codes), len(level["classes"])), 0.02)
    start[np.arange(len(codes)), codes] = 0.9
    start /= start.sum(axis=1, keepdims=True)
    accuracy = {}
    for rounds in (0, 3):
        probs, _stat, _off = expression_label_posteriors(
            level, tensors, scores, batches, start=start, rounds=rounds, latent_weight=0.0
        )
        accuracy[rounds] = M.label_accuracy(truth, np.array(level["classes"])[probs.argmax(1)])
    assert accuracy[0] > 0.9 and accuracy[3] > 0.9
    # the same Gaussian rule with no offset: the response moves cells onto other types
    chol = np.linalg.cholesky(tensors[level["covariance_tensor"]].astype(np.float64))
    w = np.linalg.solve(chol, scores.T.astype(np.float64)).T
    nu = np.linalg.solve(chol, tensors[level["means_tensor"]].astype(np.float64).T).T
    d2 = ((w[:, None, :] - nu[None, :, :]) ** 2).sum(axis=2)
    no_offset = M.label_accuracy(truth, np.array(level["classes"])[d2.argmin(1)])
    assert no_offset < accuracy[3] - 0.2
    # without any start, the batch-mean offset alone
    alone = _labels(manifest, tensors, query)
    assert alone.method == "expression"
    assert M.label_accuracy(truth, alone.pred) > 0.85
    assert np.mean(alone.pred == "Unknown") <= 0.1


def test_offsets_are_estimated_per_batch(strong_shift):
    ref, query = strong_shift
    manifest, tensors = _fit(ref, n_components=30)
    level = manifest["levels"]["cell_type"]["expression"]
    scores = project_counts(manifest["expression"], tensors, query.X)
    # one shifted and one unshifted batch: their offsets differ
    mixed = np.where(query.obs["batch"].to_numpy() == "batch4", "shifted", "other")
    control = simulate_counts(300, n_genes=300, n_batches=6, n_cell_types=5, seed=3)
    _ref2, control_query = _split(control)
    both = np.concatenate(
        [scores, project_counts(manifest["expression"], tensors, control_query.X)]
    )
    batches = np.concatenate([mixed, np.full(control_query.n_obs, "control")])
    _probs, _stat, offsets = expression_label_posteriors(level, tensors, both, batches)
    names = sorted(set(batches.tolist()))
    norm = dict(zip(names, np.linalg.norm(offsets, axis=1), strict=True))
    assert norm["shifted"] > 2 * norm["control"]


def test_a_type_with_few_reference_cells_is_named_with_more_uncertainty():
    adata = simulate_counts(1500, n_genes=300, n_batches=3, n_cell_types=5, seed=7)
    types = adata.obs["cell_type"].astype(str).to_numpy()
    is_ref = (adata.obs["batch"] != "batch2").to_numpy()
    rare_rows = np.flatnonzero(is_ref & (types == "type4"))
    keep = is_ref.copy()
    keep[rare_rows[12:]] = False
    ref, query = adata[keep].copy(), adata[~is_ref].copy()
    manifest, tensors = _fit(ref, n_components=30)
    level = manifest["levels"]["cell_type"]["expression"]
    assert level["cell_counts"][level["classes"].index("type4")] == 12
    pred = _labels(manifest, tensors, query)
    truth = query.obs["cell_type"].astype(str).to_numpy()
    rare = truth == "type4"
    assert rare.sum() >= 20
    assert np.mean(pred.pred[rare] == "type4") > 0.5  # named, not Unknown
    assert np.mean(pred.top_label[~rare] == truth[~rare]) > 0.9
    assert np.median(pred.uncertainty[rare]) > np.median(pred.uncertainty[~rare])


def test_a_type_missing_from_the_reference_gets_high_uncertainty():
    adata = simulate_counts(1500, n_genes=300, n_batches=3, n_cell_types=5, seed=11)
    types = adata.obs["cell_type"].astype(str).to_numpy()
    is_ref = (adata.obs["batch"] != "batch2").to_numpy()
    ref = adata[is_ref & (types != "type1")].copy()
    query = adata[~is_ref].copy()
    manifest, tensors = _fit(ref, n_components=30)
    pred = _labels(manifest, tensors, query)
    novel = query.obs["cell_type"].astype(str).to_numpy() == "type1"
    assert M.unknown_detection_auroc(pred.uncertainty, novel) > 0.95
    assert np.mean(pred.pred[novel] == "Unknown") > 0.5
    assert np.mean(pred.pred[~novel] == "Unknown") <= 0.03


def test_latent_classifier_probabilities_follow_the_class_order():
    w = np.array([[1.0, 0.0], [0.0, 1.0]])
    tensors = {"classifier.weight": w, "classifier.bias": np.zeros(2)}
    z = np.array([[5.0, 0.0], [0.0, 5.0]])
    probs = latent_classifier_probabilities(tensors, ["a", "b"], z, ["b", "a", "c"])
    assert probs.shape == (2, 3)
    assert probs[0].argmax() == 1 and probs[1].argmax() == 0
    assert np.allclose(probs[:, 2], 0.0)
    assert latent_classifier_probabilities({}, ["a", "b"], z, ["a", "b"]) is None


def test_bad_inputs_are_refused_with_the_fix(strong_shift):
    ref, query = strong_shift
    manifest, tensors = _fit(ref, n_components=10)
    with pytest.raises(LabelTransferError, match="align the query"):
        project_counts(manifest["expression"], tensors, query.X[:, :50])
    with pytest.raises(LabelTransferError, match="no expression prototypes"):
        predict_cell_labels(
            manifest, {}, np.zeros((2, 10)), ["a", "a"], np.zeros((2, 2)), label_key="cell_type"
        )
    with pytest.raises(LabelTransferError, match="one batch value per query cell"):
        expression_label_posteriors(
            manifest["levels"]["cell_type"]["expression"], tensors, np.zeros((3, 10)), ["a"]
        )
    with pytest.raises(LabelTransferError, match="two labelled cells"):
        fit_expression_prototypes(np.ones((3, 4)), {"t": ["a", None, None]})


def test_sample_reference_rows_caps_each_type():
    labels = np.array(["a"] * 50 + ["b"] * 5 + [None] * 3, dtype=object)
    rows = sample_reference_rows(labels, max_cells_per_type=10, seed=0)
    assert list(rows) == sorted(rows)
    picked = labels[rows]
    assert (picked == "a").sum() == 10 and (picked == "b").sum() == 5
    assert all(v is not None for v in picked)


def test_auto_reads_the_latent_once_sites_contributed_types(monkeypatch):
    from types import SimpleNamespace

    import scarches_fl.labels as labels_module
    from scarches_fl.refine import transfer_labels

    seen = {}

    def fake_predict(labels, atlas, latent, *, label_key, threshold, method):
        seen["method"] = method
        return "latent labels"

    monkeypatch.setattr(labels_module, "predict_labels", fake_predict)
    level = {
        "prototype": {
            "classes": ["a", "b", "site-x:c"],
            "prototypes": [{"label": "site-x:c", "source": "site-x#7"}],
        },
        "expression": {"classes": ["a", "b"]},
    }
    model = SimpleNamespace(
        labels={"levels": {"cell_type": level}}, tensors=lambda: {}, extra_tensors={}
    )
    out = transfer_labels(model, None, np.zeros((2, 2)), label_key="cell_type", batch_key="b")
    assert out == "latent labels" and seen["method"] == "auto"
    with pytest.raises(LabelTransferError, match="no expression prototypes"):
        transfer_labels(
            model,
            None,
            np.zeros((2, 2)),
            label_key="cell_type",
            batch_key="b",
            method="expression",
        )


def _contributed(scores, types, source, classes):
    """What the ledger replay lists for a site's contribution with expression parts."""
    out = []
    for t in sorted(set(types.tolist())):
        rows = scores[types == t]
        out.append(
            {
                "label": t,
                "anchor": t in classes,
                "n_cells": int(len(rows)) // 10 * 10,
                "mean": rows.mean(axis=0).tolist(),
                "std": rows.std(axis=0, ddof=1).tolist(),
                "sigma": 0.0,
                "source": source,
            }
        )
    return out


def _growth_split() -> tuple:
    """The growth setting in small: a reference (batch0) without type1, a site A (batch1) that
    holds it and contributes, a query (batch2). Returns the reference's expression prototypes
    (manifest, tensors), the reference, site A, the query and site A's scores in the
    reference's subspace."""
    adata = simulate_counts(1500, n_genes=300, n_batches=3, n_cell_types=5, seed=11)
    types = adata.obs["cell_type"].astype(str).to_numpy()
    batch = adata.obs["batch"].astype(str).to_numpy()
    ref = adata[(batch == "batch0") & (types != "type1")].copy()
    site_a = adata[batch == "batch1"].copy()
    query = adata[batch == "batch2"].copy()
    manifest, tensors = _fit(ref, n_components=30)
    scores_a = project_counts(manifest["expression"], tensors, site_a.X)
    return manifest, tensors, ref, site_a, query, scores_a


def test_a_contributed_type_is_named_and_known_calls_stay():
    manifest, tensors, _, site_a, query, scores_a = _growth_split()
    level = manifest["levels"]["cell_type"]["expression"]
    before = _labels(manifest, tensors, query)
    grown = json.loads(json.dumps(manifest))
    grown["levels"]["cell_type"]["expression"]["contributed"] = _contributed(
        scores_a, site_a.obs["cell_type"].astype(str).to_numpy(), "site-a#9", level["classes"]
    )
    after = _labels(grown, tensors, query)
    truth = query.obs["cell_type"].astype(str).to_numpy()
    novel = truth == "type1"
    assert np.mean(before.pred[novel] == "type1") == 0.0
    assert np.mean(after.pred[novel] == "type1") > 0.8
    assert set(after.source[after.top_label == "type1"]) == {"site-a#9"}
    assert set(after.source[after.top_label != "type1"]) == {"genesis"}
    # a contribution adds a name; it never re-decides between the reference's own types
    stays = after.top_label != "type1"
    assert np.array_equal(after.pred[stays], before.pred[stays])
    assert np.array_equal(after.uncertainty[stays], before.uncertainty[stays])
    assert after.classes == [*level["classes"], "type1"]
    assert (
        np.mean(after.pred[~novel] == truth[~novel])
        >= np.mean(before.pred[~novel] == truth[~novel]) - 0.01
    )


def test_anchors_place_a_sites_frame():
    from scarches_fl.refine import contributed_expression_types

    means = np.array([[0.0, 0.0], [4.0, 0.0]])
    tensors = {"m": means, "c": np.eye(2)}
    level = {"classes": ["a", "b"], "means_tensor": "m", "covariance_tensor": "c"}
    shift = np.array([1.0, -2.0])

    def entry(label, mean, n, src, std=(1.0, 1.0), sigma=0.0):
        return {
            "label": label,
            "anchor": label in ("a", "b"),
            "n_cells": n,
            "mean": list(mean),
            "std": None if std is None else list(std),
            "sigma": sigma,
            "source": src,
        }

    level["contributed"] = [
        entry("a", means[0] + shift, 40, "x#3"),
        entry("b", means[1] + shift, 20, "x#3"),
        entry("c", np.array([0.0, 6.0]) + shift, 30, "x#3"),
        # another site, no anchor: its frame is taken as the reference's
        entry("c", [0.0, 8.0], 10, "y#5", std=None, sigma=2.0),
    ]
    out = contributed_expression_types(level, tensors)
    assert out["classes"] == ["c"] and out["cell_counts"] == [40]
    np.testing.assert_allclose(out["means"][0], [0.0, (30 * 6.0 + 10 * 8.0) / 40])
    # the spread: each site's (or the pooled covariance's) plus its noise plus the between-site
    # scatter, against the pooled covariance's diagonal
    m = (30 * 6.0 + 10 * 8.0) / 40
    var = (30 * (1 + (6 - m) ** 2) + 10 * (1 + 4 + (8 - m) ** 2)) / 40
    assert out["spread_factor"][0] == pytest.approx(((30 + 10 * 5) / 40 + var) / 2)
    assert out["sources"] == ["x#3+y#5"]
    level["contributed"] = level["contributed"][:2]  # anchors only: nothing to add
    assert contributed_expression_types(level, tensors) is None


def test_auto_reads_expression_when_contributed_types_carry_expression(monkeypatch):
    from types import SimpleNamespace

    import scarches_fl.refine as refine

    seen = {}
    monkeypatch.setattr(refine, "query_scores", lambda *a, **k: np.zeros((2, 2)))

    def fake_predict(labels, tensors, scores, batches, latent, **kw):
        seen["called"] = True
        return "expression labels"

    monkeypatch.setattr(refine, "predict_cell_labels", fake_predict)
    level = {
        "prototype": {
            "classes": ["a", "b", "site-x:c"],
            "prototypes": [{"label": "site-x:c", "source": "site-x#7"}],
        },
        "expression": {
            "classes": ["a", "b"],
            "means_tensor": "m",
            "covariance_tensor": "c",
            "contributed": [{"label": "site-x:c", "source": "site-x#7"}],
        },
    }
    tensors = {EXPRESSION_GENE_MEAN: 0, EXPRESSION_COMPONENTS: 0, "m": 0, "c": 0}
    model = SimpleNamespace(
        labels={"levels": {"cell_type": level}, "expression": {}},
        tensors=lambda: tensors,
        extra_tensors={},
        genes=["g"],
        registration={},
    )
    query = SimpleNamespace(obs={"b": np.array(["x", "x"])})
    out = refine.transfer_labels(
        model, query, np.zeros((2, 2)), label_key="cell_type", batch_key="b"
    )
    assert out == "expression labels" and seen["called"]


def test_latent_only_types_are_named_from_the_latent_and_nothing_else_moves():
    from scarches_fl.labels import LabelPrediction
    from scarches_fl.refine import _with_latent_only_types

    expr = LabelPrediction(
        pred=np.array(["a", "b", "Unknown"], dtype=object),
        uncertainty=np.array([0.1, 0.2, 0.7], np.float32),
        top_label=np.array(["a", "b", "a"], dtype=object),
        probabilities=np.array([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4]], np.float32),
        classes=["a", "b"],
        method="expression",
    )
    latent = LabelPrediction(
        pred=np.array(["b", "x:c", "x:c"], dtype=object),
        uncertainty=np.array([0.3, 0.1, 0.2], np.float32),
        top_label=np.array(["b", "x:c", "x:c"], dtype=object),
        probabilities=np.array([[0.1, 0.6, 0.3], [0.0, 0.1, 0.9], [0.1, 0.1, 0.8]], np.float32),
        classes=["a", "b", "x:c"],
        method="prototype",
        source=np.array(["genesis", "x#4", "x#4"], dtype=object),
    )
    out = _with_latent_only_types(expr, latent, ["x:c"])
    # cell 0: the latent disagrees among the reference's own types; the expression call stays
    assert list(out.pred) == ["a", "x:c", "x:c"]
    assert list(out.source) == ["genesis", "x#4", "x#4"]
    assert out.classes == ["a", "b", "x:c"] and out.method == "expression"
    np.testing.assert_allclose(out.probabilities[0], [0.9, 0.1, 0.0])
    np.testing.assert_allclose(out.probabilities[1], [0.0, 0.1, 0.9])
    np.testing.assert_allclose(out.uncertainty, [0.1, 0.1, 0.2])
    # ADR 0047: with the cells' novelty, "Unknown" means novel for these types too, as for
    # every other type: a cell torn between types but typical is named, a novel one is not
    torn = LabelPrediction(
        pred=np.array(["b", "Unknown", "Unknown"], dtype=object),
        uncertainty=np.array([0.3, 0.6, 0.9], np.float32),
        top_label=np.array(["b", "x:c", "x:c"], dtype=object),
        probabilities=np.array([[0.1, 0.6, 0.3], [0.1, 0.4, 0.5], [0.1, 0.1, 0.8]], np.float32),
        classes=["a", "b", "x:c"],
        method="prototype",
        source=np.array(["genesis", "x#4", "x#4"], dtype=object),
    )
    by_novelty = _with_latent_only_types(
        expr, torn, ["x:c"], novelty=np.array([0.9, 0.2, 0.8]), threshold=0.5
    )
    assert list(by_novelty.pred) == ["a", "x:c", "Unknown"]  # cell 0 is not a latent-only call
    np.testing.assert_allclose(by_novelty.novelty[1:], [0.2, 0.8])
    assert list(_with_latent_only_types(expr, torn, ["x:c"]).pred) == ["a", "Unknown", "Unknown"]


def _with_latent_prototypes(manifest, ref, seed=0):
    """The expression manifest plus latent prototypes built on a stand-in reference latent:
    one well-separated Gaussian cluster per type (4 dimensions)."""
    from scarches_fl.labels import build_label_knowledge

    types = ref.obs["cell_type"].astype(str).to_numpy()
    classes = sorted(set(types))
    centres = {t: 6.0 * np.eye(4)[i % 4] * (1 + i // 4) for i, t in enumerate(classes)}
    rng = np.random.default_rng(seed)
    z = np.stack([centres[t] for t in types]) + rng.normal(size=(len(types), 4))
    knowledge, _atlas = build_label_knowledge(z, {"cell_type": types}, seed=seed)
    merged = {**knowledge, **manifest}
    merged["levels"] = {
        "cell_type": {**knowledge["levels"]["cell_type"], **manifest["levels"]["cell_type"]}
    }
    return merged, centres, rng


def test_a_cell_the_latent_sets_apart_is_unknown_although_its_expression_is_typical(
    strong_shift,
):
    """ADR 0071: the novelty factor is the product of the expression rule's and the latent
    prototypes'. Query cells whose expression is an ordinary known type but whose latent lies
    far from every prototype (a type the subspace cannot tell apart) are called Unknown; the
    same cells placed on their type's latent prototype are named."""
    ref, query = strong_shift
    manifest, tensors = _fit(ref, n_components=30)
    manifest, centres, rng = _with_latent_prototypes(manifest, ref)
    truth = query.obs["cell_type"].astype(str).to_numpy()
    latent = np.stack([centres[t] for t in truth]) + rng.normal(size=(len(truth), 4))
    apart = np.arange(len(truth)) % 4 == 0  # a quarter of the cells, every type and batch
    far = latent.copy()
    far[apart] += 25.0
    scores = project_counts(manifest["expression"], tensors, query.X)
    batches = query.obs["batch"].to_numpy()

    def call(z, **kw):
        return predict_cell_labels(
            manifest, tensors, scores, batches, z, label_key="cell_type", **kw
        )

    near, moved, own = call(latent), call(far), call(far, latent_novelty=False)
    assert np.mean(moved.pred[apart] == "Unknown") > 0.95
    assert np.mean(own.pred[apart] == "Unknown") <= 0.15
    # the names are the expression rule's either way; only the novelty differs
    np.testing.assert_array_equal(moved.top_label, own.top_label)
    # cells the latent finds typical: hardly any more Unknown than by the expression alone
    # (which calls some of this strongly shifted query Unknown without a latent head)
    assert np.mean(moved.pred[~apart] == "Unknown") <= np.mean(own.pred[~apart] == "Unknown") + 0.03
    assert np.mean(near.pred == "Unknown") <= np.mean(own.pred[~apart] == "Unknown") + 0.03
    assert M.unknown_detection_auroc(moved.uncertainty, apart) > 0.97


def test_latent_novelty_is_scaled_per_batch_and_absent_without_prototypes(strong_shift):
    """A batch lying farther from every latent prototype as a whole (a sparser technology) is
    not read as novel; a bundle without latent prototypes, or a latent of another width, has
    no latent novelty factor."""
    from scarches_fl.refine import latent_novelty_factor

    ref, query = strong_shift
    manifest, _tensors = _fit(ref, n_components=10)
    merged, centres, rng = _with_latent_prototypes(manifest, ref)
    truth = query.obs["cell_type"].astype(str).to_numpy()
    latent = np.stack([centres[t] for t in truth]) + rng.normal(size=(len(truth), 4))
    batches = query.obs["batch"].to_numpy().astype(str)
    wide = batches == batches[0]
    spread = latent.copy()
    spread[wide] = np.stack([centres[t] for t in truth[wide]]) + 2.5 * rng.normal(
        size=(wide.sum(), 4)
    )
    scaled = latent_novelty_factor(merged, spread, batches, label_key="cell_type")
    unscaled = latent_novelty_factor(
        merged, spread, np.arange(len(truth)).astype(str), label_key="cell_type"
    )
    assert scaled is not None and unscaled is not None
    assert np.mean(scaled[wide] < 0.5) <= 0.05
    assert np.mean(unscaled[wide] < 0.5) > 0.2
    assert latent_novelty_factor(manifest, latent, batches, label_key="cell_type") is None
    assert latent_novelty_factor(merged, latent[:, :3], batches, label_key="cell_type") is None


def test_unknown_follows_the_novelty_and_the_uncertainty_still_ranks():
    """ADR 0071: with ``unknown="novel"`` (the default) a cell is Unknown exactly where its
    novelty is above the threshold. On overlapping types (programs of fold 1.4) a cell torn
    between two known types keeps its top label, which is right more often than not, where
    the uncertainty rule calls it Unknown; the uncertainty is the same number under both."""
    adata = simulate_counts(
        1500, n_genes=300, n_batches=3, n_cell_types=5, seed=7, program_fold=1.4
    )
    ref, query = _split(adata, ("batch2",))
    manifest, tensors = _fit(ref, n_components=30)
    novel_rule = _labels(manifest, tensors, query)
    uncertain_rule = _labels(manifest, tensors, query, unknown="uncertain")
    np.testing.assert_array_equal(novel_rule.uncertainty, uncertain_rule.uncertainty)
    np.testing.assert_array_equal(novel_rule.top_label, uncertain_rule.top_label)
    np.testing.assert_array_equal(novel_rule.pred == "Unknown", novel_rule.novelty > 0.5)
    np.testing.assert_array_equal(
        uncertain_rule.pred == "Unknown", uncertain_rule.uncertainty > 0.5
    )
    truth = query.obs["cell_type"].astype(str).to_numpy()
    torn = (novel_rule.novelty <= 0.5) & (novel_rule.uncertainty > 0.5)
    assert torn.sum() >= 10
    assert (novel_rule.pred[torn] == novel_rule.top_label[torn]).all()
    assert (uncertain_rule.pred[torn] == "Unknown").all()
    assert np.mean(novel_rule.top_label[torn] == truth[torn]) > 0.5
    assert M.label_accuracy(truth, novel_rule.pred) > M.label_accuracy(truth, uncertain_rule.pred)
    with pytest.raises(LabelTransferError, match="'novel' or 'uncertain'"):
        _labels(manifest, tensors, query, unknown="sometimes")


def test_a_balanced_head_brings_no_reference_composition():
    """ADR 0071: the latent head's probabilities are divided by the reference's class
    frequencies before they are combined. A head that knows nothing but the composition (its
    bias the log frequencies) then counts exactly as a head with no preference at all, and a
    type with 12 reference cells is named no less often than with the biased head."""
    adata = simulate_counts(1500, n_genes=300, n_batches=3, n_cell_types=5, seed=7)
    types = adata.obs["cell_type"].astype(str).to_numpy()
    is_ref = (adata.obs["batch"] != "batch2").to_numpy()
    keep = is_ref.copy()
    keep[np.flatnonzero(is_ref & (types == "type4"))[12:]] = False
    ref, query = adata[keep].copy(), adata[~is_ref].copy()
    manifest, tensors = _fit(ref, n_components=30)
    level = manifest["levels"]["cell_type"]["expression"]
    classes = level["classes"]
    freq = np.asarray(level["cell_counts"], dtype=np.float64)
    scores = project_counts(manifest["expression"], tensors, query.X)
    batches = query.obs["batch"].to_numpy()

    def call(bias, **kw):
        head = {"classifier.weight": np.zeros((len(classes), 2)), "classifier.bias": bias}
        return predict_cell_labels(
            manifest,
            {**tensors, **head},
            scores,
            batches,
            np.zeros((query.n_obs, 2)),
            label_key="cell_type",
            classifier_classes=classes,
            **kw,
        )

    composition = np.log(freq / freq.sum())
    balanced = call(composition)
    flat = call(np.zeros(len(classes)), balanced_head=False)
    biased = call(composition, balanced_head=False)
    np.testing.assert_allclose(balanced.probabilities, flat.probabilities, rtol=1e-5, atol=1e-6)
    rare = query.obs["cell_type"].astype(str).to_numpy() == "type4"
    assert np.mean(balanced.pred[rare] == "type4") >= np.mean(biased.pred[rare] == "type4")
    assert np.mean(balanced.pred[rare] == "type4") > 0.5


def test_a_rare_type_mean_keeps_the_components_that_set_it_apart():
    """ADR 0072: the whitened mean of a type with fewer than 20 reference cells is soft-
    thresholded towards the centre by one standard error of its mean per component; the
    components where it truly differs survive, the noise in the others goes, and the means of
    the other types are untouched."""
    from scarches_fl.refine import shrunken_means

    rng = np.random.default_rng(0)
    p = 50
    common = rng.normal(scale=3.0, size=(3, p))
    truth = np.zeros(p)
    truth[:4] = 4.0  # the rare type differs from the centre in 4 components
    counts = [300, 300, 300, 12]
    centre = (np.array(counts[:3], float)[:, None] * common).sum(0) / 912
    noisy = centre + truth + rng.normal(scale=np.sqrt(1 / 12), size=p)
    nu = np.vstack([common, noisy])
    out = shrunken_means(nu, counts, 1.0)
    np.testing.assert_array_equal(out[:3], nu[:3])
    true_rare = centre + truth
    err_before = np.sum((nu[3] - true_rare) ** 2)
    err_after = np.sum((out[3] - true_rare) ** 2)
    assert err_after < 0.5 * err_before
    assert np.all(np.abs(out[3, :4] - out[3, :4].mean()) < 1.0)  # the signal stays
    np.testing.assert_array_equal(shrunken_means(nu, counts, 0.0), nu)


def test_the_latent_novelty_counts_as_far_as_the_head_agrees(strong_shift):
    """ADR 0072: the latent novelty factor is raised to the batch's trust in the latent, the
    head's agreement ``a`` with the expression labels as ``max(0, 2a - 1)^2`` (1 without a
    head): the novelty is ``1 - f_expression * f_latent ** trust`` (both factors on the whole
    tail here; ADR 0073 halves it for each, tested below)."""
    from scarches_fl.refine import latent_novelty_factor

    ref, query = strong_shift
    manifest, tensors = _fit(ref, n_components=30)
    manifest, centres, rng = _with_latent_prototypes(manifest, ref)
    level = manifest["levels"]["cell_type"]["expression"]
    classes = level["classes"]
    truth = query.obs["cell_type"].astype(str).to_numpy()
    latent = np.stack([centres[t] for t in truth]) + rng.normal(size=(len(truth), 4))
    latent[np.arange(len(truth)) % 4 == 0] += 6.0
    scores = project_counts(manifest["expression"], tensors, query.X)
    batches = query.obs["batch"].to_numpy()
    head = {
        "classifier.weight": np.zeros((len(classes), 4)),
        "classifier.bias": np.zeros(len(classes)),
    }
    start = latent_classifier_probabilities(head, classes, latent, classes)
    trust = np.full(len(truth), np.nan)
    expression_label_posteriors(level, tensors, scores, batches, start=start, trust_out=trust)
    assert np.all((trust >= 0) & (trust < 1))
    for b in set(batches):
        assert np.unique(trust[batches == b]).size == 1  # one trust per batch
    no_head = np.full(len(truth), np.nan)
    expression_label_posteriors(level, tensors, scores, batches, trust_out=no_head)
    assert np.all(no_head == 1.0)

    def call(**kw):
        return predict_cell_labels(
            manifest,
            {**tensors, **head},
            scores,
            batches,
            latent,
            label_key="cell_type",
            classifier_classes=classes,
            split_tail=False,
            **kw,
        )

    both, own = call(), call(latent_novelty=False)
    np.testing.assert_array_equal(both.probabilities, own.probabilities)
    f_latent = latent_novelty_factor(
        manifest, latent, batches, label_key="cell_type", sure=both.probabilities.max(1) >= 0.5
    )
    expected = (1.0 - own.novelty.astype(np.float64)) * f_latent**trust
    np.testing.assert_allclose(1.0 - both.novelty.astype(np.float64), expected, atol=1e-6)


@pytest.fixture(scope="module")
def no_shift():
    """A query of the reference's kind (no condition shift) with the expression rule fitted
    and latent prototypes on a stand-in latent."""
    adata = simulate_counts(1200, n_genes=300, n_batches=6, n_cell_types=5, seed=3)
    ref, query = _split(adata)
    manifest, tensors = _fit(ref, n_components=30)
    manifest, centres, _rng = _with_latent_prototypes(manifest, ref)
    return manifest, tensors, centres, query


def test_the_two_spaces_share_the_novelty_tail(no_shift):
    """ADR 0073: where the latent factor joins the product, each space's factor is read on half
    the novelty tail, so a query cell typical of the reference is called Unknown in either
    space at most about as often as one space alone calls it (``tail / 2``), not up to twice
    that. A query latent with a heavier tail than the reference's (as a sparser technology's,
    CellBench's Drop-seq) has under half as many known cells called Unknown; cells the latent
    sets far apart are still Unknown; the rule is ADR 0072's on a bundle whose tail is half as
    wide."""
    manifest, tensors, centres, query = no_shift
    truth = query.obs["cell_type"].astype(str).to_numpy()
    scores = project_counts(manifest["expression"], tensors, query.X)
    batches = query.obs["batch"].to_numpy()
    rng = np.random.default_rng(0)
    centre = np.stack([centres[t] for t in truth])
    gaussian = centre + rng.normal(size=centre.shape)  # as the reference's latent is drawn
    heavy = centre + rng.standard_t(6, size=centre.shape)
    apart = np.arange(len(truth)) % 5 == 0
    far = gaussian.copy()
    far[apart] += 25.0

    def call(z, bundle=manifest, **kw):
        return predict_cell_labels(bundle, tensors, scores, batches, z, label_key="cell_type", **kw)

    def unknown(p, rows=slice(None)):
        return float(np.mean(p.pred[rows] == "Unknown"))

    for z in (gaussian, heavy):
        split, whole = call(z), call(z, split_tail=False)
        assert unknown(split) < unknown(whole)
        assert np.all(split.novelty <= whole.novelty + 1e-6)  # halving a tail never adds novelty
        np.testing.assert_array_equal(split.top_label, whole.top_label)
    assert unknown(call(gaussian)) <= 0.5 * manifest["novelty_tail"]
    assert unknown(call(heavy, split_tail=False)) > 0.05
    assert unknown(call(heavy)) <= 0.5 * unknown(call(heavy, split_tail=False))
    moved = call(far)
    assert unknown(moved, apart) > 0.95
    assert unknown(moved, ~apart) <= 0.5 * manifest["novelty_tail"]
    halved = {**manifest, "novelty_tail": 0.5 * manifest["novelty_tail"]}
    np.testing.assert_allclose(
        moved.novelty, call(far, bundle=halved, split_tail=False).novelty, atol=1e-6
    )
    # without the latent factor the expression factor keeps the whole tail
    np.testing.assert_array_equal(
        call(far, latent_novelty=False).novelty,
        call(far, latent_novelty=False, split_tail=False).novelty,
    )


def _level_without_last_type(level, tensors, n_last):
    """The fitted level with its last type's count set to ``n_last``, and the same level
    without that type plus a contribution of it: the same mean and count, the pooled
    covariance's spread, no anchors (the site's frame is the reference's)."""
    full = {**level, "cell_counts": [*level["cell_counts"][:-1], n_last]}
    means = np.asarray(tensors[level["means_tensor"]], dtype=np.float64)
    cov = np.asarray(tensors[level["covariance_tensor"]], dtype=np.float64)
    less = {
        **level,
        "classes": level["classes"][:-1],
        "cell_counts": level["cell_counts"][:-1],
        "means_tensor": "fewer.means",
        "contributed": [
            {
                "label": level["classes"][-1],
                "anchor": False,
                "n_cells": n_last,
                "mean": means[-1].tolist(),
                "std": np.sqrt(np.diag(cov)).tolist(),
                "sigma": 0.0,
                "source": "site-a#4",
            }
        ],
    }
    return full, less, {**tensors, "fewer.means": means[:-1]}


@pytest.mark.parametrize("n_last", [10, 60])
def test_a_contributed_type_is_read_as_a_reference_type_of_its_mean_and_count(n_last):
    """ADR 0047: one rule for every type. The second pass reads a type contributed with mean
    m from n cells as the reference's rule reads a type of mean m and n reference cells:
    the same posteriors and novelty, the shrinkage of a rare type (n < 20) included."""
    from scarches_fl.refine import contributed_pass

    adata = simulate_counts(900, n_genes=200, n_batches=2, n_cell_types=4, seed=5)
    batch = adata.obs["batch"].astype(str).to_numpy()
    ref, query = adata[batch == "batch0"].copy(), adata[batch == "batch1"].copy()
    manifest, tensors = _fit(ref, n_components=20)
    level = manifest["levels"]["cell_type"]["expression"]
    full, less, tensors2 = _level_without_last_type(level, tensors, n_last)
    scores = project_counts(manifest["expression"], tensors, query.X)
    batches = query.obs["batch"].to_numpy()
    second = contributed_pass(less, tensors2, scores, batches, shrink=1.0)
    assert second is not None and second["classes"] == full["classes"]
    probs, stat, _ = expression_label_posteriors(
        full, tensors, scores, batches, start=None, rounds=3, latent_weight=0.0, shrink=1.0
    )
    np.testing.assert_allclose(second["probabilities"], probs, atol=1e-6)
    np.testing.assert_allclose(second["novelty_statistic"], stat, rtol=1e-6)
    unshrunk = contributed_pass(less, tensors2, scores, batches, shrink=0.0)
    assert unshrunk is not None
    moved = np.abs(unshrunk["novelty_statistic"] - second["novelty_statistic"]).max()
    assert (moved > 1e-3) == (n_last < 20)  # only a rare type's mean is read shrunk


def test_anchors_are_compared_with_the_reference_means_as_read():
    """ADR 0047: a site's anchor of a rare reference type places its frame against the mean
    the rule reads for that type (shrunk, ADR 0072), not the stored one."""
    from scarches_fl.refine import contributed_expression_types, read_type_means

    means = np.array([[0.0, 0.0], [6.0, 1.0], [0.0, 5.0]])
    cov = np.eye(2)
    counts = [200, 200, 5]  # the third type is rare: its mean is read shrunk
    tensors = {"m": means, "c": cov}
    read = read_type_means(means, cov, counts, 1.0)
    assert not np.allclose(read[2], means[2]) and np.allclose(read[:2], means[:2])
    shift = np.array([1.5, -0.5])
    level = {
        "classes": ["a", "b", "r"],
        "cell_counts": counts,
        "means_tensor": "m",
        "covariance_tensor": "c",
        "contributed": [
            {
                "label": label,
                "anchor": label != "new",
                "n_cells": 40,
                "mean": (mean + shift).tolist(),
                "std": [1.0, 1.0],
                "sigma": 0.0,
                "source": "site-a#2",
            }
            for label, mean in (("a", read[0]), ("r", read[2]), ("new", np.array([8.0, 8.0])))
        ],
    }
    out = contributed_expression_types(level, tensors, shrink=1.0)
    assert out is not None
    np.testing.assert_allclose(out["means"][0], [8.0, 8.0])  # the site's frame exactly undone
    stored = contributed_expression_types(level, tensors, shrink=0.0)
    assert stored is not None and not np.allclose(stored["means"][0], [8.0, 8.0])


def test_a_contributed_type_far_from_every_latent_prototype_is_unknown():
    """ADR 0047: the second pass calls Unknown by the first pass's novelty, the expression
    factor times the latent factor (over every accepted latent prototype) raised to the
    batch's trust: cells of a contributed type whose latent lies far from every prototype are
    Unknown, while the same cells on their type's latent prototype are named."""
    from types import SimpleNamespace

    import pandas as pd

    manifest, tensors, ref, site_a, query, scores_a = _growth_split()
    level = manifest["levels"]["cell_type"]["expression"]
    manifest["levels"]["cell_type"]["expression"] = {
        **level,
        "contributed": _contributed(
            scores_a, site_a.obs["cell_type"].astype(str).to_numpy(), "site-a#9", level["classes"]
        ),
    }
    # latent prototypes of every accepted type, type1 (the contributed one) included
    everyone = SimpleNamespace(
        obs=pd.DataFrame({"cell_type": np.concatenate([ref.obs["cell_type"], ["type1"] * 40])})
    )
    merged, centres, rng = _with_latent_prototypes(manifest, everyone)
    truth = query.obs["cell_type"].astype(str).to_numpy()
    latent = np.stack([centres[t] for t in truth]) + rng.normal(size=(len(truth), 4))
    novel = truth == "type1"
    far = latent.copy()
    far[novel] += 25.0
    scores = project_counts(merged["expression"], tensors, query.X)

    def call(z, **kw):
        return predict_cell_labels(
            merged, tensors, scores, query.obs["batch"].to_numpy(), z, label_key="cell_type", **kw
        )

    near, apart, expression_only = call(latent), call(far), call(far, latent_novelty=False)
    assert np.mean(near.pred[novel] == "type1") > 0.8
    assert np.mean(expression_only.pred[novel] == "type1") > 0.8
    assert np.mean(apart.pred[novel] == "Unknown") > 0.8
    assert set(apart.source[novel & (apart.top_label == "type1")]) == {"site-a#9"}
