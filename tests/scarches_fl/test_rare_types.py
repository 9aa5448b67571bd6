"""A cell type with fewer reference cells than the prototype floor (20) is still a candidate.

Constructed split: simulated counts, one type subsampled to 10-19 reference cells; the query has
all its cells. The reference is trained with labels, the query mapped by surgery, labels
transferred from the bundle's prototypes (the default without an atlas).
"""

from __future__ import annotations

import numpy as np
import pytest

from scarches_fl.labels import predict_labels
from scarches_fl.model import ReferenceModel
from scarches_fl.simulate import simulate_counts
from scarches_fl_cli.reference import describe_label_types

RARE = "type5"


@pytest.mark.parametrize("n_rare", [12])
def test_type_with_few_reference_cells_is_named_through_the_bundle(tmp_path, n_rare):
    adata = simulate_counts(1800, n_genes=200, n_batches=3, n_cell_types=6, seed=4)
    types = adata.obs["cell_type"].astype(str).to_numpy()
    is_ref = (adata.obs["batch"] != "batch2").to_numpy()
    rare_ref = np.flatnonzero(is_ref & (types == RARE))
    keep = is_ref.copy()
    keep[rare_ref[n_rare:]] = False
    ref, query = adata[keep].copy(), adata[~is_ref].copy()
    assert (ref.obs["cell_type"] == RARE).sum() == n_rare
    assert (query.obs["cell_type"] == RARE).sum() >= 20

    model = ReferenceModel.train_reference(
        ref, batch_key="batch", label_key="cell_type", max_epochs=40, seed=0, progress=False
    )
    model.save(tmp_path / "bundle")
    loaded = ReferenceModel.from_bundle(tmp_path / "bundle")
    proto = loaded.labels["levels"]["cell_type"]["prototype"]
    # the manifest lists every type with its reference cell count
    assert proto["type_cell_counts"][RARE] == n_rare
    assert proto["few_cell_types"] == {RARE: n_rare}
    assert sum(proto["type_cell_counts"].values()) == ref.n_obs
    text = describe_label_types(loaded.labels)
    assert f"{RARE} {n_rare} (few cells)" in text

    res = loaded.surgery(
        query, batch_key="batch", namespace="site1", max_epochs=40, seed=0, progress=False
    )
    pred = predict_labels(
        loaded.labels, loaded.extra_tensors, res.latent, label_key="cell_type", method="prototype"
    )
    truth = query.obs["cell_type"].astype(str).to_numpy()
    rare = truth == RARE
    # the bundle names the rare type: it is the top label of most of its query cells (it was
    # never a candidate before), and it does not take the other types' cells
    assert np.mean(pred.top_label[rare] == RARE) > 0.8
    assert np.mean(pred.top_label[~rare] == truth[~rare]) > 0.9
    # its uncertainty is above the common types': the reference saw 12 cells of it. (On this
    # split most of them stay above the 0.5 threshold -- called "Unknown" as read -- because
    # the query's cells of the type lie farther from the 12-cell prototype than the
    # reference's own tail; docs/benchmarks.md, "Labels under shift: first measurements".)
    assert np.median(pred.uncertainty[rare]) > np.median(pred.uncertainty[~rare])
