"""A seeded simulator of single-cell counts for tests and scale benchmarks.

Model (all parameters drawn from one seed):

* gene baseline proportions ``p_g`` ~ Gamma(0.3) (a few genes dominate, most are rare);
* ``n_cell_types`` programs: each up-regulates ``program_genes`` random genes by a log-normal
  fold change around ``program_fold``;
* batch effects: every batch multiplies every gene by a log-normal factor
  (``batch_scale_sd``), and batches have different mean library sizes (``batch_library_sd``);
* per-cell library size: log-normal around ``mean_library`` (``library_sd``);
* counts: negative binomial with mean ``library * normalize(p * program_type * scale_batch)`` and
  gene-wise inverse dispersion ``theta_g`` ~ Gamma(2, 5) (sampled as Gamma-Poisson).

Condition shift (a biological response, e.g. a stimulation or disease, that the reference never
saw; off unless ``shift_strength > 0`` and ``shift_batches`` names batches): one gene set of
``shift_genes`` genes, shared by all cell types, half of it up and half down. Gene g of type t
moves by the natural-log fold change ``shift_strength * sign_g * m_g * r_tg``, where
``m_g`` ~ LogNormal(0, 0.3) is the gene's response size and ``r_tg`` ~ LogNormal(0,
``shift_type_sd``) makes the size partly type-specific. It multiplies the expression of every
cell of the shifted batches. Proportions are renormalised (library sizes unchanged), so the
other genes of a shifted cell all move by one common factor, as in a real compositional readout.
``shift_strength`` is thus the typical |log fold change| of a response gene: 1 is moderate
(about 2.7x), 2 strong (about 7x). Its draws come from a random stream of their own, so
``shift_strength=0`` gives bit for bit the counts of a simulation without the shift.

Cells are generated chunk by chunk (``chunk_size`` rows) straight into CSR, so memory is about
the number of nonzeros, never ``n_cells x n_genes`` dense; :func:`write_simulated_h5ad` appends
chunk by chunk to an .h5ad (backed-friendly CSR ``X``), so millions of cells need only the
per-chunk memory plus ``obs``.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import scipy.sparse as sp

__all__ = [
    "SimulationParameters",
    "simulate_counts",
    "iter_simulated_chunks",
    "response_program",
    "write_simulated_h5ad",
]


@dataclass(frozen=True)
class SimulationParameters:
    n_cells: int
    n_genes: int = 2000
    n_batches: int = 4
    n_cell_types: int = 8
    seed: int = 0
    mean_library: float = 1500.0
    library_sd: float = 0.4
    batch_library_sd: float = 0.3
    batch_scale_sd: float = 0.4
    program_genes: int = 60
    program_fold: float = 6.0
    chunk_size: int = 8192
    shift_batches: tuple[int, ...] = ()
    shift_strength: float = 0.0
    shift_genes: int = 100
    shift_type_sd: float = 0.5


def response_program(p: SimulationParameters) -> tuple[np.ndarray, np.ndarray]:
    """The condition-shift response: ``(genes, log_fold)``, the shared response genes (sorted
    indices) and the natural-log fold change of each, per cell type (``n_cell_types x
    len(genes)``), at ``p.shift_strength``. Drawn from its own stream of ``p.seed``, so the
    same genes and relative sizes come back at every strength."""
    rng = np.random.default_rng(np.random.SeedSequence([p.seed, 2]))
    k = min(p.shift_genes, p.n_genes)
    genes = np.sort(rng.choice(p.n_genes, size=k, replace=False))
    sign = np.where(np.arange(k) % 2 == 0, 1.0, -1.0)[rng.permutation(k)]
    size = rng.lognormal(0.0, 0.3, size=k)
    per_type = rng.lognormal(0.0, p.shift_type_sd, size=(p.n_cell_types, k))
    return genes, p.shift_strength * sign[None, :] * size[None, :] * per_type


class _Design:
    """Everything drawn once: gene programs, batch effects, per-cell covariates."""

    def __init__(self, p: SimulationParameters) -> None:
        if p.n_cells < 0 or p.n_genes < 1 or p.n_batches < 1 or p.n_cell_types < 1:
            raise ValueError("n_cells >= 0, n_genes, n_batches, n_cell_types >= 1 required")
        if p.shift_strength < 0 or p.shift_genes < 1 or p.shift_type_sd < 0:
            raise ValueError(
                f"shift_strength ({p.shift_strength}) and shift_type_sd ({p.shift_type_sd}) "
                f"must be >= 0 and shift_genes ({p.shift_genes}) >= 1; strength 0 = no shift"
            )
        bad = [b for b in p.shift_batches if not 0 <= int(b) < p.n_batches]
        if bad:
            raise ValueError(
                f"shift_batches {bad} out of range: batches are numbered 0..{p.n_batches - 1}"
            )
        rng = np.random.default_rng(np.random.SeedSequence([p.seed, 0]))
        g = p.n_genes
        base = rng.gamma(0.3, 1.0, size=g) + 1e-3
        prog = np.ones((p.n_cell_types, g))
        k = min(p.program_genes, g)
        for t in range(p.n_cell_types):
            genes = rng.choice(g, size=k, replace=False)
            prog[t, genes] = rng.lognormal(np.log(p.program_fold), 0.3, size=k)
        scale = rng.lognormal(0.0, p.batch_scale_sd, size=(p.n_batches, g))
        props = base[None, None, :] * prog[:, None, :] * scale[None, :, :]
        self.props = props / props.sum(axis=2, keepdims=True)  # (types, batches, genes)
        self.shifted = np.zeros(p.n_batches, dtype=bool)
        if p.shift_strength > 0 and p.shift_batches:
            self.shifted[list(p.shift_batches)] = True
            genes, log_fold = response_program(p)
            shifted = self.props[:, self.shifted, :].copy()
            shifted[:, :, genes] *= np.exp(log_fold)[:, None, :]
            self.props[:, self.shifted, :] = shifted / shifted.sum(axis=2, keepdims=True)
        self.theta = rng.gamma(2.0, 5.0, size=g)
        batch_lib = p.mean_library * rng.lognormal(0.0, p.batch_library_sd, size=p.n_batches)
        type_p = rng.dirichlet(np.full(p.n_cell_types, 3.0))
        self.batch = rng.integers(0, p.n_batches, size=p.n_cells)
        self.cell_type = rng.choice(p.n_cell_types, size=p.n_cells, p=type_p)
        self.library = batch_lib[self.batch] * rng.lognormal(0.0, p.library_sd, size=p.n_cells)


def _obs_var(p: SimulationParameters, d: _Design) -> tuple[Any, Any]:
    import pandas as pd

    width = len(str(max(p.n_batches - 1, 0)))
    batches = [f"batch{i:0{width}d}" for i in range(p.n_batches)]
    tw = len(str(max(p.n_cell_types - 1, 0)))
    types = [f"type{i:0{tw}d}" for i in range(p.n_cell_types)]
    obs = pd.DataFrame(
        {
            "batch": pd.Categorical.from_codes(d.batch, categories=batches),
            "cell_type": pd.Categorical.from_codes(d.cell_type, categories=types),
            "library_mean": d.library.astype(np.float32),
        },
        index=pd.Index([f"cell{i}" for i in range(p.n_cells)]),
    )
    gw = len(str(p.n_genes - 1))
    var = pd.DataFrame(index=pd.Index([f"gene{i:0{gw}d}" for i in range(p.n_genes)]))
    if d.shifted.any():
        obs["condition"] = pd.Categorical(
            np.where(d.shifted[d.batch], "shifted", "control"), categories=["control", "shifted"]
        )
        var["response_gene"] = np.isin(np.arange(p.n_genes), response_program(p)[0])
    return obs, var


def _uns(p: SimulationParameters) -> dict[str, Any]:
    # list, not tuple: .h5ad stores lists; the shift keys only where a shift is on, so a
    # strength-0 simulation is the same AnnData as one made before the shift existed
    out = {k: v for k, v in p.__dict__.items() if not k.startswith("shift_")}
    if p.shift_strength > 0 and p.shift_batches:
        out.update({k: v for k, v in p.__dict__.items() if k.startswith("shift_")})
        out["shift_batches"] = [int(b) for b in p.shift_batches]
    return out


def iter_simulated_chunks(params: SimulationParameters) -> Iterator[sp.csr_matrix]:
    """CSR float32 count chunks of ``params.chunk_size`` cells, in cell order."""
    d = _Design(params)
    seeds = np.random.SeedSequence([params.seed, 1])
    n_chunks = (params.n_cells + params.chunk_size - 1) // params.chunk_size
    for ci, child in zip(range(n_chunks), seeds.spawn(max(n_chunks, 1)), strict=False):
        rng = np.random.default_rng(child)
        lo = ci * params.chunk_size
        hi = min(lo + params.chunk_size, params.n_cells)
        mu = d.props[d.cell_type[lo:hi], d.batch[lo:hi]] * d.library[lo:hi, None]
        lam = rng.gamma(d.theta[None, :], mu / d.theta[None, :])
        counts = rng.poisson(lam).astype(np.float32)
        yield sp.csr_matrix(counts)


def simulate_counts(
    n_cells: int,
    n_genes: int = 2000,
    n_batches: int = 4,
    n_cell_types: int = 8,
    seed: int = 0,
    **kw: Any,
) -> Any:
    """An in-memory AnnData (CSR float32 integer counts in X, ``obs["batch"]``,
    ``obs["cell_type"]``; with a condition shift also ``obs["condition"]``, control or
    shifted, and ``var["response_gene"]``). Extra keywords: see :class:`SimulationParameters`,
    e.g. ``shift_batches=(4, 5), shift_strength=1.0``."""
    import anndata as ad

    p = SimulationParameters(
        n_cells=n_cells,
        n_genes=n_genes,
        n_batches=n_batches,
        n_cell_types=n_cell_types,
        seed=seed,
        **kw,
    )
    d = _Design(p)
    obs, var = _obs_var(p, d)
    chunks = list(iter_simulated_chunks(p))
    x = (
        sp.vstack(chunks, format="csr").astype(np.float32)
        if chunks
        else sp.csr_matrix((0, n_genes), dtype=np.float32)
    )
    adata = ad.AnnData(X=x, obs=obs, var=var)
    adata.uns["simulation"] = _uns(p)
    return adata


def write_simulated_h5ad(
    path: str | Path,
    n_cells: int,
    n_genes: int = 2000,
    n_batches: int = 4,
    n_cell_types: int = 8,
    seed: int = 0,
    **kw: Any,
) -> Path:
    """Write the simulation to ``path`` chunk by chunk (CSR X appended in place); the file
    reads with ``anndata.read_h5ad(path, backed="r")``. Returns the path."""
    import anndata as ad
    import h5py
    from anndata.io import sparse_dataset, write_elem

    p = SimulationParameters(
        n_cells=n_cells,
        n_genes=n_genes,
        n_batches=n_batches,
        n_cell_types=n_cell_types,
        seed=seed,
        **kw,
    )
    d = _Design(p)
    obs, var = _obs_var(p, d)
    path = Path(path)
    shell = ad.AnnData(obs=obs, var=var)
    shell.uns["simulation"] = _uns(p)
    shell.write_h5ad(path)
    with h5py.File(path, "a") as f:
        first = True
        x = None
        for chunk in iter_simulated_chunks(p):
            if first:
                write_elem(f, "X", chunk)
                x = sparse_dataset(f["X"])
                first = False
            else:
                assert x is not None
                x.append(chunk)
        if first:
            write_elem(f, "X", sp.csr_matrix((0, n_genes), dtype=np.float32))
    return path
