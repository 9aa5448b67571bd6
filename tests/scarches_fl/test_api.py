"""The Python API (``scarches_fl.Reference``, ``scarches_fl.evaluate``): it writes what the CLI
writes, checks a query before any training, reads the registered layer, and imports without
torch."""

from __future__ import annotations

import subprocess
import sys
import warnings
from pathlib import Path

import anndata as ad
import numpy as np
import pytest
import scipy.sparse as sp

import scarches_fl
from scarches_fl.data import DataError
from scarches_fl.model import ReferenceModel
from scarches_fl_cli.main import main

REF_BATCHES = ["indrop1", "indrop2", "indrop3", "indrop4", "celseq", "fluidigmc1"]
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def data(shared_data: Path) -> tuple[ad.AnnData, ad.AnnData]:
    full = ad.read_h5ad(shared_data / "panc8_sub_nebula.h5ad")
    ref = full[full.obs["batch"].isin(REF_BATCHES)].copy()
    query = full[full.obs["batch"].isin(["celseq2", "smartseq2"])].copy()
    return ref, query


@pytest.fixture(scope="module")
def bundle(data, tmp_path_factory: pytest.TempPathFactory) -> Path:
    ref, _ = data
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reference = scarches_fl.Reference.train(
            ref, batch_key="batch", label_key="cell_type", n_hidden=32, n_latent=8, max_epochs=3
        )
    out = tmp_path_factory.mktemp("api") / "ref"
    assert reference.save(out) == out
    return out


def test_map_writes_what_the_cli_writes(bundle, data, tmp_path):
    _, query = data
    query.write_h5ad(tmp_path / "q.h5ad")
    rc = main(
        [
            "-q",
            "map",
            "--reference",
            str(bundle),
            "--data",
            str(tmp_path / "q.h5ad"),
            "--batch-key",
            "batch",
            "--label-key",
            "cell_type",
            "--max-epochs",
            "2",
            "--no-progress",
            "--out",
            str(tmp_path / "cli.h5ad"),
        ]
    )
    assert rc == 0
    cli = ad.read_h5ad(tmp_path / "cli.h5ad")

    q = query.copy()
    ref = scarches_fl.Reference.load(bundle)
    mapped = ref.map(q, batch_key="batch", label_key="cell_type", max_epochs=2)
    # equal up to float rounding: torch may use another number of threads (chosen from the
    # machine's load) for one run than for the other
    np.testing.assert_allclose(q.obsm["X_scarches"], cli.obsm["X_scarches"], atol=1e-5)
    np.testing.assert_array_equal(q.obs["cell_type_pred"], cli.obs["cell_type_pred"])
    np.testing.assert_allclose(
        q.obs["cell_type_uncertainty"], cli.obs["cell_type_uncertainty"], atol=1e-5
    )
    assert set(q.uns["scarches_fl"]) == set(cli.uns["scarches_fl"])
    for key, value in q.uns["scarches_fl"].items():
        if not isinstance(value, dict):
            assert np.asarray(value).tolist() == np.asarray(cli.uns["scarches_fl"][key]).tolist()
    assert mapped.new_conditions == ["query/celseq2", "query/smartseq2"]
    # the reference it was called on is unchanged; the grown one holds the new conditions
    assert ref.conditions == [f"ref/{b}" for b in sorted(REF_BATCHES)]
    assert mapped.reference.conditions == ref.conditions + mapped.new_conditions
    assert q.uns["scarches_fl"]["model_digest"] == mapped.reference.digest != ref.digest


def test_mapping_again_embeds_with_the_existing_conditions(bundle, data):
    _, query = data
    first = query.copy()
    grown = scarches_fl.Reference.load(bundle).map(first, batch_key="batch", max_epochs=1).reference
    again = query.copy()
    mapped = grown.map(again, batch_key="batch")
    assert mapped.new_conditions == [] and mapped.diff == {} and mapped.epochs == 0
    assert any("already in the reference" in n for n in mapped.notes)
    np.testing.assert_allclose(again.obsm["X_scarches"], first.obsm["X_scarches"], atol=1e-5)
    np.testing.assert_allclose(
        grown.get_latent(query, namespace="query"), first.obsm["X_scarches"], atol=1e-5
    )
    # a mix of known and new batches is refused, naming the run that contributes the new ones
    mixed = query.copy()
    mixed.obs["batch"] = mixed.obs["batch"].astype(str).replace({"smartseq2": "smartseq3"})
    with pytest.raises(DataError, match="--batches smartseq3"):
        grown.map(mixed, batch_key="batch")


def test_refusals_come_before_any_training(bundle, data, tmp_path, monkeypatch):
    ref_data, query = data
    ref = scarches_fl.Reference.load(bundle)

    def refuse(*_a, **_k):
        raise AssertionError("training started before the inputs were checked")

    monkeypatch.setattr(ReferenceModel, "surgery", refuse)
    monkeypatch.setattr(ReferenceModel, "train_reference", refuse)
    q = query.copy()
    with pytest.raises(DataError, match="'study' is not a column of obs"):
        ref.map(q, batch_key="study")
    with pytest.raises(DataError, match="not a label level of the reference"):
        ref.map(q, batch_key="batch", label_key="tissue")
    q.X = sp.csr_matrix(np.log1p(q.X.toarray()))
    with pytest.raises(DataError, match="raw counts"):
        ref.map(q, batch_key="batch")
    assert "X_scarches" not in q.obsm
    with pytest.raises(DataError, match="label key 'celltype' not found in adata.obs"):
        scarches_fl.Reference.train(ref_data, batch_key="batch", label_key="celltype")
    with pytest.raises(DataError, match="already exists"):
        ref.save(bundle)
    with pytest.raises(DataError, match="not a reference bundle"):
        scarches_fl.Reference.load(tmp_path)


def test_get_latent_reads_the_registered_layer(data):
    ref_data, _ = data
    cells = ref_data[ref_data.obs["batch"].isin(["indrop1", "celseq"])].copy()
    cells.layers["counts"] = cells.X.copy()
    cells.X = sp.csr_matrix(np.log1p(cells.X.toarray()))  # X normalised, counts in a layer
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = scarches_fl.Reference.train(
            cells, batch_key="batch", layer="counts", n_hidden=16, n_latent=4, max_epochs=1
        )
    assert ref.registration["layer"] == "counts"
    z = ref.get_latent(cells)
    np.testing.assert_array_equal(z, ref.get_latent(cells, layer="counts", batch_key="batch"))
    with pytest.raises(DataError, match="X contains non-integer values"):
        ref.get_latent(cells, layer=None)  # X, which holds no counts
    with pytest.raises(DataError, match="X contains non-integer values"):
        ref.model.get_latent(cells, layer=None)


def test_evaluate_returns_the_cli_metrics(bundle, data, tmp_path):
    ref_data, query = data
    q = query.copy()
    ref = scarches_fl.Reference.load(bundle)
    ref.map(q, batch_key="batch", label_key="cell_type", max_epochs=1)
    metrics = scarches_fl.evaluate(
        q, batch_key="batch", label_key="cell_type", reference=ref, reference_data=ref_data
    )
    assert metrics["n_reference_cells"] == ref_data.n_obs and "plots" not in metrics
    lt = metrics["label_transfer"]
    expected = np.mean(q.obs["cell_type_pred"].astype(str) == q.obs["cell_type"].astype(str))
    assert lt["accuracy"] == pytest.approx(expected)
    q.write_h5ad(tmp_path / "mapped.h5ad")
    ref_data.write_h5ad(tmp_path / "ref.h5ad")
    rc = main(
        [
            "-q",
            "evaluate",
            "--data",
            str(tmp_path / "mapped.h5ad"),
            "--batch-key",
            "batch",
            "--label-key",
            "cell_type",
            "--reference",
            str(bundle),
            "--reference-data",
            str(tmp_path / "ref.h5ad"),
            "--embedding",
            "pca",
            "--report",
            str(tmp_path / "r"),
        ]
    )
    assert rc == 0
    import json

    on_disk = json.loads((tmp_path / "r" / "metrics.json").read_text())
    assert on_disk["label_transfer"]["accuracy"] == pytest.approx(lt["accuracy"])
    assert on_disk["integration"]["ebm_reference_vs_query"] == pytest.approx(
        metrics["integration"]["ebm_reference_vs_query"]
    )


_NO_MODEL_EXTRA = """
import sys
for name in ("torch", "anndata", "scipy"):
    sys.modules[name] = None  # as in the auditor's base install
import scarches_fl
assert scarches_fl.__version__ and "Reference" in dir(scarches_fl)
from scarches_fl._extras import MissingExtraError
try:
    scarches_fl.Reference
except MissingExtraError as exc:
    print(exc)
else:
    raise SystemExit("Reference imported without the model extra")
"""


def test_import_scarches_fl_needs_no_model_extra():
    res = subprocess.run(
        [sys.executable, "-c", _NO_MODEL_EXTRA],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert res.returncode == 0, res.stdout + res.stderr
    assert "'model' extra" in res.stdout and "pip install -c constraints.txt '.[model]'" in (
        res.stdout
    )
