"""``reference train --n-top-genes N``: batch-aware highly variable genes, recorded in the
bundle, the query aligned to them."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pytest

from protocols.bundle import read_bundle
from scarches_fl.data import DataError
from scarches_fl.genes import select_highly_variable_genes
from scarches_fl.simulate import simulate_counts
from scarches_fl_cli.main import main


@pytest.fixture(scope="module")
def counts():
    return simulate_counts(900, n_genes=300, n_batches=3, n_cell_types=4, seed=2)


def test_selection_is_batch_aware_ordered_and_prefers_type_programs(counts):
    genes = select_highly_variable_genes(counts, n_top_genes=60, batch_key="batch")
    assert len(genes) == 60 and len(set(genes)) == 60
    order = list(counts.var_names)
    assert [order.index(g) for g in genes] == sorted(order.index(g) for g in genes)
    # the genes that separate cell types vary most: most chosen genes differ between types
    x = counts.X.toarray()
    x = x / x.sum(1, keepdims=True)
    t = counts.obs["cell_type"].to_numpy()
    means = np.stack([x[t == k].mean(0) for k in np.unique(t)])
    spread = np.log((means.max(0) + 1e-6) / (means.min(0) + 1e-6))
    chosen = np.isin(order, genes)
    assert np.median(spread[chosen]) > np.median(spread[~chosen])
    # deterministic
    assert select_highly_variable_genes(counts.copy(), n_top_genes=60, batch_key="batch") == genes


def test_selection_errors_name_the_fix(counts):
    with pytest.raises(DataError, match="leave it out"):
        select_highly_variable_genes(counts, n_top_genes=300, batch_key="batch")
    with pytest.raises(DataError, match="at least 1"):
        select_highly_variable_genes(counts, n_top_genes=0, batch_key="batch")
    with pytest.raises(DataError, match="batch key"):
        select_highly_variable_genes(counts, n_top_genes=10, batch_key="donor")


def test_cli_n_top_genes_records_genes_and_query_aligns(counts, tmp_path, capsys):
    data = tmp_path / "counts.h5ad"
    counts.write_h5ad(data)
    ref_dir = tmp_path / "ref"
    rc = main(
        [
            "-q",
            "reference",
            "train",
            "--data",
            str(data),
            "--batch-key",
            "batch",
            "--label-key",
            "cell_type",
            "--batches",
            "batch0,batch1",
            "--n-top-genes",
            "80",
            "--max-epochs",
            "2",
            "--no-progress",
            "--out",
            str(ref_dir),
        ]
    )
    assert rc == 0
    printed = capsys.readouterr().out
    assert "x 80 genes (of 300, --n-top-genes)" in printed
    assert "label 'cell_type': 4 types" in printed
    manifest = read_bundle(ref_dir).manifest
    ref = counts[counts.obs["batch"].isin(["batch0", "batch1"])].copy()
    assert manifest["genes"] == select_highly_variable_genes(ref, n_top_genes=80, batch_key="batch")
    assert manifest["registration"]["gene_selection"]["n_top_genes"] == 80
    assert manifest["registration"]["gene_selection"]["n_input_genes"] == 300
    # the query brings all 300 genes: aligned to the reference's 80
    out = tmp_path / "q.h5ad"
    rc = main(
        [
            "-q",
            "map",
            "--reference",
            str(ref_dir),
            "--data",
            str(data),
            "--batch-key",
            "batch",
            "--batches",
            "batch2",
            "--max-epochs",
            "2",
            "--no-progress",
            "--out",
            str(out),
        ]
    )
    assert rc == 0
    q = ad.read_h5ad(out)
    assert q.obsm["X_scarches"].shape[0] == int((counts.obs["batch"] == "batch2").sum())
