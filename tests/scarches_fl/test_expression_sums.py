"""Expression prototypes from sums (scarches_fl._expression_sums, ADR 0037): sites' shares pooled
give the central reference's expression prototypes, and what a share holds is sums only."""

from __future__ import annotations

import numpy as np
import pytest

from scarches_fl import _expression_sums as ES
from scarches_fl.refine import (
    EXPRESSION_COMPONENTS,
    EXPRESSION_GENE_MEAN,
    fit_expression_prototypes,
)
from scarches_fl.simulate import simulate_counts

P = 12
KAPPA = 200.0


@pytest.fixture(scope="module")
def data():
    adata = simulate_counts(600, n_genes=80, n_batches=6, n_cell_types=4, seed=5)
    x = adata.X
    labels = adata.obs["cell_type"].astype(str).to_numpy().astype(object)
    labels[::37] = None  # a few unlabelled cells: in neither the central nor the federated fit
    batches = adata.obs["batch"].astype(str).to_numpy()
    return x, labels, batches


def _sites(batches):
    names = sorted(set(batches))
    return [np.flatnonzero(np.isin(batches, names[i : i + 2])) for i in range(0, len(names), 2)]


def test_federated_sums_reproduce_the_central_expression_prototypes(data):
    x, labels, batches = data
    info, central = fit_expression_prototypes(
        x, {"cell_type": labels}, batches=batches, n_components=P, kappa=KAPPA, seed=0
    )
    level = info["levels"]["cell_type"]
    classes = level["classes"]
    sites = _sites(batches)

    # 1. the subspace from the sites' moments, each sent as arrays and read back
    shares = [
        ES.moments_from_arrays(
            ES.moments_to_arrays(ES.site_expression_moments(x[r], labels[r])), n_genes=x.shape[1]
        )
        for r in sites
    ]
    gene_mean, comps = ES.subspace_from_moments(ES.pool_moments(shares), P)
    np.testing.assert_allclose(gene_mean, central[EXPRESSION_GENE_MEAN], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(comps, central[EXPRESSION_COMPONENTS], rtol=1e-4, atol=1e-5)
    projection = (gene_mean.astype(np.float32), comps.astype(np.float32))

    # 2. the type model from the sites' per-type and per-batch sums, batches namespaced per site
    parts = []
    for i, r in enumerate(sites):
        names, arrays = ES.sums_to_arrays(
            ES.site_sums(x[r], labels[r], batches[r], projection, classes, floor=1)
        )
        parts.append(
            ES.sums_from_arrays(
                names, arrays, n_components=P, classes=classes, batch_prefix=f"site{i}/"
            )
        )
    model = ES.type_model(ES.pool_sums(parts), P)
    assert model.classes == classes
    np.testing.assert_allclose(model.means, central[level["means_tensor"]], rtol=1e-4, atol=1e-4)
    cov = ES.shrunk_covariance(model.within, model.counts, KAPPA)
    np.testing.assert_allclose(cov, central[level["covariance_tensor"]], rtol=1e-4, atol=1e-4)
    assert [int(v) for v in model.counts] == level["cell_counts"]

    # 3. calibration. Each cell is scored by the model without its fold's cells at its site:
    # with one site (a central reference) that is the central rule exactly; with three, every
    # fold model also keeps the other sites' cells, so the figures are close, not equal.
    labelled = np.flatnonzero(np.array([v is not None for v in labels]))
    fold_of = np.empty(len(labels), dtype=np.int64)
    fold_of[labelled] = np.random.default_rng(0).permutation(labelled.size) % ES.N_FOLDS
    site_of = np.empty(len(labels), dtype=object)
    for i, r in enumerate(sites):
        site_of[r] = f"site{i}/"
    y = ES._project(
        ES.lognormalize(x[labelled]), *(np.asarray(a, dtype=np.float64) for a in projection)
    )
    corrected = y - np.stack([model.offsets[f"{site_of[j]}{batches[j]}"] for j in labelled])
    types = [str(labels[j]) for j in labelled]
    one = ES.calibration_sums(model, corrected, types, fold_of[labelled], kappa=KAPPA)
    temperature, quantiles = ES.calibrate_expression([one])
    assert temperature == level["temperature"]
    np.testing.assert_allclose(quantiles, level["novelty_quantiles"], rtol=1e-4)
    sums = []
    for i in range(len(sites)):
        at = np.array([site_of[j] == f"site{i}/" for j in labelled])
        site_model = ES.model_from_json(
            ES.model_to_json(model, [b for b in model.offsets if b.startswith(f"site{i}/")])
        )
        sums.append(
            ES.calibration_sums(
                site_model,
                corrected[at],
                [t for t, a in zip(types, at, strict=True) if a],
                fold_of[labelled][at],
                kappa=KAPPA,
            )
        )
    assert sum(s["counts"][0] for s in sums) == len(labelled)
    _t, federated_quantiles = ES.calibrate_expression(sums)
    np.testing.assert_allclose(federated_quantiles[1:-1], quantiles[1:-1], rtol=0.15)


def test_only_types_and_batches_over_the_site_floor_leave(data):
    x, labels, batches = data
    rows = np.flatnonzero(np.isin(batches, sorted(set(batches))[:2]))
    types = sorted({str(v) for v in labels[rows] if v is not None})
    # four cells of the first type: under the floor of 5, they stay at the site
    few = np.flatnonzero(labels[rows] == types[0])[:4]
    keep = np.concatenate([few, np.flatnonzero(labels[rows] != types[0])])
    r = rows[np.sort(keep)]
    projection = (np.zeros(x.shape[1], np.float32), np.eye(P, x.shape[1], dtype=np.float32))
    sums = ES.site_sums(x[r], labels[r], batches[r], projection, types, floor=5)
    assert types[0] not in sums.types and sums.types == types[1:]
    assert sums.counts.sum(axis=1).min() >= 5 and sums.counts.sum(axis=0).min() >= 5
    names, arrays = ES.sums_to_arrays(sums)
    # what leaves: per type and per batch a count and a P-vector, one P x P matrix; nothing
    # sized by cells and no sum over one (type, batch) group
    assert set(arrays) == {"counts", "type_sums", "batch_sums", "gram"}
    assert arrays["type_sums"].shape == (len(sums.types), P)
    assert arrays["batch_sums"].shape == (len(sums.batches), P)
    assert arrays["gram"].shape == (P, P)
    assert len(names) == len(sums.types) + len(sums.batches)
    with pytest.raises(ValueError, match="fewer than 500"):
        ES.sums_from_arrays(names, arrays, n_components=P, classes=types, floor=500)


def test_malformed_shares_are_refused():
    good = ES.moments_to_arrays(
        ES.ExpressionMoments(3, np.ones(4), np.eye(4)),
    )
    with pytest.raises(ValueError, match="shape"):
        ES.moments_from_arrays(good, n_genes=5)
    bad = {**good, "gram": np.triu(np.ones((4, 4)))}
    with pytest.raises(ValueError, match="symmetric"):
        ES.moments_from_arrays(bad, n_genes=4)
    with pytest.raises(ValueError, match="NaN"):
        ES.moments_from_arrays({**good, "total": np.full(4, np.nan)}, n_genes=4)
    with pytest.raises(ValueError, match="positive integers"):
        ES.moments_from_arrays({**good, "count": np.asarray([2.5])}, n_genes=4)
    arrays = {
        "counts": np.ones((1, 1)),
        "type_sums": np.zeros((1, 2)),
        "batch_sums": np.zeros((1, 2)),
        "gram": np.zeros((2, 2)),
    }
    names = ['["type", "ghost"]', '["batch", "b"]']
    with pytest.raises(ValueError, match="does not keep"):
        ES.sums_from_arrays(names, arrays, n_components=2, classes=["a"])
    with pytest.raises(ValueError, match="pair"):
        ES.sums_from_arrays(['"a"', '["batch", "b"]'], arrays, n_components=2, classes=["a"])
    names = ['["type", "a"]', '["batch", "b"]']
    with pytest.raises(ValueError, match="same cells"):
        ES.sums_from_arrays(
            names, {**arrays, "type_sums": np.ones((1, 2))}, n_components=2, classes=["a"]
        )
