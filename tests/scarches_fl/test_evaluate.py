"""``scarches-fl evaluate`` and the report writer."""

from __future__ import annotations

import json

import numpy as np
import pytest

from scarches_fl.report import (
    EvaluationError,
    EvaluationInput,
    build_report,
    embed_2d,
    plot_joint_embedding,
)
from scarches_fl_cli.main import main

ad = pytest.importorskip("anndata")


def _mapped_query(tmp_path, seed: int = 0):
    """A file shaped like `scarches-fl map` output: 3 types, 2 batches, one novel type."""
    rng = np.random.default_rng(seed)
    centers = {"alpha": [0, 0, 0, 0], "beta": [6, 0, 0, 0], "novel": [0, 6, 0, 0]}
    z = np.concatenate([rng.normal(c, 1.0, (40, 4)) for c in centers.values()])
    truth = np.repeat(list(centers), 40)
    pred = truth.copy().astype(object)
    pred[truth == "novel"] = "Unknown"
    pred[:4] = "beta"  # 4 mistakes
    unc = np.where(truth == "novel", 0.9, 0.1) + rng.uniform(-0.05, 0.05, truth.size)
    adata = ad.AnnData(np.zeros((truth.size, 3), dtype=np.float32))
    adata.obs["batch"] = np.tile(["site_a", "site_b"], truth.size // 2)
    adata.obs["cell_type"] = truth
    adata.obs["cell_type_pred"] = pred.astype(str)
    adata.obs["cell_type_uncertainty"] = unc.astype(np.float32)
    adata.obsm["X_scarches"] = z.astype(np.float32)
    path = tmp_path / "mapped.h5ad"
    adata.write_h5ad(path)
    return path, truth, pred


def test_evaluate_cli_writes_metrics_plots_and_readme(tmp_path, capsys):
    path, truth, pred = _mapped_query(tmp_path)
    report = tmp_path / "report"
    rc = main(
        [
            "evaluate",
            "--data",
            str(path),
            "--batch-key",
            "batch",
            "--label-key",
            "cell_type",
            "--report",
            str(report),
            "--novel-types",
            "novel",
            "--embedding",
            "pca",
        ]
    )
    assert rc == 0
    metrics = json.loads((report / "metrics.json").read_text())
    lt = metrics["label_transfer"]
    assert lt["accuracy"] == pytest.approx(np.mean(truth == pred))
    assert lt["novel_types"] == ["novel"]
    assert lt["novel_auroc"] == 1.0
    assert lt["novel_fraction_called_unknown"] == 1.0
    assert 0.0 <= metrics["integration"]["entropy_of_batch_mixing"] <= 1.0
    for png in (
        "embedding_by_batch.png",
        "embedding_by_label.png",
        "embedding_by_prediction.png",
        "embedding_by_uncertainty.png",
        "confusion_matrix.png",
    ):
        data = (report / png).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000, png
    readme = (report / "README.md").read_text()
    assert "accuracy" in readme and "embedding_by_uncertainty.png" in readme
    assert "report:" in capsys.readouterr().out


def test_evaluate_cli_errors_are_user_messages(tmp_path, capsys):
    rc = main(
        [
            "evaluate",
            "--data",
            str(tmp_path / "missing.h5ad"),
            "--batch-key",
            "b",
            "--label-key",
            "l",
        ]
    )
    assert rc == 2
    assert "scarches-fl map" in capsys.readouterr().err
    adata = ad.AnnData(np.zeros((4, 2), dtype=np.float32))
    adata.obs["b"] = ["x", "y", "x", "y"]
    adata.write_h5ad(tmp_path / "raw.h5ad")
    rc = main(
        ["evaluate", "--data", str(tmp_path / "raw.h5ad"), "--batch-key", "b", "--label-key", "l"]
    )
    assert rc == 2
    assert "X_scarches" in capsys.readouterr().err


def test_report_with_reference_cells(tmp_path):
    rng = np.random.default_rng(1)
    zr = np.concatenate([rng.normal(0, 1, (50, 3)), rng.normal(5, 1, (50, 3))])
    zq = np.concatenate([rng.normal(0, 1, (20, 3)), rng.normal(5, 1, (20, 3))])
    inp = EvaluationInput(
        query_latent=zq,
        query_batches=np.array(["q"] * 40),
        query_true=np.repeat(["a", "b"], 20),
        query_pred=np.repeat(["a", "b"], 20),
        query_uncertainty=np.full(40, 0.05),
        reference_latent=zr,
        reference_batches=np.tile(["r1", "r2"], 50),
        reference_labels=np.repeat(["a", "b"], 50),
        known_types=["a", "b"],
    )
    m = build_report(inp, tmp_path / "r", embedding="pca")
    assert m["n_reference_cells"] == 100
    assert m["label_transfer"]["accuracy"] == 1.0
    # reference and query drawn from the same distribution: well mixed
    assert m["integration"]["ebm_reference_vs_query"] > 0.6
    assert m["integration"]["knn_purity"] == pytest.approx(1.0)
    with pytest.raises(EvaluationError, match="same reference model"):
        build_report(
            EvaluationInput(
                query_latent=zq, query_batches=np.array(["q"] * 40), reference_latent=zr[:, :2]
            ),
            tmp_path / "bad",
        )


def test_report_marks_types_the_reference_cannot_name(tmp_path):
    rng = np.random.default_rng(2)
    inp = EvaluationInput(
        query_latent=rng.normal(0, 1, (30, 3)),
        query_batches=np.array(["q"] * 30),
        query_true=np.repeat(["a", "b", "new"], 10),
        query_pred=np.repeat(["a", "b", "Unknown"], 10),
        query_uncertainty=np.r_[np.full(20, 0.1), np.full(10, 0.9)],
        known_types=["a", "b"],
    )
    m = build_report(inp, tmp_path / "r", embedding="pca")
    assert m["label_transfer"]["types_not_in_reference"] == ["new"]
    readme = (tmp_path / "r" / "README.md").read_text()
    assert "cannot name" in readme and "new" in readme
    assert (tmp_path / "r" / "confusion_matrix.png").stat().st_size > 0


def test_embed_2d_pca_keeps_the_main_axis():
    rng = np.random.default_rng(0)
    z = rng.normal(0, 0.1, (200, 5))
    z[:, 3] += np.repeat([0.0, 10.0], 100)
    xy, how = embed_2d(z, method="pca")
    assert xy.shape == (200, 2) and how.startswith("PCA")
    assert abs(np.corrcoef(xy[:, 0], z[:, 3])[0, 1]) > 0.99


def test_plot_joint_embedding_writes_one_png_per_coloring(tmp_path):
    from scarches_fl.report import EvaluationError, plot_joint_embedding

    rng = np.random.default_rng(0)
    latent = np.concatenate([rng.normal(0, 1, (40, 5)), rng.normal(4, 1, (40, 5))])
    study = np.array(["ref"] * 40 + ["site-a"] * 40)
    kind = np.array(["alpha", "beta"] * 40)
    paths = plot_joint_embedding(
        latent, {"study": study, "cell type": kind}, out_dir=tmp_path, title="test", method="pca"
    )
    assert [p.name for p in paths] == ["embedding_by_study.png", "embedding_by_cell_type.png"]
    for p in paths:
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(EvaluationError, match="has 3 values"):
        plot_joint_embedding(latent, {"bad": study[:3]}, out_dir=tmp_path, title="t", method="pca")


def _reference_file():
    a = ad.AnnData(np.zeros((9, 2), dtype=np.float32))
    a.obs["batch"] = ["a"] * 3 + ["b"] * 3 + ["q1"] * 3
    return a


def test_reference_batches_are_picked_from_a_file_that_holds_query_studies_too():
    from scarches_fl.report import select_reference_batches

    kw = dict(batch_key="batch", namespace="ref", source="panc8.h5ad")
    cells, note = select_reference_batches(
        _reference_file(), ["ref/a", "ref/b"], requested=None, **kw
    )
    assert cells.n_obs == 6 and set(cells.obs["batch"]) == {"a", "b"}
    assert "left out, not reference studies: q1" in note
    cells, _ = select_reference_batches(_reference_file(), ["ref/a", "ref/b"], requested="a", **kw)
    assert cells.n_obs == 3


def test_reference_batches_errors_speak_of_studies_not_namespaces():
    from scarches_fl.report import select_reference_batches

    kw = dict(batch_key="batch", namespace="ref", source="panc8.h5ad")
    with pytest.raises(EvaluationError, match="not trained on this study.*trained on a, b"):
        select_reference_batches(_reference_file(), ["ref/a", "ref/b"], requested="q1", **kw)
    with pytest.raises(EvaluationError, match="not batches of panc8.h5ad"):
        select_reference_batches(_reference_file(), ["ref/a", "ref/b"], requested="zz", **kw)
    with pytest.raises(EvaluationError, match="none of the batches.*--reference-batches"):
        select_reference_batches(_reference_file(), ["ref/x"], requested=None, **kw)
    for call in ("q1", "zz", None):
        try:
            select_reference_batches(_reference_file(), ["ref/x"], requested=call, **kw)
        except EvaluationError as exc:
            assert "namespace" not in str(exc)


def test_one_palette_reference_grey_sites_distinct_unknown_black():
    from scarches_fl.report import category_colours

    cats = [
        "reference: indrop1",
        "reference: celseq",
        "hospital-a",
        "hospital-b",
        "hospital-c",
        "Unknown",
    ]
    pal = category_colours(cats)
    for c in cats[:2]:
        r, g, b, _ = pal[c]
        assert r == g == b  # grey
    assert pal["Unknown"][:3] == (0.0, 0.0, 0.0)
    sites = [tuple(pal[c][:3]) for c in cats[2:5]]
    assert len(set(sites)) == 3 and all(len(set(s)) > 1 for s in sites)  # coloured, distinct
    many = category_colours([f"t{i}" for i in range(25)])
    assert len({tuple(v[:3]) for v in many.values()}) == 25


def test_umap_is_announced_and_embedding_axes_carry_no_ticks(tmp_path, monkeypatch, caplog):
    import logging
    import sys
    import types

    fake = types.ModuleType("umap")

    class UMAP:  # stands in for umap-learn: the first two latent dimensions
        def __init__(self, **_kw):
            pass

        def fit_transform(self, z):
            return z[:, :2]

    fake.UMAP = UMAP
    monkeypatch.setitem(sys.modules, "umap", fake)
    rng = np.random.default_rng(0)
    with caplog.at_level(logging.INFO, logger="scarches_fl.report"):
        paths = plot_joint_embedding(
            rng.normal(size=(30, 3)),
            {"role": np.array(["reference"] * 20 + ["hospital-c"] * 10)},
            out_dir=tmp_path,
            title="t",
        )
    assert "computing a UMAP of 30 cells" in caplog.text
    assert paths[0].stat().st_size > 0
    import matplotlib.pyplot as plt

    from scarches_fl.report import _scatter_categories

    fig, ax = plt.subplots()
    _scatter_categories(ax, rng.normal(size=(5, 2)), np.array(["a"] * 5), title="t", size=5)
    assert list(ax.get_xticks()) == [] and list(ax.get_yticks()) == []
    plt.close(fig)
