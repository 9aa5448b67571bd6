"""Small scvi-tools models trained inside the tests (scvi-tools comes with the ``bench`` extra;
import this module only after ``pytest.importorskip("scvi")``)."""

from __future__ import annotations

import warnings

import scvi

from scarches_fl.simulate import simulate_counts

#: scvi-tools' defaults (batch norm, ZINB, covariates into every decoder layer, encoder blind to
#: the batch) and the scArches recipe (layer norm, covariates in the encoder too, NB,
#: gene-batch dispersion), both small.
ARCHITECTURES = {
    "scvi-defaults": {},
    "scarches-recipe": {
        "encode_covariates": True,
        "use_layer_norm": "both",
        "use_batch_norm": "none",
        "gene_likelihood": "nb",
        "dispersion": "gene-batch",
    },
    "first-layer-only": {
        "encode_covariates": True,
        "deeply_inject_covariates": False,
        "use_batch_norm": "encoder",
        "use_layer_norm": "decoder",
    },
}


def quiet() -> None:
    warnings.filterwarnings("ignore")
    scvi.settings.verbosity = 40
    scvi.settings.seed = 0


def reference_cells(n_cells: int = 360, seed: int = 0, n_batches: int = 3):
    """``n_batches`` studies (batch0, batch1, ...) of four cell types, 60 genes."""
    adata = simulate_counts(
        n_cells, n_genes=60, n_batches=n_batches, n_cell_types=4, seed=seed, mean_library=600.0
    )
    adata.obs["batch"] = adata.obs["batch"].astype(str)
    adata.obs["cell_type"] = adata.obs["cell_type"].astype(str)
    return adata


def train_scvi(adata, path, *, epochs: int = 3, **module_kw):
    quiet()
    a = adata.copy()
    scvi.model.SCVI.setup_anndata(a, batch_key="batch", labels_key="cell_type")
    model = scvi.model.SCVI(a, n_hidden=16, n_latent=4, n_layers=2, **module_kw)
    model.train(
        max_epochs=epochs,
        accelerator="cpu",
        enable_progress_bar=False,
        enable_model_summary=False,
        logger=False,
    )
    model.save(str(path), overwrite=True)
    return model


def train_scanvi(scvi_model, path, *, epochs: int = 3):
    quiet()
    model = scvi.model.SCANVI.from_scvi_model(scvi_model, unlabeled_category="Unknown")
    model.train(
        max_epochs=epochs,
        accelerator="cpu",
        enable_progress_bar=False,
        enable_model_summary=False,
        logger=False,
    )
    model.save(str(path), overwrite=True)
    return model
