"""The count simulator: seeded, sparse, chunked, backed-friendly."""

from __future__ import annotations

import anndata as ad
import numpy as np
import scipy.sparse as sp

from scarches_fl.simulate import (
    SimulationParameters,
    response_program,
    simulate_counts,
    write_simulated_h5ad,
)


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


def _x_sha256(a) -> str:
    import hashlib

    h = hashlib.sha256()
    for part in (a.X.data, a.X.indices, a.X.indptr):
        h.update(np.ascontiguousarray(part).tobytes())
    return h.hexdigest()


# sha256 of X (data, indices, indptr) of simulate_counts(400, n_genes=150, n_batches=3,
# n_cell_types=4, seed=11, chunk_size=128) as the simulator wrote it before the condition shift
# existed: strength 0 must keep every earlier simulation (and benchmark) bit for bit
_PRE_SHIFT_SHA256 = "661025733784629e7ab84f5a67830f666371f5cc2a2b60bfebe5a4537d0829cd"
_SMALL = {"n_genes": 150, "n_batches": 3, "n_cell_types": 4, "seed": 11, "chunk_size": 128}


def test_shift_strength_zero_is_bit_identical_to_no_shift():
    plain = simulate_counts(400, **_SMALL)
    zero = simulate_counts(400, shift_batches=(2,), shift_strength=0.0, **_SMALL)
    assert _x_sha256(plain) == _x_sha256(zero) == _PRE_SHIFT_SHA256
    assert plain.obs.equals(zero.obs) and "condition" not in zero.obs
    assert zero.uns["simulation"] == plain.uns["simulation"]


def test_shift_moves_the_shared_response_genes_in_every_type():
    params = {"n_genes": 400, "n_batches": 2, "n_cell_types": 4, "seed": 3, "shift_genes": 40}
    control = simulate_counts(3000, **params)
    shifted = simulate_counts(3000, shift_batches=(1,), shift_strength=2.0, **params)
    in_shift = (shifted.obs["batch"] == "batch1").to_numpy()
    assert (shifted.obs["condition"] == "shifted").to_numpy().tolist() == in_shift.tolist()
    genes, log_fold = response_program(
        SimulationParameters(n_cells=3000, shift_batches=(1,), shift_strength=2.0, **params)
    )
    assert np.flatnonzero(shifted.var["response_gene"].to_numpy()).tolist() == genes.tolist()
    # one gene set, same direction in every type; sizes differ between types
    assert (np.sign(log_fold) == np.sign(log_fold[0])).all()
    assert np.abs(np.diff(log_fold, axis=0)).mean() > 0.3
    up, down = genes[log_fold[0] > 0], genes[log_fold[0] < 0]
    assert len(up) == len(down) == 20

    def norm_means(a, rows):
        x = a.X[rows].toarray()
        return (x / x.sum(1, keepdims=True)).mean(0)

    types = shifted.obs["cell_type"].to_numpy()
    others = np.setdiff1d(np.arange(400), genes)
    for t in np.unique(types):
        for rows, moved in ((in_shift & (types == t), True), (~in_shift & (types == t), False)):
            lfc = np.log((norm_means(shifted, rows) + 1e-5) / (norm_means(control, rows) + 1e-5))
            # proportions: the other genes all move by one common factor (renormalisation);
            # the response genes move against them, up and down, in every type
            rel_up = np.median(lfc[up]) - np.median(lfc[others])
            rel_down = np.median(lfc[down]) - np.median(lfc[others])
            if moved:
                assert rel_up > 1.0 and rel_down < -0.5, t
            else:  # the control batch keeps its expression (new draws, same means)
                assert abs(rel_up) < 0.3 and abs(rel_down) < 0.3, t


def test_shift_parameters_are_checked():
    import pytest

    with pytest.raises(ValueError, match="shift_batches"):
        simulate_counts(10, n_batches=2, shift_batches=(2,), shift_strength=1.0)
    with pytest.raises(ValueError, match="shift_strength"):
        simulate_counts(10, shift_batches=(0,), shift_strength=-1.0)
