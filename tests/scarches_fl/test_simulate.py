"""The count simulator: seeded, sparse, chunked, backed-friendly."""

from __future__ import annotations

import anndata as ad
import numpy as np
import scipy.sparse as sp

from scarches_fl.simulate import simulate_counts, write_simulated_h5ad


def test_simulation_is_seeded_sparse_integer_counts():
    a = simulate_counts(300, n_genes=100, n_batches=3, n_cell_types=4, seed=5, chunk_size=64)
    b = simulate_counts(300, n_genes=100, n_batches=3, n_cell_types=4, seed=5, chunk_size=64)
    c = simulate_counts(300, n_genes=100, n_batches=3, n_cell_types=4, seed=6, chunk_size=64)
    assert sp.isspmatrix_csr(a.X) and a.X.dtype == np.float32
    assert (a.X != b.X).nnz == 0 and (a.X != c.X).nnz > 0
    assert np.array_equal(a.X.data, np.round(a.X.data)) and (a.X.data > 0).all()
    assert set(a.obs["batch"]) == {"batch0", "batch1", "batch2"}
    assert a.obs["cell_type"].nunique() == 4
    assert 0.01 < a.X.nnz / (300 * 100) < 0.9


def test_cell_types_and_batches_shape_expression():
    a = simulate_counts(600, n_genes=200, n_batches=2, n_cell_types=3, seed=0)
    x = a.X.toarray()
    x = x / x.sum(1, keepdims=True)
    t = a.obs["cell_type"].to_numpy()
    means = np.stack([x[t == k].mean(0) for k in np.unique(t)])
    assert np.abs(np.log((means[0] + 1e-6) / (means[1] + 1e-6))).max() > 1.0


def test_write_chunked_h5ad_reads_backed(tmp_path):
    path = write_simulated_h5ad(tmp_path / "s.h5ad", 250, n_genes=30, seed=3, chunk_size=64)
    mem = simulate_counts(250, n_genes=30, seed=3, chunk_size=64)
    b = ad.read_h5ad(path, backed="r")
    assert b.shape == (250, 30)
    assert (sp.csr_matrix(b.X[100:164]) != mem.X[100:164]).nnz == 0
    full = ad.read_h5ad(path)
    assert (full.X != mem.X).nnz == 0
    assert list(full.obs["batch"]) == list(mem.obs["batch"])
