"""Label transfer benchmark: scarches-fl vs scvi-tools' scArches surgery, same splits, same metrics.

Scenarios (all on the shared real datasets):

* ``panc8``: reference = indrop1-4 + celseq + fluidigmc1, query = celseq2 + smartseq2.
* ``panc8_holdout_alpha`` (and ``_ductal``, ``_acinar``): the same, with one type removed from the
  reference; scores how well the uncertainty flags the query's cells of that type (AUROC) and
  how many are called "Unknown", with and without the opt-in ``query_context``.
* ``cellbench``: CellBench 3 cell lines; reference = 10x + CEL-seq2, query = Drop-seq.
* ``cellbench5_holdout_h838`` (and ``_a549``): CellBench 5 cell lines over all 27,660 genes;
  reference = CEL-seq2 3-line plate + 5-line plates 1-2 without that line, query = 5-line plate
  3 + Drop-seq. A held-out type whose expression differs from every reference type in the
  file's genes (``bench_holdout_signal.py`` measures how much each held-out split allows).
* ``shift_none``, ``shift_moderate``, ``shift_strong``: simulated counts
  (:func:`scarches_fl.simulate.simulate_counts`, 6 batches, 8 types, 1,000 genes): reference =
  control batches 0-3, query = batches 4-5 carrying a condition shift (one response program
  shared by every type) at strength 0, 1 and 2 (typical |log fold change| of a response gene).

Methods:

* ``scarches_fl``: ``ReferenceModel.train_reference`` on the reference, ``.surgery`` on the query
  (condition columns only), label transfer with :func:`scarches_fl.labels.predict_labels`
  (weighted kNN on the reference latent atlas, and prototypes).
* ``scvi_surgery``: ``scvi.model.SCVI`` (2 x 128 hidden, latent 10, NB, layer norm and covariate
  encoding as scvi-tools recommends for scArches), ``SCVI.load_query_data`` + training only the
  new weights, then the same label transfer and metrics code on its latent.
* ``scanvi_surgery``: the peer a biologist picks for label transfer. ``SCANVI.from_scvi_model``
  on the same SCVI reference with the reference's labels, trained; then
  ``SCANVI.load_query_data`` with every query cell unlabelled, trained (new weights only), and
  ``predict()`` (its labels: it never answers "Unknown"); its latent is also scored with our
  label transfer code.
* ``no_integration``: the floor every integration must clear: ``normalize_total`` 1e4 +
  ``log1p``, PCA 50 fitted on the reference cells, logistic regression; no batch correction.

Accuracy is reported as a user reads ``obs["<label>_pred"]`` (``accuracy_with_unknown``:
"Unknown" counted wrong) beside the top label's, with the share of query cells of types the
reference knows that are called "Unknown" (``known_fraction_called_unknown``).

Run: ``python benchmarks/bench_labels.py --scenario all`` (one seed: about 10 min on 2 CPU cores
for the 1,000-gene sets, plus about 20 min per 27,660-gene ``cellbench5_*`` split).
Writes ``benchmarks/results/labels_<scenario>.json`` and prints a side-by-side table.
``--skip-scanvi`` / ``--skip-scvi`` leave out scvi-tools' methods (``--skip-scvi`` both).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from scarches_fl import metrics as M  # noqa: E402
from scarches_fl.labels import build_label_knowledge, predict_labels  # noqa: E402

logger = logging.getLogger("bench_labels")

SCENARIOS = {
    "panc8": {
        "file": "panc8_sub_nebula.h5ad",
        "reference": ["indrop1", "indrop2", "indrop3", "indrop4", "celseq", "fluidigmc1"],
        "holdout": None,
    },
    "panc8_holdout_alpha": {
        "file": "panc8_sub_nebula.h5ad",
        "reference": ["indrop1", "indrop2", "indrop3", "indrop4", "celseq", "fluidigmc1"],
        "holdout": "alpha",
    },
    # second and third held-out types: same settings, checks that what helps alpha generalises
    "panc8_holdout_ductal": {
        "file": "panc8_sub_nebula.h5ad",
        "reference": ["indrop1", "indrop2", "indrop3", "indrop4", "celseq", "fluidigmc1"],
        "holdout": "ductal",
    },
    "panc8_holdout_acinar": {
        "file": "panc8_sub_nebula.h5ad",
        "reference": ["indrop1", "indrop2", "indrop3", "indrop4", "celseq", "fluidigmc1"],
        "holdout": "acinar",
    },
    # issue 22's rare-type check: panc8 with the reference's 23 gamma cells cut to 15 (a
    # seeded subsample); the query keeps its 20
    "panc8_gamma15": {
        "file": "panc8_sub_nebula.h5ad",
        "reference": ["indrop1", "indrop2", "indrop3", "indrop4", "celseq", "fluidigmc1"],
        "holdout": None,
        "subsample": {"gamma": 15},
    },
    "cellbench": {
        "file": "cellbench_3tech_hvg.h5ad",
        "reference": ["10x_3cl", "CELseq2_3cl"],
        "holdout": None,
    },
    # a held-out type that differs from the reference's types in the data's own genes: the
    # 5-cell-line CellBench set over its full 27,660 genes; H838 (or A549) removed from the
    # reference, query = the third 5-line plate + Drop-seq
    # the same 5-line split with every line in the reference (issue 22's "CellBench 5-line")
    "cellbench5": {
        "file": "cellbench_celllines.h5ad",
        "reference": ["CELseq2_3cl", "CELseq2_5cl_p1", "CELseq2_5cl_p2"],
        "holdout": None,
    },
    "cellbench5_holdout_h838": {
        "file": "cellbench_celllines.h5ad",
        "reference": ["CELseq2_3cl", "CELseq2_5cl_p1", "CELseq2_5cl_p2"],
        "holdout": "H838",
    },
    "cellbench5_holdout_a549": {
        "file": "cellbench_celllines.h5ad",
        "reference": ["CELseq2_3cl", "CELseq2_5cl_p1", "CELseq2_5cl_p2"],
        "holdout": "A549",
    },
}
# simulated condition shift: control reference -> shifted query (typical |log fold change| of a
# response gene: 0 none, 1 moderate, 2 strong); the data are the same for every benchmark seed
_SHIFT_DATA = {
    "n_cells": 2000,
    "n_genes": 1000,
    "n_batches": 6,
    "n_cell_types": 8,
    "seed": 0,
    "program_genes": 40,
    "program_fold": 3.0,
    "shift_batches": (4, 5),
    "shift_genes": 150,
}
for _name, _strength in (("none", 0.0), ("moderate", 1.0), ("strong", 2.0)):
    SCENARIOS[f"shift_{_name}"] = {
        "file": None,
        "simulate": {**_SHIFT_DATA, "shift_strength": _strength},
        "reference": ["batch0", "batch1", "batch2", "batch3"],
        "holdout": None,
    }
BATCH, LABEL = "batch", "cell_type"
#: where scvi-tools trains (``--scvi-accelerator``): "cpu" (default, one thread, as on the
#: standard machine) or "gpu" (accuracy figures only; its speed is then not comparable)
SCVI_ACCELERATOR = "cpu"
# (method, query_context): the per-cell uncertainty, and the opt-in query context
VARIANTS = [("knn", False), ("prototype", False), ("knn", True), ("prototype", True)]


def shared_data_dir() -> Path:
    for cand in (os.environ.get("SCARCHES_FL_SHARED"), ROOT.parent / "shared", ROOT / "shared"):
        if cand and (Path(cand) / "data").is_dir():
            return Path(cand) / "data"
    raise SystemExit("shared/data not found beside the checkout; set SCARCHES_FL_SHARED")


def split(scenario: str):
    import anndata as ad

    spec = SCENARIOS[scenario]
    if spec.get("simulate"):
        from scarches_fl.simulate import simulate_counts

        adata = simulate_counts(**spec["simulate"])
    else:
        adata = ad.read_h5ad(shared_data_dir() / spec["file"])
    adata.obs[BATCH] = adata.obs[BATCH].astype(str)
    adata.obs[LABEL] = adata.obs[LABEL].astype(str)
    is_ref = adata.obs[BATCH].isin(spec["reference"]).to_numpy()
    ref_mask = is_ref.copy()
    if spec["holdout"]:
        ref_mask &= (adata.obs[LABEL] != spec["holdout"]).to_numpy()
    for cell_type, n_keep in spec.get("subsample", {}).items():
        rows = np.flatnonzero(ref_mask & (adata.obs[LABEL] == cell_type).to_numpy())
        drop = np.random.default_rng(0).permutation(rows)[n_keep:]
        ref_mask[drop] = False
    ref = adata[ref_mask].copy()
    query = adata[~is_ref].copy()
    return ref, query


def label_figures(truth: np.ndarray, pred: np.ndarray, top_label: np.ndarray, ref) -> dict:
    """The figures every method gets: accuracy as a user reads ``pred`` ("Unknown" wrong), the
    top label's, macro F1, and the share of query cells of a type the reference has that are
    called "Unknown"."""
    known = np.isin(truth, np.unique(ref.obs[LABEL].to_numpy().astype(str)))
    called_unknown = pred == "Unknown"
    return {
        "accuracy_top_label": M.label_accuracy(truth, top_label),
        "accuracy_with_unknown": M.label_accuracy(truth, pred),
        "macro_f1_top_label": M.macro_f1(truth, top_label),
        "fraction_unknown": float(np.mean(called_unknown)),
        "known_fraction_called_unknown": (
            float(np.mean(called_unknown[known])) if known.any() else float("nan")
        ),
    }


def score(ref_latent, query_latent, ref, query, *, holdout, seed=0) -> dict:
    """Label transfer (kNN on the reference atlas and prototypes) and metrics, one code path."""
    out: dict = {}
    knowledge, atlas = build_label_knowledge(
        ref_latent, {LABEL: ref.obs[LABEL].to_numpy()}, include_atlas=True, seed=seed
    )
    truth = query.obs[LABEL].to_numpy().astype(str)
    for method, query_context in VARIANTS:
        pred = predict_labels(
            knowledge,
            atlas,
            query_latent,
            label_key=LABEL,
            method=method,
            query_context=query_context,
        )
        res = {
            **label_figures(truth, pred.pred.astype(str), pred.top_label.astype(str), ref),
            # "Unknown" right only for the query types the bundle cannot name (absent, or below
            # the prototype minimum of 20 reference cells)
            "accuracy_open_set": M.open_set_accuracy(
                truth, pred.pred, knowledge["levels"][LABEL]["prototype"]["classes"]
            ),
        }
        if holdout:
            novel = truth == holdout
            res["novel_type"] = holdout
            res["novel_auroc"] = M.unknown_detection_auroc(pred.uncertainty, novel)
            res["novel_fraction_called_unknown"] = float(np.mean(pred.pred[novel] == "Unknown"))
            res["known_fraction_called_unknown"] = float(np.mean(pred.pred[~novel] == "Unknown"))
            res["accuracy_known_types_top_label"] = M.label_accuracy(
                truth[~novel], pred.top_label[~novel]
            )
        else:
            # scArches' plain uncertainty (1 - p_top) for reference
            plain = predict_labels(
                knowledge, atlas, query_latent, label_key=LABEL, method=method, novelty=False
            )
            res["accuracy_with_unknown_plain_scarches_uncertainty"] = M.label_accuracy(
                truth, plain.pred
            )
        out[method + ("_query_context" if query_context else "")] = res
    z = np.concatenate([ref_latent, query_latent])
    batches = np.concatenate([ref.obs[BATCH].to_numpy(), query.obs[BATCH].to_numpy()]).astype(str)
    labels = np.concatenate([ref.obs[LABEL].to_numpy(), truth]).astype(str)
    is_query = np.r_[np.zeros(len(ref), bool), np.ones(len(query), bool)]
    out["integration"] = M.integration_metrics(z, batches, labels, seed=seed)
    out["integration"]["ebm_reference_vs_query"] = M.entropy_of_batch_mixing(
        z, np.where(is_query, "query", "reference"), seed=seed
    )
    return out


def _cache_dir(cache: Path, scenario: str, seed: int, settings: dict) -> Path:
    """Where ``--model-cache`` keeps one trained and mapped model: the scenario, the seed and a
    digest of the training settings name it, so a changed setting never reads a stale model."""
    import hashlib

    key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]
    return cache / f"{scenario}_seed{seed}_{key}"


def _refit_expression_prototypes(mapped, ref, *, seed: int) -> None:
    """Fit the expression prototypes of a cached model again with this checkout's code (as
    ``reference train`` does, on the reference cells and the model's genes): they take
    seconds, and a benchmark of label rules must measure the current fit, not the one the
    cache was written with. The trained weights, the latents and the latent prototypes are the
    cache's."""
    from scarches_fl.data import register
    from scarches_fl.model import _add_expression_prototypes

    reg = register(
        ref[:, mapped.genes].copy(),
        batch_key=BATCH,
        namespace="ref",
        likelihood=mapped.hyperparameters.get("likelihood", "nb"),
        label_key=LABEL,
    )
    _add_expression_prototypes(mapped, reg, LABEL, seed=seed)


def run_scarches_fl(
    ref,
    query,
    *,
    seed: int,
    max_epochs: int | None,
    surgery_epochs: int | None,
    model_kwargs: dict,
    cache: Path | None = None,
    scenario: str = "",
) -> tuple[np.ndarray, np.ndarray, dict]:
    """Train our reference, map the query; returns (reference latent, query latent, run info,
    the mapped model). With ``cache``, a model mapped earlier with the same scenario, seed and
    settings is read from there instead of trained (the label rules are scored afresh on it);
    the run info is the training run's."""
    from scarches_fl.model import ReferenceModel

    where = None
    if cache is not None:
        settings = {
            "max_epochs": max_epochs,
            "surgery_epochs": surgery_epochs,
            "model_kwargs": model_kwargs,
        }
        where = _cache_dir(cache, scenario, seed, settings)
        if (where / "latents.npz").is_file():
            with np.load(where / "latents.npz", allow_pickle=False) as z:  # never pickle
                zr, zq = z["reference"], z["query"]
            info = json.loads((where / "run.json").read_text())
            info["read_from_model_cache"] = str(where)
            mapped = ReferenceModel.from_bundle(where / "mapped")
            _refit_expression_prototypes(mapped, ref, seed=seed)
            return zr, zq, info, mapped
    t0 = time.perf_counter()
    model = ReferenceModel.train_reference(
        ref,
        batch_key=BATCH,
        label_key=LABEL,
        max_epochs=max_epochs,
        seed=seed,
        progress=False,
        **model_kwargs,
    )
    t1 = time.perf_counter()
    res = model.surgery(
        query,
        batch_key=BATCH,
        namespace="site1",
        max_epochs=surgery_epochs,
        seed=seed,
        progress=False,
    )
    t2 = time.perf_counter()
    ref_latent = res.model.get_latent(ref, batch_key=BATCH, namespace="ref")
    info = {
        "reference_train_s": t1 - t0,
        "reference_epochs": int(model.history.get("epochs", 0)),
        "reference_seconds_per_epoch": model.history.get("seconds_per_epoch"),
        "surgery_s": t2 - t1,
        "trainable_parameters_surgery": int(res.trainable_parameters),
        "hyperparameters": model.hyperparameters,
        "n_genes": len(model.genes),
    }
    if where is not None:
        where.mkdir(parents=True, exist_ok=True)
        res.model.save(where / "mapped")
        np.savez(where / "latents.npz", reference=ref_latent, query=res.latent)
        (where / "run.json").write_text(json.dumps(info, indent=2, sort_keys=True, default=str))
    return np.asarray(ref_latent), np.asarray(res.latent), info, res.model


#: ADR 0070's expression rule, before ADR 0071 (kept in the JSON as ``expression_adr0070``)
ADR0070_RULE = {
    "latent_novelty": False,
    "unknown": "uncertain",
    "balanced_head": False,
    "shrink": 0.0,
}
#: ADR 0072's rule, before ADR 0073 split the novelty tail between the two spaces (kept in the
#: JSON as ``expression_adr0072``)
ADR0072_RULE = {"split_tail": False}


def score_expression(
    mapped_model, query_latent, ref, query, *, holdout, options: dict | None = None
) -> dict:
    """What ``map`` writes by default: expression prototypes with a per-batch offset
    (``scarches_fl.refine.transfer_labels``, ADRs 0070-0073; ``options``: another rule, e.g.
    :data:`ADR0070_RULE`), and how it names the types the reference has fewer than 20 cells
    of."""
    from scarches_fl.refine import transfer_labels

    pred = transfer_labels(
        mapped_model,
        query,
        query_latent,
        label_key=LABEL,
        batch_key=BATCH,
        method="expression",
        expression_options=options,
    )
    truth = query.obs[LABEL].to_numpy().astype(str)
    out = label_figures(truth, pred.pred.astype(str), pred.top_label.astype(str), ref)
    counts = ref.obs[LABEL].astype(str).value_counts()
    out["few_cell_types"] = {
        t: {
            "reference_cells": int(counts[t]),
            "query_cells": int((truth == t).sum()),
            "named": float(np.mean(pred.pred[truth == t] == t)),
            "top_label": float(np.mean(pred.top_label[truth == t] == t)),
        }
        for t in counts.index
        if counts[t] < 20 and (truth == t).any()
    }
    if holdout:
        novel = truth == holdout
        out["novel_type"] = holdout
        out["novel_auroc"] = M.unknown_detection_auroc(pred.uncertainty, novel)
        out["novel_fraction_called_unknown"] = float(np.mean(pred.pred[novel] == "Unknown"))
        out["known_fraction_called_unknown"] = float(np.mean(pred.pred[~novel] == "Unknown"))
        out["accuracy_known_types_top_label"] = M.label_accuracy(
            truth[~novel], pred.top_label[~novel]
        )
    return out


def _train_scvi_reference(ref, *, seed: int, n_latent: int):
    """scvi-tools' SCVI reference with the settings it recommends for scArches surgery."""
    import scvi

    scvi.settings.seed = seed
    ref_reg = ref.copy()
    scvi.model.SCVI.setup_anndata(ref_reg, batch_key=BATCH)
    model = scvi.model.SCVI(
        ref_reg,
        n_hidden=128,
        n_layers=2,
        n_latent=n_latent,
        gene_likelihood="nb",
        # scvi-tools' recommended settings for scArches-style surgery
        encode_covariates=True,
        deeply_inject_covariates=False,
        use_layer_norm="both",
        use_batch_norm="none",
    )
    model.train(accelerator=SCVI_ACCELERATOR, enable_progress_bar=False)
    return model


_SCVI_SETTINGS = (
    "SCVI(n_hidden=128, n_layers=2, n_latent={n_latent}, gene_likelihood='nb', "
    "encode_covariates=True, deeply_inject_covariates=False, use_layer_norm='both', "
    "use_batch_norm='none')"
)


def run_scvi(ref, query, *, seed: int, reference, reference_s: float):
    """SCVI surgery on the trained SCVI ``reference``: the query's new weights only."""
    import scvi

    scvi.settings.seed = seed
    t1 = time.perf_counter()
    qmodel = scvi.model.SCVI.load_query_data(
        _unlabelled(query), reference, freeze_dropout=True, accelerator=SCVI_ACCELERATOR
    )
    n_trainable = sum(p.numel() for p in qmodel.module.parameters() if p.requires_grad)
    q_epochs = 200
    qmodel.train(
        max_epochs=q_epochs,
        plan_kwargs={"weight_decay": 0.0},
        accelerator=SCVI_ACCELERATOR,
        enable_progress_bar=False,
    )
    t2 = time.perf_counter()
    # both embedded by the surgically extended model (its batch categories include the reference's)
    ref_latent = qmodel.get_latent_representation(_unlabelled(ref))
    q_latent = qmodel.get_latent_representation(qmodel.adata)
    info = {
        "reference_train_s": reference_s,
        "surgery_s": t2 - t1,
        "max_epochs_reference": int(reference.history["elbo_train"].shape[0]),
        "max_epochs_query": q_epochs,
        "trainable_parameters_surgery (requires_grad; scvi masks frozen rows by gradient hooks)": (
            int(n_trainable)
        ),
        "settings": _SCVI_SETTINGS.format(n_latent=reference.module.n_latent)
        + "; SCVI.load_query_data(freeze_dropout=True); train(plan_kwargs={'weight_decay': 0.0})",
    }
    return np.asarray(ref_latent), np.asarray(q_latent), info


# label of unlabelled cells for scvi-tools (scANVI's unlabeled_category); no real type is named so
SCVI_UNLABELLED = "Unknown"
SCANVI_REFERENCE_EPOCHS = 20  # scvi-tools' scArches tutorial: 20 epochs from the SCVI weights
SCANVI_QUERY_EPOCHS = 100


def _unlabelled(adata):
    """A copy with every label set to the unlabelled category (query cells carry no labels)."""
    out = adata.copy()
    out.obs[LABEL] = SCVI_UNLABELLED
    return out


def run_scanvi(ref, query, *, seed: int, reference, reference_s: float):
    """scANVI surgery: ``SCANVI.from_scvi_model`` on the SCVI reference with the reference
    labels, trained; ``load_query_data`` with every query cell unlabelled, trained (new weights
    only); ``predict()``. Returns the two latents, the predicted query labels and run info."""
    import scvi

    scvi.settings.seed = seed
    t0 = time.perf_counter()
    # the SCVI reference's AnnData still carries the reference labels in obs[LABEL]
    scanvi = scvi.model.SCANVI.from_scvi_model(
        reference, unlabeled_category=SCVI_UNLABELLED, labels_key=LABEL
    )
    scanvi.train(
        max_epochs=SCANVI_REFERENCE_EPOCHS,
        n_samples_per_label=100,
        accelerator=SCVI_ACCELERATOR,
        enable_progress_bar=False,
    )
    t1 = time.perf_counter()
    qmodel = scvi.model.SCANVI.load_query_data(
        _unlabelled(query), scanvi, freeze_dropout=True, accelerator=SCVI_ACCELERATOR
    )
    qmodel.train(
        max_epochs=SCANVI_QUERY_EPOCHS,
        plan_kwargs={"weight_decay": 0.0},
        accelerator=SCVI_ACCELERATOR,
        enable_progress_bar=False,
    )
    t2 = time.perf_counter()
    pred = np.asarray(qmodel.predict(), dtype=str)
    ref_latent = qmodel.get_latent_representation(_unlabelled(ref))
    q_latent = qmodel.get_latent_representation(qmodel.adata)
    info = {
        "reference_train_s": reference_s + (t1 - t0),
        "surgery_s": t2 - t1,
        "settings": _SCVI_SETTINGS.format(n_latent=reference.module.n_latent)
        + f"; SCANVI.from_scvi_model(unlabeled_category={SCVI_UNLABELLED!r}), "
        f"train(max_epochs={SCANVI_REFERENCE_EPOCHS}, n_samples_per_label=100); "
        "SCANVI.load_query_data(query with every label unlabelled, freeze_dropout=True), "
        f"train(max_epochs={SCANVI_QUERY_EPOCHS}, plan_kwargs={{'weight_decay': 0.0}}); "
        "predict()",
    }
    return np.asarray(ref_latent), np.asarray(q_latent), pred, info


def no_integration_floor(ref, query, *, seed: int) -> tuple[np.ndarray, dict]:
    """The floor every integration must clear: ``normalize_total`` 1e4 + ``log1p`` per cell,
    PCA (50 components) fitted on the reference cells, logistic regression on the reference
    labels; the query (on the reference's genes) goes through the same transform."""
    import scipy.sparse as sp
    from sklearn.decomposition import PCA
    from sklearn.linear_model import LogisticRegression

    if list(query.var_names) != list(ref.var_names):
        query = query[:, ref.var_names]

    def lognorm(adata) -> np.ndarray:
        x = adata.X.toarray() if sp.issparse(adata.X) else np.asarray(adata.X)
        x = x.astype(np.float64)
        total = x.sum(axis=1, keepdims=True)
        return np.log1p(x / np.maximum(total, 1e-12) * 1e4)

    t0 = time.perf_counter()
    xr = lognorm(ref)
    n_comp = int(min(50, xr.shape[0] - 1, xr.shape[1]))
    pca = PCA(n_components=n_comp, random_state=seed).fit(xr)
    clf = LogisticRegression(max_iter=2000).fit(pca.transform(xr), ref.obs[LABEL].astype(str))
    pred = np.asarray(clf.predict(pca.transform(lognorm(query))), dtype=str)
    info = {
        "fit_and_predict_s": time.perf_counter() - t0,
        "settings": f"normalize_total 1e4 + log1p; PCA({n_comp}) fitted on reference cells; "
        "sklearn LogisticRegression(max_iter=2000)",
    }
    return pred, info


def _environment() -> dict:
    import subprocess

    import torch

    try:
        commit = subprocess.run(
            ["git", "-C", str(ROOT), "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        ).stdout.strip()
    except OSError:
        commit = ""
    info = {
        "git_commit": commit,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
    }
    try:
        import scvi

        info["scvi_tools"] = scvi.__version__
    except ImportError:
        pass
    return info


def run_scenario(
    scenario: str,
    *,
    seed: int,
    skip_scvi: bool,
    skip_scanvi: bool = False,
    model_kwargs: dict,
    max_epochs: int | None,
    surgery_epochs: int | None,
    model_cache: Path | None = None,
) -> dict:
    ref, query = split(scenario)
    holdout = SCENARIOS[scenario]["holdout"]
    result: dict = {
        "scenario": scenario,
        "dataset": SCENARIOS[scenario]["file"],
        "reference_batches": SCENARIOS[scenario]["reference"],
        "query_batches": sorted(set(query.obs[BATCH])),
        "held_out_type": holdout,
        "n_reference_cells": int(ref.n_obs),
        "n_query_cells": int(query.n_obs),
        "seed": seed,
        "label_transfer_code": (
            "scarches_fl.labels.predict_labels (k=15, threshold 0.5; *_query_context: "
            "query_context=True, context_k=30, context_floor=0.05)"
        ),
        "metrics_code": "scarches_fl.metrics",
        "environment": _environment(),
        "methods": {},
    }
    logger.info("%s: scarches-fl", scenario)
    zr, zq, info, mapped = run_scarches_fl(
        ref,
        query,
        seed=seed,
        max_epochs=max_epochs,
        surgery_epochs=surgery_epochs,
        model_kwargs=model_kwargs,
        cache=model_cache,
        scenario=scenario,
    )
    result["methods"]["scarches_fl"] = {
        "run": info,
        "expression": score_expression(mapped, zq, ref, query, holdout=holdout),
        "expression_adr0070": score_expression(
            mapped, zq, ref, query, holdout=holdout, options=ADR0070_RULE
        ),
        "expression_adr0072": score_expression(
            mapped, zq, ref, query, holdout=holdout, options=ADR0072_RULE
        ),
        **score(zr, zq, ref, query, holdout=holdout, seed=seed),
    }
    truth = query.obs[LABEL].to_numpy().astype(str)
    logger.info("%s: no-integration floor", scenario)
    pred, info = no_integration_floor(ref, query, seed=seed)
    result["methods"]["no_integration"] = {
        "run": info,
        "classifier": label_figures(truth, pred, pred, ref),
    }
    if not skip_scvi:
        logger.info("%s: scvi-tools SCVI reference", scenario)
        t0 = time.perf_counter()
        scvi_ref = _train_scvi_reference(
            ref, seed=seed, n_latent=int(model_kwargs.get("n_latent", 10))
        )
        reference_s = time.perf_counter() - t0
        logger.info("%s: scvi-tools SCVI surgery", scenario)
        zr, zq, info = run_scvi(ref, query, seed=seed, reference=scvi_ref, reference_s=reference_s)
        result["methods"]["scvi_surgery"] = {
            "run": info,
            **score(zr, zq, ref, query, holdout=holdout, seed=seed),
        }
        if not skip_scanvi:
            logger.info("%s: scvi-tools scANVI surgery", scenario)
            zr, zq, pred, info = run_scanvi(
                ref, query, seed=seed, reference=scvi_ref, reference_s=reference_s
            )
            result["methods"]["scanvi_surgery"] = {
                "run": info,
                "predict": label_figures(truth, pred, pred, ref),
                **score(zr, zq, ref, query, holdout=holdout, seed=seed),
            }
    return result


# label variants in print order: our label transfer on each latent, scANVI's own predict(),
# the no-integration classifier
_VARIANT_NAMES = (
    "expression",
    "expression_adr0070",
    "expression_adr0072",
    "knn",
    "prototype",
    "knn_query_context",
    "prototype_query_context",
    "predict",
    "classifier",
)
_TABLE_KEYS = (
    "accuracy_top_label",
    "accuracy_with_unknown",
    "known_fraction_called_unknown",
    "accuracy_open_set",
    "macro_f1_top_label",
    "novel_auroc",
    "novel_fraction_called_unknown",
)
_TABLE_HEADS = ("acc", "as-read", "known->U", "open-set", "macroF1", "AUROC", "novel->U")
_SUMMARY_KEYS = (
    "accuracy_top_label",
    "accuracy_with_unknown",
    "accuracy_open_set",
    "macro_f1_top_label",
    "fraction_unknown",
    "novel_auroc",
    "novel_fraction_called_unknown",
    "known_fraction_called_unknown",
    "accuracy_known_types_top_label",
)


def summarize(per_seed: list[dict]) -> dict:
    """Mean, min and max over seeds of every label-transfer figure and integration metric, per
    method and label variant: ``{method: {variant: {key: {"mean", "min", "max", "values"}}}}``.
    One seed's figure can sit far from the others on 280 query cells; the spread is the honest
    figure to quote. A method that some runs lack (scvi-tools' left out with ``--skip-scvi`` on
    some seeds) is summarised over the runs that have it; every entry names its ``seeds``."""
    out: dict = {}
    names = list(dict.fromkeys(name for r in per_seed for name in r["methods"]))
    for name in names:
        runs = [r for r in per_seed if name in r["methods"]]
        out[name] = {}
        for variant, res in runs[0]["methods"][name].items():
            if variant == "run" or not isinstance(res, dict):
                continue
            keys = [
                k for k in res if isinstance(res[k], (int, float)) and not isinstance(res[k], bool)
            ]
            if variant != "integration":
                keys = [k for k in keys if k in _SUMMARY_KEYS]
            cell = {}
            for k in keys:
                vals = [float(r["methods"][name][variant][k]) for r in runs]
                cell[k] = {
                    "mean": float(np.mean(vals)),
                    "min": float(np.min(vals)),
                    "max": float(np.max(vals)),
                    "values": vals,
                    "seeds": [r.get("seed") for r in runs],
                }
            out[name][variant] = cell
    return out


def _summary_table(scenario: str, seeds: list[int], summary: dict) -> str:
    keys = [
        ("accuracy_top_label", "acc"),
        ("accuracy_with_unknown", "as-read"),
        ("accuracy_open_set", "open-set"),
        ("novel_auroc", "AUROC"),
        ("novel_fraction_called_unknown", "novel->U"),
        ("known_fraction_called_unknown", "known->U"),
    ]
    head = f"{'method':14s} {'labels':23s} " + " ".join(f"{h:>19s}" for _, h in keys)
    rows, partial = [], []
    for name, variants in summary.items():
        for variant in _VARIANT_NAMES:
            if variant not in variants:
                continue
            some = next(iter(variants[variant].values()), {})
            if some.get("seeds") is not None and list(some["seeds"]) != list(seeds):
                partial.append(f"{name} {variant}: seeds {','.join(map(str, some['seeds']))} only")
            cells = []
            for k, _ in keys:
                v = variants[variant].get(k)
                cells.append(
                    "-" if v is None else f"{v['mean']:.3f} [{v['min']:.3f}-{v['max']:.3f}]"
                )
            rows.append(f"{name:14s} {variant:23s} " + " ".join(f"{c:>19s}" for c in cells))
    return (
        f"== {scenario}: mean [min-max] over seeds {','.join(map(str, seeds))} ==\n{head}\n"
        + "\n".join(rows + partial)
    )


def _table(result: dict) -> str:
    rows = []
    keys = _TABLE_KEYS
    for name, res in result["methods"].items():
        for method in _VARIANT_NAMES:
            if method not in res:
                continue
            vals = [res[method].get(k) for k in keys]
            cells = ["  -  " if v is None else f"{v:.3f}" for v in vals]
            rows.append(f"{name:14s} {method:23s} " + " ".join(f"{c:>8s}" for c in cells))
        if "integration" not in res:
            continue
        integ = res["integration"]
        rows.append(
            f"{name:14s} embedding  ebm={integ.get('entropy_of_batch_mixing', float('nan')):.3f} "
            f"ebm_ref_vs_query={integ['ebm_reference_vs_query']:.3f} "
            f"knn_purity={integ['knn_purity']:.3f} nmi={integ['nmi']:.3f} ari={integ['ari']:.3f}"
        )
    head = f"{'method':14s} {'labels':23s} " + " ".join(f"{h:>8s}" for h in _TABLE_HEADS)
    return f"== {result['scenario']} ==\n{head}\n" + "\n".join(rows)


def merge_runs(paths: list[Path], out_dir: Path) -> int:
    """Write ``labels_<scenario>.json`` over the seeds of one-seed result files (each the
    output of one ``--seed`` run), as ``--seeds`` would have: ``seeds``, ``summary`` (mean /
    min / max), ``per_seed``."""
    runs = [json.loads(p.read_text()) for p in paths]
    scenarios = {r["scenario"] for r in runs}
    if len(scenarios) != 1 or any("methods" not in r for r in runs):
        raise SystemExit("--merge takes one-seed result files of a single scenario")
    runs.sort(key=lambda r: r["seed"])
    seeds = [r["seed"] for r in runs]
    if len(set(seeds)) != len(seeds):
        raise SystemExit(f"--merge: a seed appears twice ({seeds})")
    keep = ("seed", "methods", "wall_s", "command", "finished_utc")
    result = {k: v for k, v in runs[0].items() if k not in keep}
    result.update(
        seeds=seeds,
        summary=summarize(runs),
        per_seed=runs,
        merged_from=[str(p) for p in paths],
        command="; ".join(str(r.get("command")) for r in runs),
        finished_utc=max(str(r.get("finished_utc")) for r in runs),
    )
    sc = scenarios.pop()
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"labels_{sc}.json"
    path.write_text(json.dumps(result, indent=2, sort_keys=True, default=str))
    print(_summary_table(sc, seeds, result["summary"]), flush=True)
    print(f"wrote {path}", flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--scenario", default="all", choices=["all", *SCENARIOS])
    seeds = ap.add_mutually_exclusive_group()
    seeds.add_argument("--seed", type=int, default=None, help="one seed (default 0)")
    seeds.add_argument(
        "--seeds",
        default=None,
        help="comma-separated seeds, e.g. 0,1,2,3,4: each seed trains both methods afresh; the "
        "JSON keeps every run and the mean / min / max",
    )
    ap.add_argument(
        "--skip-scvi",
        action="store_true",
        help="only scarches-fl and the no-integration floor (no scvi-tools methods)",
    )
    ap.add_argument("--skip-scanvi", action="store_true", help="no scANVI surgery")
    ap.add_argument("--max-epochs", type=int, default=None, help="reference epochs (ours)")
    ap.add_argument("--surgery-epochs", type=int, default=None, help="query epochs (ours)")
    ap.add_argument(
        "--model-kwargs",
        default="{}",
        help="JSON of extra ReferenceModel.train_reference keyword arguments; n_latent is "
        "also given to scvi-tools, so both tools keep the same architecture",
    )
    ap.add_argument("--out-dir", default=str(ROOT / "benchmarks" / "results"))
    ap.add_argument(
        "--model-cache",
        default=None,
        metavar="DIR",
        help="keep each trained and mapped model of ours (bundle + latents) under DIR and read "
        "it back on a later run with the same scenario, seed and settings: label rules are then "
        "re-scored without training again",
    )
    ap.add_argument(
        "--scvi-accelerator",
        choices=("cpu", "gpu"),
        default="cpu",
        help="where scvi-tools trains (default cpu); gpu for accuracy runs on a GPU machine",
    )
    ap.add_argument(
        "--merge",
        nargs="+",
        default=None,
        metavar="JSON",
        help="instead of running: combine one-seed result files of one scenario (e.g. seeds run "
        "in parallel processes) into the multi-seed file, with the same summary",
    )
    args = ap.parse_args(argv)
    if args.merge:
        return merge_runs([Path(p) for p in args.merge], Path(args.out_dir))
    global SCVI_ACCELERATOR
    SCVI_ACCELERATOR = args.scvi_accelerator
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    scenarios = list(SCENARIOS) if args.scenario == "all" else [args.scenario]
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if args.seeds is not None:
        try:
            seed_list = [int(v) for v in args.seeds.split(",") if v.strip()]
        except ValueError:
            ap.error(f"--seeds must be comma-separated integers, got {args.seeds!r}")
        if not seed_list or len(set(seed_list)) != len(seed_list):
            ap.error("--seeds needs at least one seed and no repeats")
    else:
        seed_list = [0 if args.seed is None else args.seed]
    command = "python benchmarks/bench_labels.py " + " ".join(
        sys.argv[1:] if argv is None else argv
    )
    for sc in scenarios:
        t0 = time.perf_counter()
        runs = [
            run_scenario(
                sc,
                seed=seed,
                skip_scvi=args.skip_scvi,
                skip_scanvi=args.skip_scanvi,
                model_kwargs=json.loads(args.model_kwargs),
                max_epochs=args.max_epochs,
                surgery_epochs=args.surgery_epochs,
                model_cache=Path(args.model_cache) if args.model_cache else None,
            )
            for seed in seed_list
        ]
        path = out_dir / f"labels_{sc}.json"
        if len(runs) == 1:
            result = runs[0]
            if args.skip_scvi and path.is_file():
                # keep an earlier scvi-tools run of the same scenario and seed (it does not
                # depend on our code)
                previous = json.loads(path.read_text())
                if previous.get("seed") == result["seed"]:
                    for kept in ("scvi_surgery", "scanvi_surgery"):
                        if kept in previous.get("methods", {}):
                            result["methods"][kept] = previous["methods"][kept]
                            result[f"{kept}_from_earlier_run"] = previous.get("finished_utc")
        else:
            result = {k: v for k, v in runs[0].items() if k not in ("seed", "methods")}
            result["seeds"] = seed_list
            result["summary"] = summarize(runs)
            result["per_seed"] = runs
        result["wall_s"] = time.perf_counter() - t0
        result["command"] = command
        result["finished_utc"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        path.write_text(json.dumps(result, indent=2, sort_keys=True, default=str))
        for run in runs:
            print(f"-- seed {run['seed']} --\n" + _table(run), flush=True)
        if len(runs) > 1:
            print(_summary_table(sc, seed_list, result["summary"]), flush=True)
        print(f"wrote {path}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
