"""Bring a scvi-tools SCVI / SCANVI reference into a bundle, and write a grown bundle back.

**Reading** (:func:`import_scvi`). A scvi-tools 1.x model directory holds ``model.pt``: a torch
zip checkpoint whose pickle carries ``model_state_dict`` (the module's tensors), ``var_names``
(the genes) and ``attr_dict`` (``init_params_``: the constructor arguments; ``registry_``: the
AnnData setup, with the batch and label categories; training history as pandas frames). It is
read without executing pickled code: the checkpoint's globals are listed first
(``torch.serialization.get_unsafe_globals_in_checkpoint``) and anything outside
:data:`ALLOWED_GLOBALS` is refused with its name; then ``torch.load(weights_only=True)`` runs with
exactly that allow-list. The pandas frames of the training history are not rebuilt: their
globals are replaced by an inert placeholder, so no pandas code runs either.

The module's tensors become the bundle's (:data:`scarches_fl.module.tensor_specs` names): each
linear layer that takes the batch one-hot is split into its gene/latent/hidden block and its
condition block (``weight_s``, role ``condition``). Tensors the forward pass does not use (the
library encoder with an observed library, ``px_r_decoder``, scANVI's ``z1``/``z2`` networks) are
carried as frozen ``scvi/...`` tensors so that the export is complete; the ones that take the
batch get their columns for new conditions only at export time, so a site's update never
carries them. The manifest's ``registration["scvi"]`` records where the model came from: the
scvi-tools version, the model class, ``setup_args``, ``init_params_``, the original batch
categories and the registry needed to write it back.

Options scvi-tools offers that this model family does not express are refused with the option
named (:class:`ScviImportError`): a learned library size, extra categorical or continuous
covariates, a size-factor key, ``gene-label`` / ``gene-cell`` dispersion, the Poisson
likelihood, the logistic-normal latent, ``log_variational=False``, a batch embedding, label
groups.

**Writing** (:func:`export_scvi`). A bundle imported this way is written back as a scvi-tools
model directory (``model.pt``) with every condition, the reference's under their original batch
names and each site's as ``<site>/<batch>``, as batch categories. It holds weights, genes,
condition and cell-type names only, never cells: ``EXPORT.json`` says so.
"""

from __future__ import annotations

import collections
import copy
import json
import logging
import pickle
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from scarches_fl.data import DataError, condition_names

if TYPE_CHECKING:
    from anndata import AnnData

__all__ = [
    "ALLOWED_GLOBALS",
    "EXPORT_FILE",
    "MODEL_FILE",
    "ScviImportError",
    "ScviModelFile",
    "SUPPORTED_MODELS",
    "classifier_labels",
    "export_scvi",
    "import_scvi",
    "read_model_file",
]

log = logging.getLogger(__name__)

MODEL_FILE = "model.pt"
EXPORT_FILE = "EXPORT.json"
EXPORT_FORMAT = "scarches-fl.scvi-export/1"
SUPPORTED_MODELS = ("SCVI", "SCANVI")
_SCVI = "scvi"  # the registration key and the prefix of carried tensors


class ScviImportError(DataError):
    """A scvi-tools model directory cannot be read or expressed; the message names what and
    the fix."""


# ---------------------------------------------------------------------------------------------
# The safe reader


class _Discarded:
    """Stands in for a pandas object of the training history: built from anything, keeps
    nothing, runs no pandas code."""

    def __new__(cls, *args: Any, **kwargs: Any) -> _Discarded:
        return object.__new__(cls)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __setstate__(self, state: Any) -> None:
        pass


def _discard(*args: Any, **kwargs: Any) -> _Discarded:
    return _Discarded()


def _plain_dict(*args: Any) -> dict[Any, Any]:
    """``collections.defaultdict(factory)`` read as a plain dict (no factory is ever called)."""
    return {}


_DISCARDED_GLOBALS = (
    "pandas.core.frame.DataFrame",
    "pandas.core.series.Series",
    "pandas.core.internals.managers.BlockManager",
    "pandas.core.internals.managers.SingleBlockManager",
    "pandas._libs.internals._unpickle_block",
    "pandas.core.indexes.base._new_Index",
    "pandas.core.indexes.base.Index",
    "pandas.core.indexes.range.RangeIndex",
)
_NUMPY_RECONSTRUCT = ("numpy._core.multiarray._reconstruct", "numpy.core.multiarray._reconstruct")


def _numpy_dtype_classes() -> list[Any]:
    return [getattr(np.dtypes, n) for n in getattr(np.dtypes, "__all__", [])]


#: Globals a scvi-tools 1.x ``model.pt`` may name beyond torch's own weights-only set: numpy
#: arrays (object arrays of names included), plain containers, and the pandas objects of the
#: training history (read as inert placeholders). Nothing else is loaded.
ALLOWED_GLOBALS: tuple[str, ...] = (
    *_NUMPY_RECONSTRUCT,
    "numpy.ndarray",
    "numpy.dtype",
    "collections.defaultdict",
    "collections.OrderedDict",
    "builtins.dict",
    "builtins.slice",
    "builtins.bytes",
    *_DISCARDED_GLOBALS,
)


def _safe_globals() -> list[Any]:
    from numpy._core.multiarray import _reconstruct

    out: list[Any] = [(_reconstruct, name) for name in _NUMPY_RECONSTRUCT]
    out += [np.ndarray, np.dtype, *_numpy_dtype_classes()]
    out += [
        (_plain_dict, "collections.defaultdict"),
        (dict, "builtins.dict"),
        (slice, "builtins.slice"),
        (bytes, "builtins.bytes"),
    ]
    for name in _DISCARDED_GLOBALS:
        out.append((_discard if name.rsplit(".", 1)[1][0].islower() else _Discarded, name))
    return out


@dataclass
class ScviModelFile:
    """What a ``model.pt`` holds, as plain values: tensors as float32 numpy arrays (integer
    tensors as int64), genes, and the attribute dict (pandas objects dropped)."""

    state: dict[str, np.ndarray]
    var_names: list[str]
    attr: dict[str, Any]


def read_model_file(path: str | Path) -> ScviModelFile:
    """Read a scvi-tools ``model.pt`` without executing pickled code (module docstring)."""
    import torch

    path = Path(path)
    if not path.is_file():
        raise ScviImportError(
            f"{path} not found; MODEL_DIR must be a scvi-tools model "
            f"directory holding {MODEL_FILE} (model.save(dir))"
        )
    if not zipfile.is_zipfile(path):
        raise ScviImportError(
            f"{path} is not a torch zip checkpoint (legacy pickle files are refused: they "
            "cannot be read without running their code); re-save it with scvi-tools >= 1.0"
        )
    try:
        named = torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
    except Exception as exc:  # a corrupt pickle stream: the scan fails before any load
        raise ScviImportError(f"{path}: cannot list the checkpoint's globals ({exc})") from exc
    refused = sorted(set(named) - set(ALLOWED_GLOBALS))
    if refused:
        raise ScviImportError(
            f"{path} refers to {', '.join(refused)}, which a scvi-tools model file does not "
            "need and which could run code when loaded; it was not loaded. Re-save the model "
            "with scvi-tools' model.save, or remove the object from attr_dict"
        )
    try:
        with torch.serialization.safe_globals(_safe_globals()):
            raw = torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise ScviImportError(f"{path} was refused by the weights-only loader: {exc}") from exc
    if not isinstance(raw, Mapping) or "model_state_dict" not in raw or "attr_dict" not in raw:
        raise ScviImportError(
            f"{path} has no model_state_dict / attr_dict: it is not a scvi-tools >= 0.15 "
            "model file (convert older ones with scvi.model.base.BaseModelClass."
            "convert_legacy_save)"
        )
    state: dict[str, np.ndarray] = {}
    for key, value in raw["model_state_dict"].items():
        if isinstance(value, torch.Tensor):
            arr = value.detach().cpu().numpy()
            state[key] = arr.astype(np.int64 if arr.dtype.kind in "iub" else np.float32)
    var_names = [str(g) for g in np.asarray(raw.get("var_names", [])).ravel().tolist()]
    return ScviModelFile(state=state, var_names=var_names, attr=dict(raw["attr_dict"]))


# ---------------------------------------------------------------------------------------------
# Import


def _jsonable(value: Any) -> Any:
    """Registry and init parameters as JSON values (arrays -> lists, numpy scalars -> Python,
    placeholders dropped)."""
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items() if not isinstance(v, _Discarded)}
    if isinstance(value, np.ndarray):
        return [_jsonable(v) for v in value.tolist()]
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, float) and not np.isfinite(value):
        return None
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)


def _init_params(attr: Mapping[str, Any]) -> dict[str, Any]:
    """The model constructor's arguments with the module keyword arguments merged in."""
    raw = attr.get("init_params_")
    if not isinstance(raw, Mapping):
        raise ScviImportError(
            "attr_dict has no init_params_; save the model with scvi-tools 1.x (model.save)"
        )
    params: dict[str, Any] = {}
    non_kwargs = raw.get("non_kwargs", raw)
    params.update({k: v for k, v in dict(non_kwargs).items() if k not in ("kwargs",)})
    for value in dict(raw.get("kwargs", {})).values():
        if isinstance(value, Mapping):
            params.update(dict(value))
    return params


def _refuse(what: str, fix: str) -> ScviImportError:
    return ScviImportError(
        f"{what} is not supported by scarches-fl's model family; {fix} "
        "(docs/model.md lists the supported options)"
    )


@dataclass
class _Layout:
    n_genes: int
    n_hidden: int
    n_latent: int
    n_layers: int
    n_batch: int  # batch categories
    n_cov: int  # batch one-hot columns in a covariate-taking layer (0 when n_batch == 1)
    encode_covariates: bool
    deep: bool
    encoder_bn: bool
    decoder_bn: bool


def _layer_keys(state: Mapping[str, Any], prefix: str) -> list[int]:
    out = set()
    for k in state:
        if k.startswith(prefix + "Layer "):
            out.add(int(k[len(prefix) + 6 :].split(".", 1)[0]))
    return sorted(out)


def _infer_layout(mf: ScviModelFile, n_batch: int, params: Mapping[str, Any]) -> _Layout:
    """The architecture from the state dict's shapes; with one batch (scvi-tools then adds no
    one-hot columns) where the covariates go comes from the constructor's arguments."""
    s = mf.state
    enc = "z_encoder.encoder.fc_layers."
    dec = "decoder.px_decoder.fc_layers."
    try:
        w0 = s[f"{enc}Layer 0.0.weight"]
        d0 = s[f"{dec}Layer 0.0.weight"]
        mean_w = s["z_encoder.mean_encoder.weight"]
    except KeyError as exc:
        raise ScviImportError(
            f"model_state_dict lacks {exc.args[0]!r}: not an SCVI / SCANVI module"
        ) from exc
    n_genes = len(mf.var_names)
    n_hidden, n_latent = int(w0.shape[0]), int(mean_w.shape[0])
    n_layers = len(_layer_keys(s, enc))
    n_cov = n_batch if n_batch > 1 else 0
    if n_cov == 0:
        encode_covariates = bool(params.get("encode_covariates", False))
    elif w0.shape[1] == n_genes + n_cov:
        encode_covariates = True
    elif w0.shape[1] == n_genes:
        encode_covariates = False
    else:
        raise ScviImportError(
            f"the encoder's first layer has {w0.shape[1]} inputs, expected {n_genes} genes "
            f"(+ {n_cov} batch columns): the model uses covariates scarches-fl cannot express"
        )
    if d0.shape[1] != n_latent + n_cov:
        raise _refuse(
            f"a decoder input of {d0.shape[1]} columns (latent {n_latent} + batch "
            f"{n_cov} expected)",
            "remove extra covariates",
        )
    deep = bool(params.get("deeply_inject_covariates", True))
    if n_layers > 1 and n_cov > 0:
        deep = int(s[f"{dec}Layer 1.0.weight"].shape[1]) == n_hidden + n_cov
    return _Layout(
        n_genes=n_genes,
        n_hidden=n_hidden,
        n_latent=n_latent,
        n_layers=n_layers,
        n_batch=n_batch,
        n_cov=n_cov,
        encode_covariates=encode_covariates,
        deep=deep,
        encoder_bn=f"{enc}Layer 0.1.running_mean" in s,
        decoder_bn=f"{dec}Layer 0.1.running_mean" in s,
    )


def _norm_place(encoder: bool, decoder: bool) -> str:
    return {
        (True, True): "both",
        (True, False): "encoder",
        (False, True): "decoder",
        (False, False): "none",
    }[(encoder, decoder)]


def _check_supported(params: Mapping[str, Any], setup: Mapping[str, Any], model_name: str) -> None:
    if model_name not in SUPPORTED_MODELS:
        raise ScviImportError(
            f"model class {model_name!r} is not supported; import-scvi reads "
            f"{' or '.join(SUPPORTED_MODELS)} models"
        )
    if setup.get("categorical_covariate_keys") or setup.get("continuous_covariate_keys"):
        raise _refuse(
            "extra covariates (categorical_covariate_keys / continuous_covariate_keys)",
            "set the model up with batch_key only",
        )
    if setup.get("size_factor_key"):
        raise _refuse("a size_factor_key", "set the model up without one")
    if not bool(params.get("use_observed_lib_size", True)):
        raise _refuse(
            "a learned library size (use_observed_lib_size=False)",
            "train with use_observed_lib_size=True",
        )
    if params.get("gene_likelihood", "zinb") not in ("nb", "zinb"):
        raise _refuse(f"gene_likelihood={params.get('gene_likelihood')!r}", "use 'nb' or 'zinb'")
    if params.get("dispersion", "gene") not in ("gene", "gene-batch"):
        raise _refuse(f"dispersion={params.get('dispersion')!r}", "use 'gene' or 'gene-batch'")
    if params.get("latent_distribution", "normal") != "normal":
        raise _refuse(f"latent_distribution={params.get('latent_distribution')!r}", "use 'normal'")
    if not bool(params.get("log_variational", True)):
        raise _refuse("log_variational=False", "use the default log1p encoder input")
    if params.get("batch_representation", "one-hot") != "one-hot":
        raise _refuse(
            "a batch embedding (batch_representation='embedding')",
            "use the one-hot batch representation",
        )
    if params.get("var_activation") is not None:
        raise _refuse("a custom var_activation", "use the default (exp)")
    if params.get("use_labels_groups"):
        raise _refuse("label groups (use_labels_groups)", "train without label groups")
    if params.get("datamodule"):
        raise _refuse("a model set up from a datamodule", "set it up with setup_anndata")


def _split(w: np.ndarray, n_main: int, n_cov: int, n_cond: int) -> tuple[np.ndarray, np.ndarray]:
    main = np.ascontiguousarray(w[:, :n_main], dtype=np.float32)
    if n_cov:
        cond = np.ascontiguousarray(w[:, n_main : n_main + n_cov], dtype=np.float32)
    else:  # one batch: scvi-tools adds no one-hot columns; the condition contributes nothing
        cond = np.zeros((w.shape[0], n_cond), dtype=np.float32)
    return main, cond


def _carried_name(key: str) -> str:
    return f"{_SCVI}/" + key.replace(" ", "_")


def _module_tensors(
    mf: ScviModelFile, lay: _Layout, hp: Mapping[str, Any], n_conditions: int
) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """Bundle tensors from the state dict, and {state key: bundle name} for every key used."""
    s = mf.state
    out: dict[str, np.ndarray] = {}
    used: dict[str, str] = {}

    def take(key: str, name: str) -> None:
        out[name] = np.ascontiguousarray(s[key], dtype=np.float32)
        used[key] = name

    def fc(
        prefix: str,
        ours: str,
        n_first: int,
        first_main: str,
        covariates: bool,
        deep: bool,
        bn: bool,
    ) -> None:
        for i in range(lay.n_layers):
            key = f"{prefix}Layer {i}.0.weight"
            n_main = n_first if i == 0 else lay.n_hidden
            takes = covariates and (i == 0 or deep)
            w = s[key]
            if takes:
                main, cond = _split(w, n_main, lay.n_cov, n_conditions)
                out[f"{ours}.layers.{i}.{first_main if i == 0 else 'weight'}"] = main
                out[f"{ours}.layers.{i}.weight_s"] = cond
            else:
                out[f"{ours}.layers.{i}.{first_main if i == 0 else 'weight'}"] = (
                    np.ascontiguousarray(w[:, :n_main], dtype=np.float32)
                )
            used[key] = f"{ours}.layers.{i}"
            take(f"{prefix}Layer {i}.0.bias", f"{ours}.layers.{i}.bias")
            if bn:
                for part in ("weight", "bias", "running_mean", "running_var"):
                    take(f"{prefix}Layer {i}.1.{part}", f"{ours}.layers.{i}.bn.{part}")

    fc(
        "z_encoder.encoder.fc_layers.",
        "encoder",
        lay.n_genes,
        "weight_x",
        lay.encode_covariates,
        lay.deep,
        lay.encoder_bn,
    )
    for head in ("mean", "var"):
        take(f"z_encoder.{head}_encoder.weight", f"encoder.{head}.weight")
        take(f"z_encoder.{head}_encoder.bias", f"encoder.{head}.bias")
    fc(
        "decoder.px_decoder.fc_layers.",
        "decoder",
        lay.n_latent,
        "weight_z",
        True,
        lay.deep,
        lay.decoder_bn,
    )
    take("decoder.px_scale_decoder.0.weight", "decoder.out.weight")
    take("decoder.px_scale_decoder.0.bias", "decoder.out.bias")
    if hp["likelihood"] == "zinb":
        take("decoder.px_dropout_decoder.weight", "decoder.dropout.weight")
        take("decoder.px_dropout_decoder.bias", "decoder.dropout.bias")
    px_r = np.ascontiguousarray(s["px_r"], dtype=np.float32)
    out["px_r"] = px_r
    used["px_r"] = "px_r"
    n_cls = int(hp.get("classifier_layers", 0) or 0)
    if int(hp.get("n_labels", 0) or 0) > 0:
        cprefix = "classifier.classifier.0.fc_layers."
        for i in range(n_cls):
            take(f"{cprefix}Layer {i}.0.weight", f"classifier.layers.{i}.weight")
            take(f"{cprefix}Layer {i}.0.bias", f"classifier.layers.{i}.bias")
            if lay.encoder_bn:
                for part in ("weight", "bias", "running_mean", "running_var"):
                    take(f"{cprefix}Layer {i}.1.{part}", f"classifier.layers.{i}.bn.{part}")
        last = f"classifier.classifier.{1 if n_cls else 0}"
        take(f"{last}.weight", "classifier.weight")
        take(f"{last}.bias", "classifier.bias")
    return out, used


def _label_record(mf: ScviModelFile) -> tuple[str | None, str | None, list[str]]:
    """(label key, unlabeled category, classifier classes in code order)."""
    reg = mf.attr.get("registry_", {})
    labels = dict(reg.get("field_registries", {})).get("labels", {})
    state = dict(labels.get("state_registry", {}))
    key = state.get("original_key")
    unlabeled = state.get("unlabeled_category")
    mapping = [str(v) for v in np.asarray(state.get("categorical_mapping", [])).tolist()]
    classes = [c for c in mapping if c != unlabeled]
    return (str(key) if key else None), (str(unlabeled) if unlabeled is not None else None), classes


def import_scvi(
    model_dir: str | Path,
    *,
    label_key: str | None = None,
    data: Any = None,
    namespace: str = "ref",
    seed: int = 0,
) -> Any:
    """A :class:`~scarches_fl.model.ReferenceModel` whose forward pass is the saved SCVI /
    SCANVI model's (module docstring). ``data`` (an AnnData or an .h5ad path, the reference's
    cells with the model's batch key and ``label_key``) adds label prototypes; a SCANVI's
    ``adata.h5ad`` saved in ``model_dir`` is used when ``data`` is not given."""
    from scarches_fl import __version__ as ours
    from scarches_fl.model import ReferenceModel
    from scarches_fl.module import CVAE, default_hyperparameters

    model_dir = Path(model_dir)
    mf = read_model_file(model_dir / MODEL_FILE)
    registry = dict(mf.attr.get("registry_", {}))
    model_name = str(registry.get("model_name", ""))
    setup = dict(registry.get("setup_args", {}))
    params = _init_params(mf.attr)
    _check_supported(params, setup, model_name)
    fields = dict(registry.get("field_registries", {}))
    batch_state = dict(fields.get("batch", {}).get("state_registry", {}))
    batches = [str(b) for b in np.asarray(batch_state.get("categorical_mapping", [])).tolist()]
    if not batches:
        raise ScviImportError(
            "the registry names no batch categories; set the model up with a batch_key"
        )
    if not mf.var_names:
        raise ScviImportError(f"{MODEL_FILE} has no var_names (genes)")
    lay = _infer_layout(mf, len(batches), params)
    cond_map = condition_names(batches, namespace)
    conditions = [cond_map[b] for b in batches]
    scvi_label_key, unlabeled, classes = _label_record(mf)
    is_scanvi = model_name == "SCANVI"
    layer_norm = params.get("use_layer_norm", "none")
    hp_kw: dict[str, Any] = {
        "likelihood": str(params.get("gene_likelihood", "zinb")),
        "dispersion": str(params.get("dispersion", "gene")),
        "n_hidden": lay.n_hidden,
        "n_layers": lay.n_layers,
        "n_latent": lay.n_latent,
        "dropout_rate": float(params.get("dropout_rate", 0.1)),
        "use_layer_norm": layer_norm
        if isinstance(layer_norm, str)
        else ("both" if layer_norm else "none"),
        "encoder_input": "log1p",
        "n_labels": len(classes) if is_scanvi else 0,
        "classifier_weight": 0.0,
    }
    if lay.deep:
        hp_kw["inject_covariates"] = "all"
    if not lay.encode_covariates:
        hp_kw["encode_covariates"] = False
    if lay.encoder_bn or lay.decoder_bn:
        hp_kw["use_batch_norm"] = _norm_place(lay.encoder_bn, lay.decoder_bn)
    if is_scanvi:
        n_cls = len(_layer_keys(mf.state, "classifier.classifier.0.fc_layers."))
        if n_cls:
            hp_kw["classifier_layers"] = n_cls
            hp_kw["classifier_hidden"] = int(
                mf.state["classifier.classifier.0.fc_layers.Layer 0.0.weight"].shape[0]
            )
    hp = default_hyperparameters(**hp_kw)
    tensors, used = _module_tensors(mf, lay, hp, len(conditions))
    module = CVAE(hp, lay.n_genes, len(conditions), n_new_conditions=0, mode="conditions")
    module.load_tensors(tensors)
    module.eval()

    carried: dict[str, np.ndarray] = {}
    carried_keys: dict[str, dict[str, Any]] = {}
    counters: dict[str, int] = {}
    for key, arr in mf.state.items():
        if key in used:
            continue
        if arr.dtype == np.int64:
            counters[key] = int(arr.reshape(-1)[0]) if arr.size == 1 else 0
            continue
        name = _carried_name(key)
        carried[name] = np.ascontiguousarray(arr, dtype=np.float32)
        carried_keys[name] = {"key": key, "grows": _grows(key, lay)}
    record = {
        "format": "scvi-tools",
        "scvi_version": str(registry.get("scvi_version", "")),
        "model_class": model_name,
        "setup_method": str(registry.get("setup_method_name", "setup_anndata")),
        "setup_args": _jsonable(setup),
        "init_params": _jsonable(mf.attr.get("init_params_", {})),
        "field_registries": _jsonable({k: v for k, v in fields.items()}),
        "batch_categories": batches,
        "conditions": conditions,
        "namespace": namespace,
        "state_keys": list(mf.state),
        "used": used,
        "carried": carried_keys,
        "counters": counters,
        "unlabeled_category": unlabeled,
        "imported_by": f"scarches-fl {ours}",
    }
    record["field_registries"].get("X", {}).get("state_registry", {}).pop("column_names", None)
    registration: dict[str, Any] = {
        "batch_key": setup.get("batch_key"),
        "label_key": label_key or scvi_label_key,
        "layer": setup.get("layer"),
        "likelihood": hp["likelihood"],
        "input": "raw counts; encoder sees log1p(x)",
        "namespace": namespace,
        _SCVI: record,
    }
    if is_scanvi:
        registration["classifier_classes"] = classes
    model = ReferenceModel(
        module,
        genes=mf.var_names,
        conditions=conditions,
        registration=registration,
        extra_tensors=carried,
        extra_tensor_specs={k: {"role": "frozen"} for k in carried},
    )
    if data is None and is_scanvi and (model_dir / "adata.h5ad").is_file():
        data = model_dir / "adata.h5ad"
    prototype_key = label_key or scvi_label_key
    if data is not None and prototype_key:
        _add_prototypes(
            model,
            data,
            batch_key=str(setup.get("batch_key")),
            label_key=prototype_key,
            unlabeled=unlabeled,
            layer=setup.get("layer"),
            namespace=namespace,
            seed=seed,
        )
    elif data is not None:
        log.warning("no label key (--label-key, or a SCANVI's labels_key): no prototypes built")
    return model


def _grows(key: str, lay: _Layout) -> str | None:
    """How a carried tensor grows with the conditions at export: ``library`` (one column per
    batch, always), ``batch`` (the one-hot columns, none with a single batch), or not."""
    if key in ("library_log_means", "library_log_vars"):
        return "library"
    if key == "l_encoder.encoder.fc_layers.Layer 0.0.weight" and lay.encode_covariates:
        return "batch"
    return None


def _add_prototypes(
    model: Any,
    data: Any,
    *,
    batch_key: str,
    label_key: str,
    unlabeled: str | None,
    layer: str | None,
    namespace: str,
    seed: int,
) -> None:
    import anndata as ad

    from scarches_fl.labels import build_label_knowledge

    adata = ad.read_h5ad(data) if isinstance(data, (str, Path)) else data
    if label_key not in adata.obs.columns:
        raise ScviImportError(
            f"--data has no obs column {label_key!r} (columns: "
            f"{', '.join(map(str, adata.obs.columns[:10]))}); pass "
            "--label-key"
        )
    labels = adata.obs[label_key].astype(str).to_numpy()
    keep = labels != unlabeled if unlabeled is not None else np.ones(len(labels), bool)
    if not keep.any():
        raise ScviImportError(f"every cell of --data is {unlabeled!r} (unlabelled)")
    adata = adata[keep].copy() if not keep.all() else adata
    latent = model.get_latent(adata, batch_key=batch_key, namespace=namespace, layer=layer)
    manifest_labels, _atlas = build_label_knowledge(
        latent, {label_key: labels[keep]}, include_atlas=False, seed=int(seed)
    )
    model.labels = manifest_labels
    model.registration["label_key"] = label_key


def classifier_labels(
    model: Any, adata: AnnData, *, batch_key: str, namespace: str, layer: str | None = None
) -> np.ndarray:
    """The classifier's call for each cell (an imported SCANVI's ``predict()``)."""
    import torch

    classes = model.registration.get("classifier_classes")
    if not classes or "classifier.weight" not in model.module.specs:
        raise DataError("this reference has no cell-type classifier (import a SCANVI model)")
    z = model.get_latent(adata, batch_key=batch_key, namespace=namespace, layer=layer)
    with torch.no_grad():
        logits = model.module.classify(torch.from_numpy(np.asarray(z, dtype=np.float32)))
    return np.asarray(classes, dtype=object)[logits.argmax(dim=1).numpy()]


# ---------------------------------------------------------------------------------------------
# Export


def _as_arrays(value: Any, key: str = "") -> Any:
    if isinstance(value, Mapping):
        return {k: _as_arrays(v, k) for k, v in value.items()}
    if key in ("categorical_mapping", "column_names") and isinstance(value, list):
        return np.asarray(value, dtype=object)
    return value


def _grow(arr: np.ndarray, existing: int, wanted: int, *, fill_mean: bool) -> np.ndarray:
    if wanted <= existing:
        return arr
    extra_shape = list(arr.shape)
    extra_shape[-1] = wanted - existing
    if fill_mean and existing:
        fill = np.broadcast_to(arr[..., -existing:].mean(axis=-1, keepdims=True), extra_shape)
    else:
        fill = np.zeros(extra_shape, dtype=np.float32)
    return np.concatenate([arr, fill.astype(np.float32)], axis=-1)


def export_scvi(model_or_bundle: Any, out_dir: str | Path, *, force: bool = False) -> Path:
    """Write a scvi-tools model directory (``model.pt`` + ``EXPORT.json``) from a bundle
    imported with :func:`import_scvi` (and grown by any number of sites). Returns the
    directory."""
    import torch

    from scarches_fl.model import ReferenceModel

    model = model_or_bundle
    if not isinstance(model, ReferenceModel):
        model = ReferenceModel.from_bundle(model_or_bundle)
    record = model.registration.get(_SCVI)
    if not isinstance(record, Mapping) or record.get("format") != "scvi-tools":
        raise DataError(
            "this bundle was not imported from scvi-tools (no registration.scvi record): "
            "export-scvi writes back references that came in through import-scvi; a reference "
            "trained by scarches-fl uses an encoder input (log1p of counts per 10k) that "
            "scvi-tools' SCVI does not offer"
        )
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()) and not force:
        raise DataError(f"{out} exists and is not empty; choose another --out or pass --force")
    out.mkdir(parents=True, exist_ok=True)
    original = dict(zip(record["conditions"], record["batch_categories"], strict=True))
    conditions = model.conditions
    categories = [original.get(c, c) for c in conditions]
    n_cond = len(conditions)
    n_cov = n_cond if n_cond > 1 else 0
    n_cov_before = len(record["batch_categories"]) if len(record["batch_categories"]) > 1 else 0
    tensors = model.module.export_tensors()
    state: dict[str, np.ndarray] = {}
    used = dict(record["used"])
    for key, name in used.items():
        if key.endswith(".0.weight") and "fc_layers.Layer " in key and name.count(".") == 2:
            part, _layers, i = name.split(".")
            first = {"encoder": "weight_x", "decoder": "weight_z"}[part]
            main = tensors[f"{name}.{first if i == '0' else 'weight'}"]
            cond_name = f"{name}.weight_s"
            blocks = [main]
            if cond_name in tensors and n_cov:
                blocks.append(tensors[cond_name])
            state[key] = np.concatenate(blocks, axis=1)
        else:
            state[key] = tensors[name]
    for name, meta in record["carried"].items():
        arr = np.asarray(model.extra_tensors[name], dtype=np.float32)
        key = str(meta["key"])
        if meta.get("grows") == "library":
            arr = _grow(arr, int(arr.shape[-1]), n_cond, fill_mean=True)
        elif meta.get("grows") == "batch":
            arr = _grow(arr, n_cov_before, n_cov, fill_mean=False)
        state[key] = arr
    for key, value in record["counters"].items():
        state[key] = np.asarray(value, dtype=np.int64)
    ordered: collections.OrderedDict[str, Any] = collections.OrderedDict()
    for key in record["state_keys"]:
        if key in state:
            ordered[key] = torch.from_numpy(np.array(state[key], copy=True))
    ordered["pyro_param_store"] = {}  # what scvi-tools' save writes (an empty pyro store)
    fields = _as_arrays(copy.deepcopy(dict(record["field_registries"])))
    fields["batch"]["state_registry"]["categorical_mapping"] = np.asarray(categories, dtype=object)
    fields["batch"]["summary_stats"]["n_batch"] = n_cond
    x_state = fields["X"].setdefault("state_registry", {})
    x_state["column_names"] = np.asarray(model.genes, dtype=object)
    x_state["n_vars"] = len(model.genes)
    fields["X"].setdefault("summary_stats", {})["n_vars"] = len(model.genes)
    registry = {
        "scvi_version": record["scvi_version"],
        "model_name": record["model_class"],
        "setup_args": dict(record["setup_args"]),
        "setup_method_name": record["setup_method"],
        "field_registries": collections.defaultdict(dict, fields),
    }
    attr: dict[str, Any] = {
        "init_params_": copy.deepcopy(dict(record["init_params"])),
        "registry_": registry,
        "is_trained_": True,
    }
    if record["model_class"] == "SCANVI":
        attr["unlabeled_category_"] = record.get("unlabeled_category")
    torch.save(
        {
            "model_state_dict": ordered,
            "var_names": np.asarray(model.genes, dtype=object),
            "attr_dict": attr,
        },
        out / MODEL_FILE,
    )
    site_conditions = [c for c in conditions if c not in original]
    (out / EXPORT_FILE).write_text(
        json.dumps(
            {
                "format": EXPORT_FORMAT,
                "source_digest": model.digest,
                "model_class": record["model_class"],
                "batch_key": record["setup_args"].get("batch_key"),
                "batch_categories": categories,
                "site_conditions": site_conditions,
                "contains_site_data": False,
                "contents": "model weights, gene names, batch (condition) names and cell-type names "
                "only: no cells, counts, embeddings or per-cell labels of any site or of "
                "the reference",
                "load": f"scvi.model.{record['model_class']}.load(DIR, adata=ADATA); ADATA's "
                f"{record['setup_args'].get('batch_key')!r} column holds these batch "
                "categories (a site's cells: '<site>/<batch>')",
            },
            indent=2,
            sort_keys=True,
        )
        + "\n"
    )
    return out


def export_summary(path: str | Path) -> dict[str, Any]:
    """``EXPORT.json`` of an export directory."""
    return json.loads((Path(path) / EXPORT_FILE).read_text())
