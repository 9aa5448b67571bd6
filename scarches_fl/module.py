"""The conditional VAE as a pure ``torch.nn.Module``: tensors, forward pieces and loss terms.

The module never sees an optimizer, data loader or AnnData (see ``train.py`` and ``model.py``).

Architecture (scArches / scVI):

* encoder: ``h1 = W_x x + W_s s + b`` (x = log1p counts for NB, log-normalized for trVAE; s the
  one-hot condition), then LayerNorm (no affine), ReLU, dropout; ``n_layers - 1`` more
  Linear/LayerNorm/ReLU/dropout layers; linear heads for the posterior mean and log-variance.
* decoder: ``g1 = W_z z + W_s s + b``, LayerNorm, ReLU; ``n_layers - 1`` more hidden layers; output
  ``softmax`` scale times the observed library size (NB) or ReLU of a linear map (trVAE, MSE on
  log-normalized values, plus MMD between conditions on ``g1``'s activations).

Options for references imported from scvi-tools (``scarches_fl.scvi_interop``), each stored in the
hyperparameters only when it differs from the default, so bundles that do not use them keep their
digests: ``inject_covariates`` (``"first"``: the condition enters the first layer only; ``"all"``:
every hidden layer, scvi-tools' default), ``encode_covariates`` (``False``: the encoder does not
see the condition at all, scvi-tools' default), ``use_batch_norm`` / ``use_layer_norm``
(``"none"``, ``"encoder"``, ``"decoder"``, ``"both"``; ``use_layer_norm`` also takes the booleans
of older bundles; batch norm always normalises with its stored running statistics, so it is
supported for imported references, not for training one), ``likelihood="zinb"`` (a gene-wise
zero-inflation logit from a linear head on the last decoder layer), and a classifier with
``classifier_layers`` hidden layers of ``classifier_hidden`` units (scANVI's) instead of a linear
one.

Every tensor lives in a named *slot*. A ``condition`` tensor (the ``W_s`` blocks, a per-condition
dispersion) is split in two slots along its condition axis: the columns that existed before
surgery (``old``) and the new ones (``new``); the forward pass concatenates them. Each slot is
either a ``Parameter`` (trainable) or a buffer (frozen), decided once when the module is built for
a training mode. A frozen slot is not a parameter, so no optimizer can ever see it: weight decay
and Adam state cannot move it. That is how ``conditions`` mode keeps every pre-existing number
bit-identical, by construction rather than by gradient hooks.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "CVAE",
    "LossTerms",
    "Minibatch",
    "TensorSpec",
    "tensor_specs",
    "TRAINING_MODES",
    "default_hyperparameters",
    "LIKELIHOODS",
    "OPTION_DEFAULTS",
    "norm_flags",
    "option",
]

TRAINING_MODES = ("reference", "conditions", "input_layers", "full")
_VAR_EPS = 1e-4
_LOG_EPS = 1e-8
# Multi-scale RBF bandwidths for the trVAE MMD (as in the trVAE paper's kernel).
_MMD_SCALES = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 1.0, 5.0, 10.0, 15.0, 20.0, 25.0, 30.0, 35.0,
               100.0, 1e3, 1e4, 1e5, 1e6)


def default_hyperparameters(**overrides: Any) -> dict[str, Any]:
    """Module hyperparameters (JSON scalars) with scArches / scvi-tools tutorial defaults."""
    hp: dict[str, Any] = {
        "likelihood": "nb",
        "dispersion": "gene",
        "n_hidden": 128,
        "n_layers": 2,
        "n_latent": 10,
        "dropout_rate": 0.1,
        "use_layer_norm": True,
        "library": "observed",
        # Encoder input: "log1p" (scVI) or "log1p_cp10k" (log1p of counts scaled to target_sum
        # per cell; library-size free, so studies with very different depths start comparable).
        "encoder_input": "log1p_cp10k",
        "target_sum": 1e4,
        "mmd_weight": 1.0,
        # Semi-supervised reference training (scANVI-like): with a label key, a linear
        # classifier on the posterior mean adds classifier_weight * cross-entropy to the loss.
        "n_labels": 0,
        "classifier_weight": 0.0,
        "module_version": 1,
    }
    for k, v in overrides.items():
        if v is not None:
            hp[k] = v
    if hp["likelihood"] not in LIKELIHOODS:
        raise ValueError(f"likelihood must be one of {LIKELIHOODS}, not {hp['likelihood']!r}")
    if hp["dispersion"] not in ("gene", "gene-batch"):
        raise ValueError(f"dispersion must be 'gene' or 'gene-batch', not {hp['dispersion']!r}")
    if int(hp["n_layers"]) < 1:
        raise ValueError("n_layers must be at least 1")
    if option(hp, "inject_covariates") not in ("first", "all"):
        raise ValueError("inject_covariates must be 'first' or 'all', "
                         f"not {hp['inject_covariates']!r}")
    if not isinstance(option(hp, "encode_covariates"), bool):
        raise ValueError("encode_covariates must be true or false")
    for key in ("use_batch_norm", "use_layer_norm"):
        value = option(hp, key)
        if not isinstance(value, bool) and value not in NORM_PLACES:
            raise ValueError(f"{key} must be one of {NORM_PLACES}, not {value!r}")
    if int(option(hp, "classifier_layers")) < 0 or int(option(hp, "classifier_hidden")) < 0:
        raise ValueError("classifier_layers and classifier_hidden must be >= 0")
    if int(option(hp, "classifier_layers")) > 0 and int(option(hp, "classifier_hidden")) < 1:
        raise ValueError("a classifier with hidden layers needs classifier_hidden >= 1")
    return hp


LIKELIHOODS = ("nb", "zinb", "trvae")
NORM_PLACES = ("none", "encoder", "decoder", "both")
#: Options absent from older bundles' hyperparameters, with the value that absence means.
OPTION_DEFAULTS: dict[str, Any] = {
    "inject_covariates": "first",
    "encode_covariates": True,
    "use_batch_norm": "none",
    "classifier_layers": 0,
    "classifier_hidden": 0,
}
BATCH_NORM_EPS = 1e-3  # scvi-tools' BatchNorm1d(eps=0.001)


def option(hp: Mapping[str, Any], key: str) -> Any:
    """``hp[key]``, or what its absence means (:data:`OPTION_DEFAULTS`)."""
    return hp.get(key, OPTION_DEFAULTS.get(key))


def norm_flags(hp: Mapping[str, Any], part: str) -> tuple[bool, bool]:
    """(batch norm, layer norm) of the hidden layers of ``part`` (``encoder`` / ``decoder``)."""
    bn = option(hp, "use_batch_norm")
    ln = hp.get("use_layer_norm", True)
    if isinstance(ln, bool):
        ln = "both" if ln else "none"
    if isinstance(bn, bool):
        bn = "both" if bn else "none"
    return bn in (part, "both"), ln in (part, "both")


@dataclass(frozen=True)
class TensorSpec:
    shape: tuple[int, ...]
    role: str  # "frozen" | "condition"
    axis: int | None = None  # condition axis
    fan_in: int = 1

    @property
    def condition_axis(self) -> int:
        """The axis along which a ``condition`` tensor grows (an error for a frozen one)."""
        if self.axis is None:
            raise ValueError(f"a {self.role} tensor has no condition axis")
        return self.axis


def _batch_norm_specs(s: dict[str, TensorSpec], prefix: str, width: int) -> None:
    for part in _BN_PARTS:
        s[f"{prefix}.bn.{part}"] = TensorSpec((width,), "frozen", None, 0)


_BN_PARTS = ("weight", "bias", "running_mean", "running_var")


def tensor_specs(hp: Mapping[str, Any], n_genes: int, n_conditions: int) -> dict[str, TensorSpec]:
    """Name -> shape/role of every tensor of the module, in a fixed order."""
    h, nl, lat = int(hp["n_hidden"]), int(hp["n_layers"]), int(hp["n_latent"])
    c = n_conditions
    deep = option(hp, "inject_covariates") == "all"
    enc_cov = bool(option(hp, "encode_covariates"))
    enc_bn, _ = norm_flags(hp, "encoder")
    dec_bn, _ = norm_flags(hp, "decoder")
    s: dict[str, TensorSpec] = {}
    fan = n_genes + (c if enc_cov else 0)
    s["encoder.layers.0.weight_x"] = TensorSpec((h, n_genes), "frozen", None, fan)
    if enc_cov:
        s["encoder.layers.0.weight_s"] = TensorSpec((h, c), "condition", 1, fan)
    s["encoder.layers.0.bias"] = TensorSpec((h,), "frozen", None, fan)
    if enc_bn:
        _batch_norm_specs(s, "encoder.layers.0", h)
    for i in range(1, nl):
        fan = h + (c if deep and enc_cov else 0)
        s[f"encoder.layers.{i}.weight"] = TensorSpec((h, h), "frozen", None, fan)
        if deep and enc_cov:
            s[f"encoder.layers.{i}.weight_s"] = TensorSpec((h, c), "condition", 1, fan)
        s[f"encoder.layers.{i}.bias"] = TensorSpec((h,), "frozen", None, fan)
        if enc_bn:
            _batch_norm_specs(s, f"encoder.layers.{i}", h)
    for head in ("mean", "var"):
        s[f"encoder.{head}.weight"] = TensorSpec((lat, h), "frozen", None, h)
        s[f"encoder.{head}.bias"] = TensorSpec((lat,), "frozen", None, h)
    fan = lat + c
    s["decoder.layers.0.weight_z"] = TensorSpec((h, lat), "frozen", None, fan)
    s["decoder.layers.0.weight_s"] = TensorSpec((h, c), "condition", 1, fan)
    s["decoder.layers.0.bias"] = TensorSpec((h,), "frozen", None, fan)
    if dec_bn:
        _batch_norm_specs(s, "decoder.layers.0", h)
    for i in range(1, nl):
        fan = h + (c if deep else 0)
        s[f"decoder.layers.{i}.weight"] = TensorSpec((h, h), "frozen", None, fan)
        if deep:
            s[f"decoder.layers.{i}.weight_s"] = TensorSpec((h, c), "condition", 1, fan)
        s[f"decoder.layers.{i}.bias"] = TensorSpec((h,), "frozen", None, fan)
        if dec_bn:
            _batch_norm_specs(s, f"decoder.layers.{i}", h)
    s["decoder.out.weight"] = TensorSpec((n_genes, h), "frozen", None, h)
    s["decoder.out.bias"] = TensorSpec((n_genes,), "frozen", None, h)
    if hp["likelihood"] == "zinb":
        s["decoder.dropout.weight"] = TensorSpec((n_genes, h), "frozen", None, h)
        s["decoder.dropout.bias"] = TensorSpec((n_genes,), "frozen", None, h)
    n_labels = int(hp.get("n_labels", 0) or 0)
    if n_labels > 0:
        n_cls_layers = int(option(hp, "classifier_layers"))
        ch = int(option(hp, "classifier_hidden"))
        width = lat
        for i in range(n_cls_layers):
            s[f"classifier.layers.{i}.weight"] = TensorSpec((ch, width), "frozen", None, width)
            s[f"classifier.layers.{i}.bias"] = TensorSpec((ch,), "frozen", None, width)
            if enc_bn:
                _batch_norm_specs(s, f"classifier.layers.{i}", ch)
            width = ch
        s["classifier.weight"] = TensorSpec((n_labels, width), "frozen", None, width)
        s["classifier.bias"] = TensorSpec((n_labels,), "frozen", None, width)
    if hp["likelihood"] in ("nb", "zinb"):
        if hp["dispersion"] == "gene-batch":
            s["px_r"] = TensorSpec((n_genes, c), "condition", 1, 0)
        else:
            s["px_r"] = TensorSpec((n_genes,), "frozen", None, 0)
    return s


_INPUT_LAYER_TENSORS = (
    "encoder.layers.0.weight_x", "encoder.layers.0.weight_s", "encoder.layers.0.bias",
    "decoder.layers.0.weight_z", "decoder.layers.0.weight_s", "decoder.layers.0.bias",
)


def _slot(name: str, part: str = "") -> str:
    return name.replace(".", "__") + (f"__{part}" if part else "")


@dataclass
class Minibatch:
    """One minibatch, built by the trainer. ``rows/cols/vals`` are the nonzero counts (sparse);
    ``x_in`` the dense transformed input (or ``None`` when ``h0`` is precomputed)."""

    cond: torch.Tensor  # (B,) int64 condition index
    lib: torch.Tensor  # (B,) float32 observed library size
    rows: torch.Tensor  # (nnz,) int64 row within batch
    cols: torch.Tensor  # (nnz,) int64 gene
    vals: torch.Tensor  # (nnz,) float32 raw count
    x_in: torch.Tensor | None = None  # (B, G) transformed input
    h0: torch.Tensor | None = None  # (B, H) precomputed W_x x + b
    const: torch.Tensor | None = None  # (B,) per-cell constant of the log-likelihood, if known
    flat: torch.Tensor | None = None  # (nnz,) rows * n_genes + cols (1-D gathers are faster)
    labels: torch.Tensor | None = None  # (B,) int64 label code, -1 = unlabelled

    def dense_input(self) -> torch.Tensor:
        """``x_in``; an error when the trainer built this minibatch with ``h0`` only."""
        if self.x_in is None:
            raise ValueError("this minibatch carries no dense input (h0 was precomputed)")
        return self.x_in

    def flat_index(self, n_genes: int) -> torch.Tensor:
        if self.flat is None:
            self.flat = self.rows * n_genes + self.cols
        return self.flat

    @property
    def size(self) -> int:
        return int(self.cond.shape[0])


@dataclass
class LossTerms:
    loss: torch.Tensor  # what is minimised: mean over cells of recon + kl_weight*kl (+ mmd)
    reconstruction: torch.Tensor  # sum over cells
    kl: torch.Tensor  # sum over cells
    mmd: torch.Tensor
    n_cells: int
    classification: torch.Tensor | None = None


class CVAE(nn.Module):
    """Conditional VAE with split (frozen/new) condition columns. See module docstring."""

    def __init__(
        self, hyperparameters: Mapping[str, Any], n_genes: int, n_conditions: int, *,
        n_new_conditions: int | None = None, mode: str = "reference",
    ) -> None:
        super().__init__()
        if mode not in TRAINING_MODES:
            raise ValueError(f"mode must be one of {TRAINING_MODES}, not {mode!r}")
        self.hp = dict(hyperparameters)
        self.n_genes = int(n_genes)
        self.n_conditions = int(n_conditions)
        n_new = n_conditions if n_new_conditions is None else int(n_new_conditions)
        if mode == "reference":
            n_new = n_conditions
        self.n_old = n_conditions - n_new
        self.mode = mode
        self.specs = tensor_specs(self.hp, n_genes, n_conditions)
        self.n_layers = int(self.hp["n_layers"])
        self.dropout_rate = float(self.hp["dropout_rate"])
        self.likelihood = str(self.hp["likelihood"])
        self.encoder_norms = norm_flags(self.hp, "encoder")
        self.decoder_norms = norm_flags(self.hp, "decoder")
        self.deep_covariates = option(self.hp, "inject_covariates") == "all"
        self.encode_covariates = bool(option(self.hp, "encode_covariates"))
        self.classifier_layers = int(option(self.hp, "classifier_layers"))
        if mode == "reference" and (self.encoder_norms[0] or self.decoder_norms[0]):
            raise ValueError(
                "batch norm normalises with stored running statistics and cannot train a "
                "reference; use layer norm (use_batch_norm='none') or import a trained one"
            )
        for name, spec in self.specs.items():
            if spec.role == "condition":
                ax = spec.condition_axis
                old_shape = list(spec.shape)
                old_shape[ax] = self.n_old
                new_shape = list(spec.shape)
                new_shape[ax] = n_new
                self._make_slot(_slot(name, "old"), old_shape, self._trainable(name, old=True))
                self._make_slot(_slot(name, "new"), new_shape, True)
            else:
                self._make_slot(_slot(name), list(spec.shape), self._trainable(name))

    # -- slots --------------------------------------------------------------------------------

    def _trainable(self, name: str, *, old: bool = False) -> bool:
        if name.endswith((".bn.running_mean", ".bn.running_var")):
            return False  # statistics, never optimised
        if self.mode in ("reference", "full"):
            return True
        if self.mode == "input_layers":
            return name in _INPUT_LAYER_TENSORS
        return False  # conditions: only the new columns

    def _make_slot(self, attr: str, shape: list[int], trainable: bool) -> None:
        t = torch.zeros(shape, dtype=torch.float32)
        if trainable:
            setattr(self, attr, nn.Parameter(t))
        else:
            self.register_buffer(attr, t)

    def _slots_of(self, name: str) -> list[str]:
        if self.specs[name].role == "condition":
            return [_slot(name, "old"), _slot(name, "new")]
        return [_slot(name)]

    def tensor(self, name: str) -> torch.Tensor:
        """The full tensor ``name`` (old and new condition columns concatenated)."""
        spec = self.specs[name]
        if spec.role == "condition":
            return torch.cat(
                [getattr(self, _slot(name, "old")), getattr(self, _slot(name, "new"))],
                dim=spec.condition_axis,
            )
        return getattr(self, _slot(name))

    def trainable_parameter_count(self) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad)

    @torch.no_grad()
    def load_tensors(self, tensors: Mapping[str, Any], *, strict: bool = True) -> None:
        """Fill slots from full tensors (numpy or torch). With fewer condition columns than the
        module has, the missing new columns are left for :meth:`init_new_conditions`."""
        for name, spec in self.specs.items():
            if name not in tensors:
                if strict:
                    raise KeyError(f"tensor {name!r} missing")
                continue
            src = torch.from_numpy(np.array(tensors[name], dtype=np.float32, copy=True))
            if spec.role == "condition":
                ax = spec.condition_axis
                n_src = src.shape[ax]
                old = getattr(self, _slot(name, "old"))
                new = getattr(self, _slot(name, "new"))
                if n_src == self.n_conditions:
                    old.copy_(src.narrow(ax, 0, self.n_old))
                    new.copy_(src.narrow(ax, self.n_old, self.n_conditions - self.n_old))
                elif n_src == self.n_old:
                    old.copy_(src)
                else:
                    raise ValueError(f"tensor {name!r} has {n_src} condition columns")
            else:
                if tuple(src.shape) != spec.shape:
                    raise ValueError(f"tensor {name!r} has shape {tuple(src.shape)}, "
                                     f"expected {spec.shape}")
                getattr(self, _slot(name)).copy_(src)

    @torch.no_grad()
    def init_reference(self, generator: torch.Generator) -> None:
        """Random initialisation as ``nn.Linear`` would (uniform +-1/sqrt(fan_in)), NB
        log-dispersion from N(0, 1) as scVI."""
        for name, spec in self.specs.items():
            for attr in self._slots_of(name):
                t = getattr(self, attr)
                if name == "px_r":
                    t.copy_(torch.randn(t.shape, generator=generator))
                elif name.endswith((".bn.weight", ".bn.running_var")):
                    t.fill_(1.0)
                elif name.endswith((".bn.bias", ".bn.running_mean")):
                    t.zero_()
                else:
                    bound = 1.0 / math.sqrt(max(spec.fan_in, 1))
                    t.copy_((torch.rand(t.shape, generator=generator) * 2 - 1) * bound)

    @torch.no_grad()
    def init_new_conditions(self) -> None:
        """New condition columns start at the mean of the existing columns: before fine-tuning
        a new study is treated like an average reference study."""
        for name, spec in self.specs.items():
            if spec.role != "condition":
                continue
            old = getattr(self, _slot(name, "old"))
            new = getattr(self, _slot(name, "new"))
            if old.shape[spec.condition_axis] == 0:
                new.zero_()
            else:
                mean = old.mean(dim=spec.condition_axis, keepdim=True)
                new.copy_(mean.expand_as(new))

    def export_tensors(self) -> dict[str, np.ndarray]:
        """Every full tensor as a float32 numpy array (copies)."""
        return {
            name: self.tensor(name).detach().cpu().numpy().astype(np.float32, copy=True)
            for name in self.specs
        }

    # -- forward pieces -----------------------------------------------------------------------

    def transform_values(self, vals: torch.Tensor, lib_per_val: torch.Tensor) -> torch.Tensor:
        """Encoder input transform, value-wise (sparse-preserving: f(0) == 0)."""
        if self.likelihood == "trvae" or self.hp.get("encoder_input") == "log1p_cp10k":
            return torch.log1p(vals / lib_per_val.clamp_min(1.0) * float(self.hp["target_sum"]))
        return torch.log1p(vals)

    def first_layer_genes(self, x_in: torch.Tensor) -> torch.Tensor:
        """The gene part of the encoder's first layer, ``W_x x + b`` (constant in conditions
        mode: precomputed once per cell)."""
        return F.linear(x_in, self.tensor("encoder.layers.0.weight_x"),
                        self.tensor("encoder.layers.0.bias"))

    def _act(self, h: torch.Tensor, *, dropout: bool, prefix: str = "",
             norms: tuple[bool, bool] = (False, True)) -> torch.Tensor:
        batch_norm, layer_norm = norms
        if batch_norm:
            h = F.batch_norm(h, self.tensor(f"{prefix}.bn.running_mean"),
                             self.tensor(f"{prefix}.bn.running_var"),
                             self.tensor(f"{prefix}.bn.weight"), self.tensor(f"{prefix}.bn.bias"),
                             training=False, eps=BATCH_NORM_EPS)
        if layer_norm:
            h = F.layer_norm(h, h.shape[-1:])
        h = F.relu(h)
        if dropout and self.dropout_rate > 0:
            h = F.dropout(h, self.dropout_rate, training=self.training)
        return h

    def _condition_term(self, name: str, cond: torch.Tensor) -> torch.Tensor:
        return self.tensor(name).t()[cond]

    def encode(self, h0: torch.Tensor, cond: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Posterior mean and variance from the first layer's gene part ``h0``."""
        norms = self.encoder_norms
        if self.encode_covariates:
            h0 = h0 + self._condition_term("encoder.layers.0.weight_s", cond)
        h = self._act(h0, dropout=True, prefix="encoder.layers.0", norms=norms)
        for i in range(1, self.n_layers):
            pre = F.linear(h, self.tensor(f"encoder.layers.{i}.weight"),
                           self.tensor(f"encoder.layers.{i}.bias"))
            if self.deep_covariates and self.encode_covariates:
                pre = pre + self._condition_term(f"encoder.layers.{i}.weight_s", cond)
            h = self._act(pre, dropout=True, prefix=f"encoder.layers.{i}", norms=norms)
        mean = F.linear(h, self.tensor("encoder.mean.weight"), self.tensor("encoder.mean.bias"))
        var = torch.exp(F.linear(h, self.tensor("encoder.var.weight"),
                                 self.tensor("encoder.var.bias"))) + _VAR_EPS
        return mean, var

    def decode_hidden(self, z: torch.Tensor,
                      cond: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(first decoder layer activations, last hidden layer activations)."""
        norms = self.decoder_norms
        pre = F.linear(z, self.tensor("decoder.layers.0.weight_z"),
                       self.tensor("decoder.layers.0.bias"))
        g1 = self._act(pre + self._condition_term("decoder.layers.0.weight_s", cond),
                       dropout=False, prefix="decoder.layers.0", norms=norms)
        h = g1
        for i in range(1, self.n_layers):
            pre = F.linear(h, self.tensor(f"decoder.layers.{i}.weight"),
                           self.tensor(f"decoder.layers.{i}.bias"))
            if self.deep_covariates:
                pre = pre + self._condition_term(f"decoder.layers.{i}.weight_s", cond)
            h = self._act(pre, dropout=False, prefix=f"decoder.layers.{i}", norms=norms)
        return g1, h

    def decode(self, z: torch.Tensor, cond: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (first decoder layer activations, output pre-activation)."""
        g1, h = self.decode_hidden(z, cond)
        return g1, F.linear(h, self.tensor("decoder.out.weight"), self.tensor("decoder.out.bias"))

    def classify(self, mean: torch.Tensor) -> torch.Tensor:
        """Classifier logits from the posterior mean (hidden layers use the encoder's norms)."""
        h = mean
        for i in range(self.classifier_layers):
            h = self._act(F.linear(h, self.tensor(f"classifier.layers.{i}.weight"),
                                   self.tensor(f"classifier.layers.{i}.bias")),
                          dropout=True, prefix=f"classifier.layers.{i}",
                          norms=self.encoder_norms)
        return F.linear(h, self.tensor("classifier.weight"), self.tensor("classifier.bias"))

    def log_theta(self, cond: torch.Tensor) -> torch.Tensor:
        px_r = self.tensor("px_r")
        if px_r.dim() == 2:
            return px_r.t()[cond]  # (B, G)
        return px_r.unsqueeze(0)  # (1, G)

    # -- loss ---------------------------------------------------------------------------------

    def nb_sparse_constant(self, mb: Minibatch) -> torch.Tensor:
        """Per-cell sum over nonzeros of ``lgamma(x+theta) - lgamma(theta) - lgamma(x+1)``;
        constant when the dispersion is frozen (precomputed once by the trainer)."""
        log_theta = self.log_theta(mb.cond)
        lt = log_theta[mb.rows, mb.cols] if log_theta.shape[0] > 1 else log_theta[0, mb.cols]
        theta = torch.exp(lt)
        v = mb.vals
        term = torch.lgamma(v + theta) - torch.lgamma(theta) - torch.lgamma(v + 1.0)
        return term.new_zeros(mb.size).index_add_(0, mb.rows, term)

    def reconstruction(self, mb: Minibatch, out: torch.Tensor,
                       dropout_logits: torch.Tensor | None = None) -> torch.Tensor:
        """Sum over cells of the negative log-likelihood (NB, ZINB with ``dropout_logits``) or
        squared error (trVAE), computed from the dense decoder output and the *sparse* observed
        values."""
        if self.likelihood in ("nb", "zinb"):
            logp = F.log_softmax(out, dim=-1)  # log of the decoder's scale
            log_lib = torch.log(mb.lib.clamp_min(_LOG_EPS))
            mu = torch.exp(logp) * mb.lib.unsqueeze(1)
            log_theta = self.log_theta(mb.cond)
            theta = torch.exp(log_theta)
            log_theta_mu = torch.log(theta + mu + _LOG_EPS)
            if self.likelihood == "zinb":
                return self._zinb_nll(mb, logp, log_lib, log_theta, theta, log_theta_mu,
                                      dropout_logits)
            # Dense part (every gene): theta * (log theta - log(theta + mu)).
            dense = (theta * (log_theta - log_theta_mu)).sum()
            # Sparse part (x > 0 only): x * (log mu - log(theta + mu)) + lgamma terms.
            r, v = mb.rows, mb.vals
            flat = mb.flat_index(self.n_genes)
            log_mu = logp.reshape(-1).index_select(0, flat) + log_lib[r]
            sparse = (v * (log_mu - log_theta_mu.reshape(-1).index_select(0, flat))).sum()
            if mb.const is not None:
                const = mb.const.sum()
            else:
                const = self.nb_sparse_constant(mb).sum()
            return -(dense + sparse + const)
        # trVAE: MSE on log-normalized values, sum over genes.
        recon = F.relu(out)
        y = self.transform_values(mb.vals, mb.lib[mb.rows])
        cross = (recon.reshape(-1).index_select(0, mb.flat_index(self.n_genes)) * y).sum()
        return (recon * recon).sum() - 2.0 * cross + (y * y).sum()

    def _zinb_nll(self, mb: Minibatch, logp: torch.Tensor, log_lib: torch.Tensor,
                  log_theta: torch.Tensor, theta: torch.Tensor, log_theta_mu: torch.Tensor,
                  pi: torch.Tensor | None) -> torch.Tensor:
        """Zero-inflated NB (scvi-tools' ``log_zinb_positive``, ``pi`` the zero-inflation
        logits): the zero case summed densely over every gene, then corrected at the nonzeros
        to the nonzero case."""
        if pi is None:
            raise ValueError("the ZINB likelihood needs the decoder's dropout logits")
        softplus_pi = F.softplus(-pi)
        pi_theta_log = -pi + theta * (log_theta - log_theta_mu)
        case_zero = F.softplus(pi_theta_log) - softplus_pi
        r, v = mb.rows, mb.vals
        flat = mb.flat_index(self.n_genes)

        def at(t: torch.Tensor) -> torch.Tensor:
            return t.expand_as(pi).reshape(-1).index_select(0, flat)

        log_mu = logp.reshape(-1).index_select(0, flat) + log_lib[r]
        nonzero = (-at(softplus_pi) + at(pi_theta_log) - at(case_zero)
                   + v * (log_mu - at(log_theta_mu))).sum()
        const = mb.const.sum() if mb.const is not None else self.nb_sparse_constant(mb).sum()
        return -(case_zero.sum() + nonzero + const)

    def mmd(self, g1: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """Sum over condition pairs in the minibatch of the multi-scale RBF MMD on ``g1``."""
        groups = [g1[cond == c] for c in torch.unique(cond)]
        groups = [g for g in groups if g.shape[0] > 0]
        total = g1.new_zeros(())
        if len(groups) < 2:
            return total
        for i in range(len(groups)):
            for j in range(i):
                total = total + _mmd_rbf(groups[i], groups[j])
        return total

    def loss(
        self, mb: Minibatch, *, kl_weight: float = 1.0, generator: torch.Generator | None = None,
        sample: bool = True,
    ) -> LossTerms:
        h0 = mb.h0 if mb.h0 is not None else self.first_layer_genes(mb.dense_input())
        mean, var = self.encode(h0, mb.cond)
        if sample:
            eps = torch.randn(mean.shape, generator=generator, dtype=mean.dtype).to(mean.device)
            z = mean + var.sqrt() * eps
        else:
            z = mean
        g1, hidden = self.decode_hidden(z, mb.cond)
        out = F.linear(hidden, self.tensor("decoder.out.weight"), self.tensor("decoder.out.bias"))
        pi = None
        if self.likelihood == "zinb":
            pi = F.linear(hidden, self.tensor("decoder.dropout.weight"),
                          self.tensor("decoder.dropout.bias"))
        recon = self.reconstruction(mb, out, pi)
        kl = 0.5 * (mean.pow(2) + var - torch.log(var) - 1.0).sum()
        mmd = self.mmd(g1, mb.cond) if self.likelihood == "trvae" else recon.new_zeros(())
        n = mb.size
        loss = (recon + kl_weight * kl) / n + float(self.hp["mmd_weight"]) * mmd
        ce = None
        weight = float(self.hp.get("classifier_weight", 0.0) or 0.0)
        if mb.labels is not None and "classifier.weight" in self.specs and weight > 0:
            known = mb.labels >= 0
            if bool(known.any()):
                logits = self.classify(mean[known])
                ce = F.cross_entropy(logits, mb.labels[known])
                loss = loss + weight * ce
        return LossTerms(loss=loss, reconstruction=recon.detach(), kl=kl.detach(),
                         mmd=mmd.detach(), n_cells=n,
                         classification=None if ce is None else ce.detach())


def _mmd_rbf(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    def k(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        d = torch.cdist(x, y).pow(2)
        out = torch.zeros_like(d)
        for s in _MMD_SCALES:
            out = out + torch.exp(-d / (2.0 * s))
        return out.mean()

    return k(a, a) + k(b, b) - 2.0 * k(a, b)
