"""The user API: train a reference, save/load it as a bundle, map a query by architecture surgery,
embed cells.

A :class:`ReferenceModel` is a :class:`~scarches_fl.module.CVAE` plus what a bundle needs: the
ordered genes, the ordered conditions (``<namespace>/<batch>``), the module hyperparameters, the
data registration (layer, batch key, label key), the label knowledge (``manifest["labels"]``) and
any ``atlas.*`` tensors. Those last two are carried through ``from_bundle`` / ``surgery`` /
``to_bundle`` unchanged.

Surgery modes (trainable tensors):

* ``conditions`` (default): only the new condition columns (``W_s`` of the encoder's and the
  decoder's first layer; the per-condition dispersion with ``dispersion="gene-batch"``). Every
  pre-existing number is a buffer, so it is bit-identical after fine-tuning. The fine-tuned
  bundle is built as ``apply_condition_diff(base, diff, new_conditions)``, so exporting the diff
  and applying it elsewhere gives the same digest.
* ``input_layers``: the whole first layer of the encoder and the decoder (gene/latent weights,
  bias, all condition columns).
* ``full``: every tensor.

Only ``conditions`` mode produces a contributable update (``SurgeryResult.diff``); the other modes
change shared weights, so their ``diff`` is empty and their bundle is a new reference.
"""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

import numpy as np

from scarches_fl.data import DataError, GeneAlignmentReport, RegisteredData, register

if TYPE_CHECKING:
    from anndata import AnnData

__all__ = [
    "MODEL_CLASS",
    "QUERY_CONVERGENCE",
    "SURGERY_MODES",
    "ReferenceModel",
    "SurgeryResult",
    "default_reference_epochs",
    "default_query_epochs",
]

log = logging.getLogger(__name__)

MODEL_CLASS = "scarches_fl.CVAE"
#: Weight of the cross-entropy of the latent classifier when a label key is given (scANVI's
#: classification ratio is 50; 10 kept held-out types detectable on panc8, see ADR 0013); 0 trains
#: a purely unsupervised reference.
DEFAULT_CLASSIFIER_WEIGHT = 10.0
SURGERY_MODES = ("conditions", "input_layers", "full")


def default_reference_epochs(n_cells: int) -> int:
    """scvi-tools' heuristic (20,000 cells -> 400 epochs budget), capped at 400, at least 100."""
    return int(max(100, min(400, round(20000 / max(n_cells, 1) * 100))))


def default_query_epochs(n_cells: int) -> int:
    """The ceiling on query fine-tuning epochs, 50-200 (``conditions`` mode stops earlier, on
    convergence: ``QUERY_CONVERGENCE``)."""
    return int(max(50, min(200, round(20000 / max(n_cells, 1) * 20))))


#: ``conditions`` mode stops on convergence by default (issue 21, ADR 0080): the validation
#: ELBO is checked every ``check_every_cells`` training cells, and training stops once its best
#: value improved by less than ``convergence_rtol`` of itself over ``convergence_window`` checks.
#: Small queries (a check spans many epochs) keep running to the epoch ceiling.
QUERY_CONVERGENCE: dict[str, Any] = {
    "convergence_rtol": 1e-4,
    "convergence_window": 3,
    "check_every_cells": 16384,
}


@dataclass
class SurgeryResult:
    model: ReferenceModel
    new_conditions: list[str]
    alignment: GeneAlignmentReport
    trainable_parameters: int
    history: dict[str, Any]
    latent: np.ndarray
    diff: dict[str, np.ndarray] = field(default_factory=dict)
    mode: str = "conditions"
    seconds: float = 0.0


class _Registered:
    """The type of :data:`REGISTERED`."""

    def __repr__(self) -> str:
        return "REGISTERED"


#: ``get_latent(layer=REGISTERED)`` (the default): read the layer the reference was trained on.
REGISTERED = _Registered()


def _cell_data_for(reg: RegisteredData, cond: np.ndarray,
                   labels: np.ndarray | None = None) -> Any:
    """In-memory :class:`~scarches_fl.train.CellData` (sparse counts, O(nnz)), or a
    :class:`~scarches_fl.train.StreamingCellData` reading windows of a backed file."""
    from scarches_fl import train

    if reg.source is not None:
        assert reg.lib is not None
        return train.StreamingCellData(reg.source, cond, reg.lib, labels,
                                       block_rows=train.BLOCK_ROWS,
                                       blocks_per_window=train.BLOCKS_PER_WINDOW)
    return train.CellData(reg.x, cond, labels=labels)


def _torch() -> ModuleType:
    import torch

    return torch


def _add_expression_prototypes(model: ReferenceModel, reg: RegisteredData, label_key: str,
                               *, seed: int) -> None:
    """Fit and attach the expression prototypes of ``label_key`` (ADR 0070)."""
    from scarches_fl.refine import reference_expression_prototypes

    info, tensors = reference_expression_prototypes(reg, label_key, seed=seed)
    labels = copy.deepcopy(model.labels)
    labels["expression"] = info["projection"]
    for name, level_info in info["levels"].items():
        if name in labels.get("levels", {}):
            labels["levels"][name]["expression"] = level_info
    model.labels = labels
    model.extra_tensors.update({k: np.asarray(v, dtype=np.float32) for k, v in tensors.items()})


class ReferenceModel:
    """A trained conditional VAE with its genes, conditions and registration."""

    def __init__(
        self, module: Any, *, genes: Sequence[str], conditions: Sequence[str],
        registration: Mapping[str, Any], labels: Mapping[str, Any] | None = None,
        extra_tensors: Mapping[str, np.ndarray] | None = None,
        extra_tensor_specs: Mapping[str, Mapping[str, Any]] | None = None,
        base_manifest: Mapping[str, Any] | None = None,
    ) -> None:
        self.module = module
        self._genes = [str(g) for g in genes]
        self._conditions = [str(c) for c in conditions]
        self.registration = dict(registration)
        self.labels = copy.deepcopy(dict(labels or {}))
        self.extra_tensors = {k: np.asarray(v) for k, v in (extra_tensors or {}).items()}
        self.extra_tensor_specs = {k: dict(v) for k, v in (extra_tensor_specs or {}).items()}
        self._base_manifest = copy.deepcopy(dict(base_manifest)) if base_manifest else None
        self._bundle_cache: Any = None
        self.history: dict[str, Any] = {}

    # -- properties ----------------------------------------------------------------------------

    @property
    def genes(self) -> list[str]:
        return list(self._genes)

    @property
    def conditions(self) -> list[str]:
        return list(self._conditions)

    @property
    def hyperparameters(self) -> dict[str, Any]:
        return dict(self.module.hp)

    @property
    def digest(self) -> str:
        return self.to_bundle().digest

    def trainable_parameters(self, mode: str) -> int:
        """Trainable parameter count of surgery in ``mode`` for one new condition."""
        from scarches_fl.module import CVAE

        m = CVAE(self.module.hp, len(self._genes), len(self._conditions) + 1,
                 n_new_conditions=1, mode=mode)
        return m.trainable_parameter_count()

    # -- training ------------------------------------------------------------------------------

    @classmethod
    def train_reference(
        cls, adata: AnnData, *, batch_key: str, label_key: str | None = None,
        layer: str | None = None, likelihood: str = "nb", namespace: str = "ref",
        n_hidden: int = 128, n_layers: int = 2, n_latent: int = 10,
        max_epochs: int | None = None, seed: int = 0, device: str = "cpu",
        progress: bool = True, dispersion: str = "gene", dropout_rate: float = 0.1,
        include_atlas: bool = False, classifier_weight: float | None = None,
        n_top_genes: int | None = None, expression_prototypes: bool = True, **kw: Any,
    ) -> ReferenceModel:
        """Train a reference on ``adata`` (every batch value becomes a condition
        ``<namespace>/<batch>``). Extra keyword arguments go to
        :class:`~scarches_fl.train.TrainingConfig` (``lr``, ``batch_size``, ``weight_decay``,
        ``kl_warmup_epochs``, ``validation_fraction``, ``validation_max_cells``,
        ``early_stopping``, ``patience``). ``n_top_genes``: train on that many batch-aware highly
        variable genes only (:func:`scarches_fl.genes.select_highly_variable_genes`); the
        bundle's gene list is then those genes. ``expression_prototypes`` (with a label key):
        also store the reference's expression prototypes (:mod:`scarches_fl.refine`, ADR
        0070), the default label rule at ``map``."""
        torch = _torch()
        gene_selection = None
        if n_top_genes is not None:
            from scarches_fl.genes import GENE_SELECTION_METHOD, select_highly_variable_genes

            chosen = select_highly_variable_genes(
                adata, n_top_genes=int(n_top_genes), batch_key=batch_key, layer=layer)
            gene_selection = {"method": GENE_SELECTION_METHOD, "n_top_genes": int(n_top_genes),
                              "batch_key": batch_key, "n_input_genes": int(adata.n_vars)}
            adata = adata[:, chosen].copy()
        from scarches_fl.module import CVAE, default_hyperparameters
        from scarches_fl.train import TrainingConfig, fit, posterior_mean

        reg = register(adata, batch_key=batch_key, namespace=namespace, likelihood=likelihood,
                       label_key=label_key, layer=layer)
        label_codes = None
        label_classes: list[str] = []
        if classifier_weight is None:
            classifier_weight = DEFAULT_CLASSIFIER_WEIGHT
        if reg.labels is not None and classifier_weight > 0:
            label_classes = sorted(set(reg.labels.tolist()))
            lookup = {c: i for i, c in enumerate(label_classes)}
            label_codes = np.asarray([lookup[c] for c in reg.labels], dtype=np.int64)
        hp = default_hyperparameters(
            likelihood=likelihood, n_hidden=int(n_hidden), n_layers=int(n_layers),
            n_latent=int(n_latent), dispersion=dispersion, dropout_rate=float(dropout_rate),
            n_labels=len(label_classes),
            classifier_weight=float(classifier_weight) if label_classes else 0.0,
        )
        conditions = sorted(set(reg.conditions.tolist()))
        cond_index = {c: i for i, c in enumerate(conditions)}
        cond = np.asarray([cond_index[c] for c in reg.conditions], dtype=np.int64)
        genes = [str(g) for g in adata.var_names]
        module = CVAE(hp, len(genes), len(conditions), mode="reference")
        module.init_reference(torch.Generator().manual_seed(int(seed)))
        epochs = int(max_epochs) if max_epochs is not None else default_reference_epochs(
            reg.n_cells)
        cfg_kw: dict[str, Any] = {
            "max_epochs": epochs, "seed": int(seed), "device": device, "progress": progress,
            "kl_warmup_epochs": kw.pop("kl_warmup_epochs", max(1, epochs // 2)),
            "description": "reference",
        }
        cfg_kw.update(kw)
        config = TrainingConfig(**cfg_kw)
        data = _cell_data_for(reg, cond, labels=label_codes)
        history = fit(module, data, config)
        module.cpu()
        registration = dict(reg.registration)
        if label_classes:
            registration["classifier_classes"] = label_classes
        if gene_selection is not None:
            registration["gene_selection"] = gene_selection
        registration.update({
            "likelihood": likelihood,
            "input": ("raw counts; encoder sees log1p(x)" if likelihood == "nb" else
                      "counts; encoder and reconstruction use log1p(x / total * 1e4)"),
            "namespace": namespace,
            "n_cells": int(reg.n_cells),
            "training": {k: v for k, v in config.to_dict().items()
                         if k not in ("progress", "device", "description")},
            "epochs_run": int(history["epochs"]),
        })
        model = cls(module, genes=genes, conditions=conditions, registration=registration)
        model.history = history
        if label_key is not None:
            try:
                from scarches_fl.labels import build_label_knowledge
            except ImportError:  # pragma: no cover - the optional module is not installed
                log.warning("scarches_fl.labels not available; no label knowledge stored")
            else:
                latent = posterior_mean(module, data)
                manifest_labels, atlas = build_label_knowledge(
                    latent, {label_key: reg.labels}, include_atlas=include_atlas, seed=int(seed))
                model.labels = manifest_labels
                model.extra_tensors = {k: np.asarray(v) for k, v in atlas.items()}
                if expression_prototypes:
                    _add_expression_prototypes(model, reg, label_key, seed=int(seed))
        return model

    # -- bundles -------------------------------------------------------------------------------

    def _manifest(self) -> dict[str, Any]:
        from scarches_fl.module import tensor_specs

        specs = tensor_specs(self.module.hp, len(self._genes), len(self._conditions))
        tensors_meta: dict[str, Any] = {}
        for name, spec in specs.items():
            entry: dict[str, Any] = {"role": spec.role, "dtype": "float32",
                                     "shape": list(spec.shape)}
            if spec.role == "condition":
                entry["axis"] = spec.condition_axis
            tensors_meta[name] = entry
        for name, arr in self.extra_tensors.items():
            entry = dict(self.extra_tensor_specs.get(name, {}))
            entry.setdefault("role", "frozen")
            entry["dtype"] = "float32"
            entry["shape"] = list(arr.shape)
            tensors_meta[name] = entry
        if self._base_manifest is not None:
            manifest = copy.deepcopy(self._base_manifest)
            manifest.pop("digest", None)
            manifest["conditions"] = list(self._conditions)
            manifest["tensors"] = tensors_meta
            manifest["labels"] = copy.deepcopy(self.labels)
            return manifest
        from protocols.bundle import BUNDLE_FORMAT, BUNDLE_FORMAT_VERSION

        return {
            "format": BUNDLE_FORMAT,
            "format_version": BUNDLE_FORMAT_VERSION,
            "model_class": MODEL_CLASS,
            "hyperparameters": dict(self.module.hp),
            "genes": list(self._genes),
            "conditions": list(self._conditions),
            "tensors": tensors_meta,
            "registration": copy.deepcopy(self.registration),
            "labels": copy.deepcopy(self.labels),
        }

    def tensors(self) -> dict[str, np.ndarray]:
        out = self.module.export_tensors()
        for k, v in self.extra_tensors.items():
            out[k] = np.ascontiguousarray(v, dtype=np.float32)
        return out

    def to_bundle(self) -> Any:
        """The model as a :class:`protocols.bundle.ReferenceBundle` (all tensors float32)."""
        from protocols.bundle import make_bundle

        return make_bundle(self._manifest(), self.tensors())

    def save(self, path: str | Path) -> Any:
        from protocols.bundle import write_bundle

        bundle = self.to_bundle()
        write_bundle(path, bundle)
        return bundle

    @classmethod
    def from_bundle(cls, bundle_or_path: Any) -> ReferenceModel:
        """Rebuild the exact module from a bundle (or a bundle directory)."""
        from protocols.bundle import read_bundle
        from scarches_fl.module import CVAE, default_hyperparameters, tensor_specs

        bundle = bundle_or_path
        if isinstance(bundle_or_path, (str, Path)):
            bundle = read_bundle(bundle_or_path)
        manifest = bundle.manifest
        if manifest.get("model_class") != MODEL_CLASS:
            raise DataError(
                f"bundle model_class is {manifest.get('model_class')!r}, this library reads "
                f"{MODEL_CLASS!r}; use the scarches-fl version that wrote it"
            )
        hp = default_hyperparameters(**dict(manifest["hyperparameters"]))
        genes = list(manifest["genes"])
        conditions = list(manifest["conditions"])
        module = CVAE(hp, len(genes), len(conditions), n_new_conditions=0, mode="conditions")
        specs = tensor_specs(hp, len(genes), len(conditions))
        missing = [n for n in specs if n not in bundle.tensors]
        if missing:
            raise DataError(f"bundle lacks tensors {missing}; it is not a {MODEL_CLASS} bundle")
        module.load_tensors({n: bundle.tensors[n] for n in specs})
        module.eval()
        extra = {k: np.asarray(v) for k, v in bundle.tensors.items() if k not in specs}
        extra_specs = {k: dict(manifest["tensors"].get(k, {})) for k in extra}
        model = cls(
            module, genes=genes, conditions=conditions,
            registration=manifest.get("registration", {}), labels=manifest.get("labels", {}),
            extra_tensors=extra, extra_tensor_specs=extra_specs, base_manifest=manifest,
        )
        model._bundle_cache = bundle
        return model

    # -- embedding -----------------------------------------------------------------------------

    def _cell_data(self, reg: RegisteredData) -> Any:
        index = {c: i for i, c in enumerate(self._conditions)}
        unknown = sorted(set(reg.conditions.tolist()) - set(index))
        if unknown:
            raise DataError(
                f"conditions {unknown[:5]} are not in this model (it has {self._conditions[:8]}"
                f"{'...' if len(self._conditions) > 8 else ''}); map the data first "
                "(model.surgery / scarches-fl map) or pass the namespace the data was mapped with"
            )
        cond = np.asarray([index[c] for c in reg.conditions], dtype=np.int64)
        return _cell_data_for(reg, cond)

    def get_latent(
        self, adata: AnnData, *, batch_key: str | None = None, namespace: str | None = None,
        layer: str | None | _Registered = REGISTERED, batch_size: int = 4096,
        min_gene_coverage: float = 0.5, device: str = "cpu",
    ) -> np.ndarray:
        """Posterior mean of every cell (genes aligned to the model's), chunked. The counts are
        read as the reference was registered: from its layer (``layer=None`` reads X), with its
        batch key and namespace unless given."""
        from scarches_fl.train import posterior_mean

        if isinstance(layer, _Registered):
            layer = self.registration.get("layer")
        if batch_key is None:
            batch_key = self.registration.get("batch_key")
            if not batch_key:
                raise DataError("this reference records no batch key; pass batch_key=")
        if namespace is None:
            namespace = str(self.registration.get("namespace", "ref"))
        reg = register(adata, batch_key=batch_key, namespace=namespace,
                       likelihood=str(self.module.hp["likelihood"]), layer=layer,
                       reference_genes=self._genes, min_gene_coverage=min_gene_coverage)
        return posterior_mean(self.module, self._cell_data(reg), batch_size=batch_size,
                              device=device)

    # -- surgery -------------------------------------------------------------------------------

    def surgery(
        self, adata: AnnData, *, batch_key: str, namespace: str, layer: str | None = None,
        mode: str = "conditions", max_epochs: int | None = None, seed: int = 0,
        min_gene_coverage: float = 0.5, progress: bool = True, device: str = "cpu",
        **kw: Any,
    ) -> SurgeryResult:
        """Add the query's batches as new conditions and fine-tune (see module docstring).
        Extra keyword arguments go to :class:`~scarches_fl.train.TrainingConfig`."""
        from scarches_fl.module import CVAE
        from scarches_fl.train import TrainingConfig, fit, posterior_mean

        if mode not in SURGERY_MODES:
            raise DataError(f"mode must be one of {', '.join(SURGERY_MODES)}, not {mode!r}")
        t0 = time.perf_counter()
        hp = self.module.hp
        reg = register(adata, batch_key=batch_key, namespace=namespace,
                       likelihood=str(hp["likelihood"]), layer=layer,
                       reference_genes=self._genes, min_gene_coverage=min_gene_coverage)
        assert reg.alignment is not None
        new_conditions = sorted(set(reg.conditions.tolist()))
        clash = sorted(set(new_conditions) & set(self._conditions))
        if clash:
            raise DataError(
                f"conditions {clash} already exist in the reference; surgery adds new studies "
                "only. Use another --namespace (your site id) or embed with get_latent"
            )
        all_conditions = self._conditions + new_conditions
        index = {c: i for i, c in enumerate(all_conditions)}
        cond = np.asarray([index[c] for c in reg.conditions], dtype=np.int64)
        module = CVAE(hp, len(self._genes), len(all_conditions),
                      n_new_conditions=len(new_conditions), mode=mode)
        module.load_tensors(self.module.export_tensors())
        module.init_new_conditions()
        epochs = int(max_epochs) if max_epochs is not None else default_query_epochs(reg.n_cells)
        cfg_kw: dict[str, Any] = {
            "max_epochs": epochs, "seed": int(seed), "device": device, "progress": progress,
            "kl_warmup_epochs": 0, "description": f"surgery ({mode})",
            "lr": 1e-2 if mode == "conditions" else 1e-3,
            "weight_decay": 0.0,
        }
        if mode == "conditions":
            cfg_kw.update(QUERY_CONVERGENCE)
        cfg_kw.update(kw)
        config = TrainingConfig(**cfg_kw)
        data = _cell_data_for(reg, cond)
        history = fit(module, data, config, keep_first_layer=True)
        h0 = history.pop("first_layer", None)
        module.cpu()
        n_trainable = module.trainable_parameter_count()
        # the precomputed W_x x + b still holds (the gene weights are frozen): no counts re-read
        latent = posterior_mean(module, data, h0=h0)

        new_tensors = module.export_tensors()
        diff: dict[str, np.ndarray] = {}
        if mode == "conditions":
            from protocols.diff import apply_condition_diff

            n_old = len(self._conditions)
            for name, spec in module.specs.items():
                if spec.role == "condition":
                    arr = new_tensors[name]
                    sl = [slice(None)] * arr.ndim
                    sl[spec.condition_axis] = slice(n_old, None)
                    diff[name] = np.ascontiguousarray(arr[tuple(sl)], dtype=np.float32)
            base = self.to_bundle()
            new_bundle = apply_condition_diff(base, diff, new_conditions)
            new_model = ReferenceModel.from_bundle(new_bundle)
        else:
            inference = CVAE(hp, len(self._genes), len(all_conditions), n_new_conditions=0,
                             mode="conditions")
            inference.load_tensors(new_tensors)
            inference.eval()
            new_model = ReferenceModel(
                inference, genes=self._genes, conditions=all_conditions,
                registration=self.registration, labels=self.labels,
                extra_tensors=self.extra_tensors, extra_tensor_specs=self.extra_tensor_specs,
                base_manifest=self._base_manifest,
            )
        return SurgeryResult(
            model=new_model, new_conditions=new_conditions, alignment=reg.alignment,
            trainable_parameters=n_trainable, history=history, latent=latent, diff=diff,
            mode=mode, seconds=time.perf_counter() - t0,
        )
