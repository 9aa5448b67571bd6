"""Label transfer end to end with the real model on the shared real datasets.

Train a reference (``ReferenceModel.train_reference`` with labels), map the query by surgery,
predict labels from the bundle's label knowledge, score with ``scarches_fl.metrics``.
The full panc8 comparison with scvi-tools is in ``benchmarks/bench_labels.py``.
"""

from __future__ import annotations

import numpy as np
import pytest

from scarches_fl import metrics as M
from scarches_fl.labels import build_label_knowledge, predict_labels

ad = pytest.importorskip("anndata")
pytest.importorskip("torch")
model_mod = pytest.importorskip("scarches_fl.model")

PANC8_REFERENCE = ["indrop1", "indrop2", "indrop3", "indrop4", "celseq", "fluidigmc1"]


def _map(adata, reference_batches, *, holdout=None, include_atlas=True, seed=0, epochs=None):
    adata.obs["batch"] = adata.obs["batch"].astype(str)
    adata.obs["cell_type"] = adata.obs["cell_type"].astype(str)
    is_ref = adata.obs["batch"].isin(reference_batches).to_numpy()
    ref_mask = is_ref & (adata.obs["cell_type"] != holdout).to_numpy() if holdout else is_ref
    ref, query = adata[ref_mask].copy(), adata[~is_ref].copy()
    model = model_mod.ReferenceModel.train_reference(
        ref,
        batch_key="batch",
        label_key="cell_type",
        seed=seed,
        progress=False,
        include_atlas=include_atlas,
        max_epochs=epochs,
    )
    res = model.surgery(
        query,
        batch_key="batch",
        namespace="site1",
        seed=seed,
        progress=False,
        max_epochs=None if epochs is None else max(10, epochs // 2),
    )
    # label knowledge travels in the mapped model's bundle unchanged
    assert res.model.labels == model.labels
    return model, res, ref, query


def test_cellbench_drop_seq_query_accuracy(shared_data):
    adata = ad.read_h5ad(shared_data / "cellbench_3tech_hvg.h5ad")
    # cell lines separate easily: a short training keeps this test fast
    model, res, ref, query = _map(adata, ["10x_3cl", "CELseq2_3cl"], epochs=40)
    truth = query.obs["cell_type"].to_numpy()
    atlas = {k: v for k, v in model.tensors().items() if k.startswith("atlas.")}
    for method in ("knn", "prototype"):
        pred = predict_labels(model.labels, atlas, res.latent, label_key="cell_type", method=method)
        assert M.label_accuracy(truth, pred.top_label) >= 0.98, method
        assert M.macro_f1(truth, pred.top_label) >= 0.98, method
        assert np.mean(pred.pred == "Unknown") <= 0.05, method


# The targets on panc8 (query accuracy >= 0.85; held-out alpha AUROC >= 0.90 with most
# alpha cells called Unknown): benchmarks/results/labels_panc8*.json has the measured figures,
# five seeds each. Accuracy (semi-supervised reference, the model default since d9b4528): 0.854-
# 0.886 over seeds 0-4, above scvi-tools' surgery (0.775-0.850) on every seed. Held-out alpha:
# AUROC 0.735 [0.652-0.819] by default, 0.774 [0.697-0.869] with the opt-in query context; seed 0,
# which these tests run, is the best of the five. The alpha cells land inside the reference's
# beta/gamma region and the query's gamma and delta cells are as poorly covered by reference
# cells as alpha is (docs/benchmarks.md). These tests guard seed 0 against regressions below what
# is measured now and carry the 0.90 AUROC target as a non-strict expected failure.


def _panc8(shared_data, holdout=None):
    adata = ad.read_h5ad(shared_data / "panc8_sub_nebula.h5ad")
    model, res, ref, query = _map(adata, PANC8_REFERENCE, holdout=holdout, include_atlas=False)
    truth = query.obs["cell_type"].to_numpy()
    pred = predict_labels(model.labels, {}, res.latent, label_key="cell_type")
    assert pred.method == "prototype"
    return model, ref, truth, pred, res.latent


@pytest.mark.slow
def test_panc8_query_accuracy(shared_data):
    model, _, truth, pred, _ = _panc8(shared_data)
    # the target, 0.85, two ways (measured, seed 0: 0.871 and 0.861; seeds 0-4:
    # 0.854-0.886 and 0.857-0.893):
    # the top label, as scvi-tools' surgery and PCA + logistic regression are scored
    assert M.label_accuracy(truth, pred.top_label) >= 0.85
    # and counting every "Unknown" as wrong except on the 8 query cells whose types the
    # reference cannot name (endothelial, macrophage, quiescent stellate, schwann: fewer than
    # 20 reference cells, so no prototype)
    classes = model.labels["levels"]["cell_type"]["prototype"]["classes"]
    assert M.open_set_accuracy(truth, pred.pred, classes) >= 0.85


@pytest.mark.slow
def test_panc8_held_out_alpha_is_flagged(shared_data):
    model, ref, truth, pred, latent = _panc8(shared_data, holdout="alpha")
    knowledge, _ = build_label_knowledge(
        model.get_latent(ref, batch_key="batch", namespace="ref"),
        {"cell_type": ref.obs["cell_type"].to_numpy()},
    )
    assert "alpha" not in knowledge["levels"]["cell_type"]["prototype"]["classes"]
    novel = truth == "alpha"
    auroc = M.unknown_detection_auroc(pred.uncertainty, novel)
    assert auroc >= 0.75
    ctx = predict_labels(model.labels, {}, latent, label_key="cell_type", query_context=True)
    assert np.array_equal(ctx.top_label, pred.top_label)
    ctx_auroc = M.unknown_detection_auroc(ctx.uncertainty, novel)
    called_unknown = float(np.mean(ctx.pred[novel] == "Unknown"))
    known_unknown = float(np.mean(ctx.pred[~novel] == "Unknown"))
    # measured (seed 0): AUROC 0.87, alpha called Unknown 0.60, known types called Unknown 0.12
    assert ctx_auroc >= 0.82
    # without the query's 20 delta cells (seed 0): 0.893 default, 0.916 with context
    nd = truth != "delta"
    assert M.unknown_detection_auroc(pred.uncertainty[nd], novel[nd]) >= 0.87
    assert M.unknown_detection_auroc(ctx.uncertainty[nd], novel[nd]) >= 0.90
    assert called_unknown > 0.5
    assert known_unknown <= 0.2
    if ctx_auroc < 0.90:
        pytest.xfail(f"issue target not reached: AUROC {ctx_auroc:.3f} (>= 0.90) with query context")
