"""Data registration and gene alignment: edge cases and clear errors."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from protocols.errors import ScarchesFLError
from scarches_fl.data import (
    DataError,
    DataWarning,
    align_genes,
    condition_names,
    filter_batches,
    gene_alignment,
    iter_count_windows,
    read_counts,
    register,
)


def _adata(x, genes=None, batches=None, labels=None, layers=None):
    x = sp.csr_matrix(np.asarray(x, dtype=np.float32))
    n, g = x.shape
    genes = genes or [f"G{i}" for i in range(g)]
    obs = pd.DataFrame(index=[f"c{i}" for i in range(n)])
    obs["batch"] = batches if batches is not None else ["b0"] * n
    if labels is not None:
        obs["cell_type"] = labels
    a = ad.AnnData(X=x, obs=obs, var=pd.DataFrame(index=genes))
    for k, v in (layers or {}).items():
        a.layers[k] = sp.csr_matrix(np.asarray(v, dtype=np.float32))
    return a


def test_data_error_is_a_scarches_error():
    assert issubclass(DataError, ScarchesFLError)


def test_alignment_reorders_drops_and_zero_fills_without_densifying():
    q = _adata([[1, 2, 3, 4], [5, 0, 0, 6]], genes=["C", "A", "X", "B"])
    aligned, rep = align_genes(q, ["A", "B", "C", "D"], min_coverage=0.5)
    assert sp.issparse(aligned.X)
    np.testing.assert_array_equal(aligned.X.toarray(), [[2, 4, 1, 0], [0, 6, 5, 0]])
    assert list(aligned.var_names) == ["A", "B", "C", "D"]
    assert (rep.n_reference_genes, rep.n_query_genes, rep.n_overlap) == (4, 4, 3)
    assert (rep.n_missing, rep.n_extra) == (1, 1)
    assert rep.coverage == pytest.approx(0.75)
    assert rep.missing_examples == ["D"] and rep.extra_examples == ["X"]
    assert rep.reordered
    assert "3/4" in rep.summary()


def test_alignment_identity_and_duplicates():
    pmat, rep = gene_alignment(["A", "B"], ["A", "B"])
    assert not rep.reordered and rep.coverage == 1.0
    _, rep = gene_alignment(["A", "A", "B"], ["A", "B"])
    assert rep.n_duplicates == 1 and rep.n_overlap == 2


def test_zero_overlap_error_names_overlap_and_fix():
    with pytest.raises(DataError, match="no genes in common") as e:
        gene_alignment(["X", "Y"], ["A", "B"])
    assert "0 of 2" in str(e.value) and "Fix" in str(e.value)


def test_below_min_coverage_refused():
    with pytest.raises(DataError, match="coverage 25.0%"):
        gene_alignment(["A", "X", "Y", "Z"], ["A", "B", "C", "D"], min_coverage=0.5)
    _, rep = gene_alignment(["A", "X"], ["A", "B", "C", "D"], min_coverage=0.2)
    assert rep.n_overlap == 1


def test_ensembl_versus_symbol_is_detected():
    ref = [f"ENSG{i:011d}" for i in range(50)]
    with pytest.raises(DataError, match="ensembl IDs and the query's like symbols"):
        gene_alignment([f"GENE{i}" for i in range(50)], ref)


def test_letter_case_mismatch_hint():
    with pytest.raises(DataError, match="letter case"):
        gene_alignment([f"gene{i}" for i in range(20)], [f"GENE{i}" for i in range(20)])


def test_missing_batch_key_lists_available_keys():
    a = _adata([[1, 2]], labels=["t"])
    with pytest.raises(DataError, match=r"batch key 'donor' not found.*batch, cell_type"):
        register(a, batch_key="donor", namespace="ref")
    with pytest.raises(DataError, match="label key 'ct' not found"):
        register(a, batch_key="batch", namespace="ref", label_key="ct")


def test_non_integer_counts_with_nb_explain_fix():
    a = _adata([[1.5, 2], [0, 1]])
    with pytest.raises(DataError, match="non-integer.*--layer counts.*trvae"):
        register(a, batch_key="batch", namespace="ref", likelihood="nb")
    reg = register(a, batch_key="batch", namespace="ref", likelihood="trvae")
    assert reg.n_cells == 2


def test_negative_nan_inf_and_empty():
    with pytest.raises(DataError, match="negative"):
        register(_adata([[-1, 2]]), batch_key="batch", namespace="ref")
    with pytest.raises(DataError, match="NaN or infinite"):
        register(_adata([[np.nan, 2]]), batch_key="batch", namespace="ref")
    with pytest.raises(DataError, match="NaN or infinite"):
        register(_adata([[np.inf, 2]]), batch_key="batch", namespace="ref")
    empty = _adata(np.zeros((0, 3)))
    with pytest.raises(DataError, match="no cells"):
        register(empty, batch_key="batch", namespace="ref")


def test_zero_count_cells_warn_with_count():
    a = _adata([[0, 0], [1, 2], [0, 0]])
    with pytest.warns(DataWarning, match="2 of 3 cells have zero total counts"):
        reg = register(a, batch_key="batch", namespace="ref")
    assert reg.n_zero_cells == 2


def test_layer_selection_and_missing_layer():
    a = _adata([[0.5, 0.1]], layers={"counts": [[3, 1]]})
    reg = register(a, batch_key="batch", namespace="ref", layer="counts")
    np.testing.assert_array_equal(reg.x.toarray(), [[3, 1]])
    assert reg.registration == {"batch_key": "batch", "label_key": None, "layer": "counts"}
    with pytest.raises(DataError, match="layer 'raw' not found.*counts"):
        register(a, batch_key="batch", namespace="ref", layer="raw")


def test_condition_names_sanitize_and_collisions():
    m = condition_names(["10x v3", "CEL-seq2"], "site-1")
    assert m == {"10x v3": "site-1/10x_v3", "CEL-seq2": "site-1/CEL-seq2"}
    with pytest.raises(DataError, match="both become condition"):
        condition_names(["a b", "a_b"], "ref")
    with pytest.raises(DataError, match="namespace"):
        condition_names(["a"], "Bad Namespace")


def test_filter_batches():
    a = _adata(np.ones((3, 2)), batches=["a", "b", "c"])
    assert filter_batches(a, "batch", ["a", "c"]).n_obs == 2
    with pytest.raises(DataError, match="not found"):
        filter_batches(a, "batch", ["z"])


def test_backed_reading_in_windows(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.poisson(0.5, size=(50, 7)).astype(np.float32)
    a = _adata(x)
    path = tmp_path / "d.h5ad"
    a.write_h5ad(path)
    b = ad.read_h5ad(path, backed="r")
    windows = list(iter_count_windows(b, window=16))
    assert [s for s, _ in windows] == [0, 16, 32, 48]
    assert max(w.shape[0] for _, w in windows) <= 16
    np.testing.assert_array_equal(read_counts(b, window=16).toarray(), x)
    rows = np.array([1, 2, 30, 49])
    np.testing.assert_array_equal(read_counts(b, rows=rows, window=16).toarray(), x[rows])


def test_read_counts_in_memory_shares_or_copies_once():
    rng = np.random.default_rng(0)
    dense = rng.poisson(0.7, size=(300, 12)).astype(np.float32)
    a = _adata(dense)
    a.X.sort_indices()
    # float32, sorted, same genes: the AnnData's own arrays, not a copy
    x = read_counts(a, window=64)
    assert np.shares_memory(x.data, a.X.data) and np.shares_memory(x.indices, a.X.indices)
    np.testing.assert_array_equal(x.toarray(), dense)
    # other dtypes and an alignment: one copy, filled window by window, the same numbers
    a64 = ad.AnnData(X=sp.csr_matrix(dense.astype(np.float64)), obs=a.obs, var=a.var)
    y = read_counts(a64, window=64)
    assert y.dtype == np.float32 and not np.shares_memory(y.data, a64.X.data)
    assert y.has_sorted_indices
    np.testing.assert_array_equal(y.toarray(), dense)
    column_map, _ = gene_alignment(a.var_names, ["G3", "G0", "missing", "G11"])
    z = read_counts(a64, column_map=column_map, window=64)
    expect = np.stack([dense[:, 3], dense[:, 0], np.zeros(300, np.float32), dense[:, 11]], 1)
    np.testing.assert_array_equal(z.toarray(), expect)
    assert z.shape == (300, 4)
    assert all(np.all(np.diff(z.indices[z.indptr[i]:z.indptr[i + 1]]) > 0) for i in range(300))
    # reading never wrote into the input
    np.testing.assert_array_equal(a64.X.toarray(), dense)
