"""The site's Flower ClientApp for federated reference training.

What a site does (and only this; the site admin guide in ``docs/federated.md`` says what a site
trusts when it joins):

* ``query``: answer with a descriptor signed by the site key: site id, its studies (condition
  names ``<site_id>/<batch>``) with cell counts, its gene list. No cell-level data.
* ``train``: check that the received model is the one whose digest the coordinator names
  (recomputing the bundle content digest from the manifest and arrays received), score it on the
  site's held-out cells, run the local epochs (``scarches_fl._federated.local_train``), and answer
  with the shared tensors, the site's own condition columns, the training cell count and the
  validation loss, all bound by one signed payload (its ``contribution_digest`` covers every
  array sent).
* ``evaluate``: the held-out validation loss of the received model, signed.
* ``query.label_statistics`` / ``query.label_calibration`` (only when the federation trains
  with a label key, after the last round): on the final model, per cell type with at least the
  site floor of labelled cells, the count, latent sum and scatter; then, given the pooled
  prototypes, sums over the site's labelled cells (NLL per temperature, a novelty histogram,
  correct count). Signed like a contribution (``scarches_fl._federated_labels``).
* ``query.expression_moments`` / ``query.expression_statistics`` /
  ``query.expression_calibration`` (with a label key, after those): the sums of the expression
  prototypes map's default rule reads (``scarches_fl._expression_sums``, ADR 0037): ``n``,
  ``sum x`` and ``sum x x^T`` of the log-normalised expression of all the site's labelled
  cells; then, on the pooled subspace, per type and per batch with at least the site floor of
  cells the count and sum of their scores, the type x batch count table and one second moment
  over all of them; then out-of-fold calibration sums over those cells. Signed like the label shares.

The private data never leaves the process: only tensors of the model's shape, four numbers,
and (with labels) sums over at least the site floor of cells.
The site's own Ed25519 key (``scarches-fl site keygen``) signs; Flower's SuperNode
authentication key is a separate ECDSA key that only authenticates the connection.

Node config (Deployment Engine, ``flower-supernode --node-config``): ``site-id``, ``data-path``
(an .h5ad), ``batch-key``, ``site-key`` (path to the site's private key), optional ``layer``.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = ["FederatedSiteConfig", "build_client_app", "site_config_from_node_config", "app"]

log = logging.getLogger(__name__)

_CACHE: dict[tuple, Any] = {}
_CACHE_LOCK = threading.Lock()


@dataclass
class FederatedSiteConfig:
    """One site's side of a federation. ``studies`` restricts and relabels the cells (the
    Simulation Engine splits one file into virtual sites)."""

    site_id: str
    data_path: str
    batch_key: str
    site_key_path: str
    layer: str | None = None
    studies: Mapping[str, Any] | None = None  # study name -> row indices (simulation)
    validation_fraction: float = 0.1
    #: the site's own per-site minimum (ADR 0038): no label sum over fewer of its cells leaves
    #: it, whatever smaller minimum a coordinator asks for
    label_site_minimum: int = 5

    def site_floor(self, config: Mapping[str, Any]) -> int:
        """The minimum this site applies: the federation's (``site-floor`` in the
        coordinator's config) or its own, whichever is larger."""
        return max(1, int(config["site-floor"]), int(self.label_site_minimum))


def site_config_from_node_config(node_config: Mapping[str, Any]) -> FederatedSiteConfig:
    from protocols.errors import ConfigError

    missing = [k for k in ("site-id", "data-path", "batch-key", "site-key")
               if not str(node_config.get(k, ""))]
    if missing:
        raise ConfigError(
            f"the SuperNode's --node-config lacks {missing}; start it with "
            "'scarches-fl federate supernode' (see docs/federated.md)")
    try:
        minimum = int(node_config.get("label-site-minimum", 5))
    except (TypeError, ValueError):
        minimum = 0
    if minimum < 1:
        raise ConfigError(
            f"label-site-minimum {node_config.get('label-site-minimum')!r} in the SuperNode's "
            "--node-config is not a whole number >= 1; pass 'federate supernode "
            "--label-site-minimum N' (default 5)")
    return FederatedSiteConfig(
        site_id=str(node_config["site-id"]), data_path=str(node_config["data-path"]),
        batch_key=str(node_config["batch-key"]), site_key_path=str(node_config["site-key"]),
        layer=str(node_config.get("layer", "")) or None, label_site_minimum=minimum,
    )


# -- the site's data ------------------------------------------------------------------------------


def _registered(cfg: FederatedSiteConfig, likelihood: str) -> Any:
    """The site's cells registered under the namespace ``site_id`` (cached per process)."""
    key = ("reg", cfg.site_id, cfg.data_path, cfg.batch_key, cfg.layer, likelihood,
           tuple(sorted(cfg.studies)) if cfg.studies else None)
    with _CACHE_LOCK:
        if key in _CACHE:
            return _CACHE[key]
    import anndata as ad

    from scarches_fl.data import register

    adata = ad.read_h5ad(cfg.data_path)
    if cfg.studies is not None:
        names = sorted(cfg.studies)
        rows = np.concatenate([np.asarray(cfg.studies[n], dtype=np.int64) for n in names])
        labels = np.concatenate([[n] * len(cfg.studies[n]) for n in names])
        adata = adata[rows].copy()
        adata.obs[cfg.batch_key] = labels.astype(str)
    reg = register(adata, batch_key=cfg.batch_key, namespace=cfg.site_id, likelihood=likelihood,
                   layer=cfg.layer)
    genes = [str(g) for g in adata.var_names]
    with _CACHE_LOCK:
        _CACHE[key] = (reg, genes)
    return reg, genes


def _dataset(cfg: FederatedSiteConfig, likelihood: str, conditions: list[str], seed: int,
             registration: Mapping[str, Any] | None = None) -> Any:
    """The site's cells split once; with a classifier in the model (a federation trained with
    a label key), each cell's label code in the model's ``classifier_classes`` (-1: unlabelled
    or a type the federation does not train on)."""
    from scarches_fl._federated import make_site_dataset

    registration = registration or {}
    classes = list(registration.get("classifier_classes") or [])
    label_key = registration.get("label_key") if classes else None
    key = ("ds", cfg.site_id, cfg.data_path, likelihood, tuple(conditions), seed, label_key,
           tuple(classes))
    with _CACHE_LOCK:
        if key in _CACHE:
            return _CACHE[key]
    reg, _ = _registered(cfg, likelihood)
    codes = None
    if label_key:
        from scarches_fl._federated_labels import label_codes

        codes = label_codes(_site_labels(cfg, str(label_key)), classes)
    ds = make_site_dataset(reg.x, [str(c) for c in reg.conditions], conditions,
                           validation_fraction=cfg.validation_fraction, seed=seed, labels=codes)
    with _CACHE_LOCK:
        _CACHE[key] = ds
    return ds


def _key(cfg: FederatedSiteConfig) -> Any:
    from protocols.keys import load_private_key

    return load_private_key(cfg.site_key_path)


# -- handlers -------------------------------------------------------------------------------------


def _reply(message: Any, content: Any) -> Any:
    from flwr.app import Message

    return Message(content=content, reply_to=message)


def _signed(cfg: FederatedSiteConfig, payload_type: str, payload: dict[str, Any]) -> bytes:
    from protocols.federated import sign_payload
    from protocols.keys import key_id

    key = _key(cfg)
    payload = {**payload, "site_id": cfg.site_id, "key_id": key_id(key)}
    return sign_payload(key, payload_type, payload)


def _describe(cfg: FederatedSiteConfig, message: Any) -> Any:
    from flwr.app import ConfigRecord, RecordDict

    from protocols.federated import DESCRIPTOR_PAYLOAD_TYPE

    config = message.content.config_records["config"]
    run_id = str(config["run-id"])
    reg, genes = _registered(cfg, "nb")
    names, counts = np.unique(np.asarray(reg.conditions, dtype=str), return_counts=True)
    prefix = cfg.site_id + "/"
    studies = {str(n)[len(prefix):]: int(c) for n, c in zip(names, counts, strict=True)}
    descriptor: dict[str, Any] = {
        "kind": "descriptor", "run_id": run_id, "studies": studies, "genes": genes,
    }
    if str(config.get("label-key", "")):
        # the names (no counts) of the types with at least the site floor of labelled cells
        from scarches_fl._federated_labels import site_label_types

        descriptor["label_types"] = site_label_types(
            _site_labels(cfg, str(config["label-key"])), site_floor=cfg.site_floor(config))
    env = _signed(cfg, DESCRIPTOR_PAYLOAD_TYPE, descriptor)
    return _reply(message, RecordDict({"signature": ConfigRecord({"envelope": env})}))


def _received_model(cfg: FederatedSiteConfig, message: Any) -> tuple[dict, dict, dict, Any]:
    import json

    from protocols.bundle import content_digest
    from scarches_fl.data import DataError

    content = message.content
    config = dict(content.config_records["config"])
    manifest = json.loads(bytes(config["manifest"]))
    tensors = {k: a.numpy() for k, a in content.array_records["arrays"].items()}
    if content_digest(manifest, tensors) != config["base-digest"]:
        raise DataError("the model received is not the one the coordinator's round names "
                        "(digest mismatch); refusing to train on it")
    hp = manifest["hyperparameters"]
    _, genes = _registered(cfg, str(hp["likelihood"]))
    if list(manifest["genes"]) != genes:
        raise DataError("the federation's gene list differs from this site's data; align the "
                        "data to the federation's genes first")
    ds = _dataset(cfg, str(hp["likelihood"]), list(manifest["conditions"]), int(config["seed"]),
                  manifest.get("registration"))
    return config, manifest, tensors, ds


def _train(cfg: FederatedSiteConfig, message: Any) -> Any:
    from flwr.app import ArrayRecord, ConfigRecord, MetricRecord, RecordDict

    from protocols.federated import CONTRIBUTION_PAYLOAD_TYPE, tensor_digest
    from scarches_fl import _federated as F

    config, manifest, tensors, ds = _received_model(cfg, message)
    rnd = int(config["round"])
    hp = manifest["hyperparameters"]
    G, C = len(manifest["genes"]), len(manifest["conditions"])
    val_sum, n_val = F.validation_loss(hp, G, C, tensors, ds, seed=int(config["seed"]))
    local = F.LocalTrainingConfig(
        epochs=int(config["local-epochs"]), batch_size=int(config["batch-size"]),
        lr=float(config["lr"]), kl_weight=float(config["kl-weight"]),
        prox_mu=float(config["prox-mu"]),
        seed=int(config["seed"]) * 100003 + rnd * 101 + _site_salt(cfg.site_id))
    result = F.local_train(hp, G, C, tensors, ds, local)
    own = [manifest["conditions"][j] for j in ds.own_conditions]
    train_loss = float(result.train_loss) if np.isfinite(result.train_loss) else 0.0
    payload = {
        "kind": "contribution", "run_id": str(config["run-id"]), "round": rnd,
        "base_digest": str(config["base-digest"]),
        "contribution_digest": tensor_digest(result.tensors), "n_train": int(result.n_train),
        "n_validation": int(n_val), "validation_loss_sum": float(val_sum),
        "train_loss": train_loss,
        "conditions": own,
    }
    env = _signed(cfg, CONTRIBUTION_PAYLOAD_TYPE, payload)
    arrays = ArrayRecord({k: _array(v) for k, v in result.tensors.items()})
    return _reply(message, RecordDict({
        "arrays": arrays,
        "metrics": MetricRecord({"num-examples": int(result.n_train),
                                 "train-loss": train_loss}),
        "signature": ConfigRecord({"envelope": env}),
    }))


def _evaluate(cfg: FederatedSiteConfig, message: Any) -> Any:
    from flwr.app import ConfigRecord, MetricRecord, RecordDict

    from protocols.federated import CONTRIBUTION_PAYLOAD_TYPE, tensor_digest
    from scarches_fl import _federated as F

    config, manifest, tensors, ds = _received_model(cfg, message)
    hp = manifest["hyperparameters"]
    G, C = len(manifest["genes"]), len(manifest["conditions"])
    val_sum, n_val = F.validation_loss(hp, G, C, tensors, ds, seed=int(config["seed"]))
    payload = {
        "kind": "evaluation", "run_id": str(config["run-id"]), "round": int(config["round"]),
        "base_digest": str(config["base-digest"]), "contribution_digest": tensor_digest({}),
        "n_train": int(ds.n_train), "n_validation": int(n_val),
        "validation_loss_sum": float(val_sum),
        "conditions": [manifest["conditions"][j] for j in ds.own_conditions],
    }
    env = _signed(cfg, CONTRIBUTION_PAYLOAD_TYPE, payload)
    return _reply(message, RecordDict({
        "metrics": MetricRecord({"num-examples": int(n_val)}),
        "signature": ConfigRecord({"envelope": env}),
    }))


def _site_labels(cfg: FederatedSiteConfig, label_key: str) -> np.ndarray:
    """``obs[label_key]`` of the site's cells, in the order :func:`_registered` reads them."""
    import anndata as ad

    from scarches_fl.data import DataError

    adata = ad.read_h5ad(cfg.data_path, backed="r")
    try:
        if label_key not in adata.obs:
            raise DataError(
                f"the federation asks for labels in obs[{label_key!r}], which this site's data "
                f"lacks (obs has {list(adata.obs.columns)[:10]}); the site sends no label "
                "statistics"
            )
        values = adata.obs[label_key].astype(object).to_numpy()
    finally:
        adata.file.close()
    if cfg.studies is not None:
        rows = np.concatenate(
            [np.asarray(cfg.studies[n], dtype=np.int64) for n in sorted(cfg.studies)]
        )
        values = values[rows]
    return values


def _label_share(cfg: FederatedSiteConfig, message: Any, task: str) -> Any:
    """Label statistics (or calibration sums) of the site's labelled cells on the final model,
    signed: only per-type sums and counts (types below the site floor withheld) or sums over
    all cells leave (``scarches_fl._federated_labels``)."""
    import json

    from flwr.app import ArrayRecord, ConfigRecord, RecordDict

    from protocols.federated import LABEL_SHARE_PAYLOAD_TYPE, tensor_digest
    from scarches_fl import _federated as F
    from scarches_fl import _federated_labels as FL

    config, manifest, tensors, ds = _received_model(cfg, message)
    hp = manifest["hyperparameters"]
    G, C = len(manifest["genes"]), len(manifest["conditions"])
    labels = _site_labels(cfg, str(config["label-key"]))
    z = F.site_latent(hp, G, C, tensors, ds)
    if task == "label_statistics":
        stats = FL.site_statistics(z, labels, site_floor=cfg.site_floor(config))
        types, arrays = FL.statistics_to_arrays(stats)
    else:
        model = json.loads(bytes(config["prototype-model"]))
        arrays = FL.site_calibration(model, z, labels)
        if 0 < arrays["counts"][0] < cfg.site_floor(config):
            # sums over fewer cells than the minimum stay here: the share says "none scored"
            arrays = {k: np.zeros_like(v) for k, v in arrays.items()}
        types = [str(c) for c in model["classes"]]
    payload = {
        "kind": "label_share", "task": task, "run_id": str(config["run-id"]),
        "base_digest": str(config["base-digest"]), "share_digest": tensor_digest(arrays),
        "types": types,
    }
    env = _signed(cfg, LABEL_SHARE_PAYLOAD_TYPE, payload)
    from flwr.app import Array

    record = ArrayRecord({k: Array(np.ascontiguousarray(v, dtype=np.float64))
                          for k, v in arrays.items()})
    return _reply(message, RecordDict({
        "arrays": record, "signature": ConfigRecord({"envelope": env}),
    }))


def _expression_share(cfg: FederatedSiteConfig, message: Any, task: str) -> Any:
    """The site's sums for the bundle's expression prototypes (module docstring), signed; an
    empty share when fewer than the site floor of its cells are labelled."""
    from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict

    from protocols.federated import LABEL_SHARE_PAYLOAD_TYPE, tensor_digest
    from scarches_fl import _expression_sums as ES
    from scarches_fl.labels import _clean_labels

    config, manifest, _tensors, _ds = _received_model(cfg, message)
    reg, _ = _registered(cfg, str(manifest["hyperparameters"]["likelihood"]))
    raw = _site_labels(cfg, str(config["label-key"]))
    labels = _clean_labels(raw, len(raw), str(config["label-key"]))
    floor = cfg.site_floor(config)
    types: list[str] = []
    arrays: dict[str, np.ndarray] = {}
    if sum(v is not None for v in labels) >= floor:
        if task == "expression_moments":
            arrays = ES.moments_to_arrays(ES.site_expression_moments(reg.x, labels))
        else:
            g, p = len(manifest["genes"]), int(config["expression-n-components"])
            projection = (
                np.frombuffer(bytes(config["expression-gene-mean"]), dtype="<f4").reshape(g),
                np.frombuffer(bytes(config["expression-components"]), dtype="<f4").reshape(p, g),
            )
            if task == "expression_statistics":
                classes = [str(c) for c in json.loads(bytes(config["expression-classes"]))]
                sums = ES.site_sums(reg.x, labels, reg.batches, projection, classes, floor=floor)
                types, arrays = ES.sums_to_arrays(sums)
            else:
                model = ES.model_from_json(bytes(config["expression-model"]))
                arrays = ES.site_calibration(
                    reg.x, labels, reg.batches, projection, model, floor=floor,
                    kappa=float(config["expression-kappa"]),
                    seed=int(config["seed"]) * 100003 + _site_salt(cfg.site_id))
    payload = {
        "kind": "label_share", "task": task, "run_id": str(config["run-id"]),
        "base_digest": str(config["base-digest"]), "share_digest": tensor_digest(arrays),
        "types": types,
    }
    env = _signed(cfg, LABEL_SHARE_PAYLOAD_TYPE, payload)
    record = ArrayRecord({k: Array(np.ascontiguousarray(v, dtype=np.float64))
                          for k, v in arrays.items()})
    return _reply(message, RecordDict({
        "arrays": record, "signature": ConfigRecord({"envelope": env}),
    }))


def _array(v: np.ndarray) -> Any:
    from flwr.app import Array

    return Array(np.ascontiguousarray(v, dtype=np.float32))


def _site_salt(site_id: str) -> int:
    import hashlib

    return int.from_bytes(hashlib.sha256(site_id.encode()).digest()[:2], "big")


def build_client_app(resolve: Callable[[Any], FederatedSiteConfig], *, mods: Sequence[Any] = ()) -> Any:
    """A ``ClientApp`` whose site is ``resolve(context)``. ``mods``: Flower client mods wrapped
    around every handler (the deployed app has none; tests inject faults with them)."""
    from flwr.clientapp import ClientApp

    client_app = ClientApp(mods=list(mods))

    @client_app.query()
    def _q(message: Any, context: Any) -> Any:
        return _describe(resolve(context), message)

    @client_app.query("label_statistics")
    def _ls(message: Any, context: Any) -> Any:
        return _label_share(resolve(context), message, "label_statistics")

    @client_app.query("label_calibration")
    def _lc(message: Any, context: Any) -> Any:
        return _label_share(resolve(context), message, "label_calibration")

    @client_app.query("expression_moments")
    def _em(message: Any, context: Any) -> Any:
        return _expression_share(resolve(context), message, "expression_moments")

    @client_app.query("expression_statistics")
    def _es(message: Any, context: Any) -> Any:
        return _expression_share(resolve(context), message, "expression_statistics")

    @client_app.query("expression_calibration")
    def _ec(message: Any, context: Any) -> Any:
        return _expression_share(resolve(context), message, "expression_calibration")

    @client_app.train()
    def _t(message: Any, context: Any) -> Any:
        return _train(resolve(context), message)

    @client_app.evaluate()
    def _e(message: Any, context: Any) -> Any:
        return _evaluate(resolve(context), message)

    return client_app


def _from_node_config(context: Any) -> FederatedSiteConfig:
    return site_config_from_node_config(context.node_config)


try:  # the Deployment Engine loads ``site_agent.federated_client:app``
    app = build_client_app(_from_node_config)
except ImportError:  # pragma: no cover - flwr not installed (extra "flower")
    app = None
