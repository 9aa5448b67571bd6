"""A site's label contribution: per-type prototypes of its annotated cells, the Gaussian
mechanism when the consortium's label policy (or the site) asks for one, the site's epsilon
budget, and the privacy guard for what leaves.

What leaves (ADR 0044, ``docs/site-admin.md``): for each cell type with at least ``k`` cells of
the run, the mean of its cells' latent coordinates (clipped and noised under DP), their
per-dimension spread (not under DP), the number of cells rounded down to the policy's bucket,
and the noise level. Types with fewer cells never leave. No per-cell value, no cell name.

The epsilon this site spent is kept per study in ``STATE/epsilon.json`` (a study = the sorted
condition names of the cells the prototypes came from); a DP contribution that would take a study
over ``label_epsilon_budget`` is refused here, before anything is signed.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from protocols.bundle import atomic_write
from protocols.errors import ScarchesFLError
from protocols.labels import (
    MAX_NAME_CHARS,
    LabelPolicy,
    bucket_count,
    gaussian_sigma,
    joint_noise_scale,
    name_key,
    normalise_name,
)

__all__ = [
    "LabelContributionError",
    "DPChoice",
    "SiteContribution",
    "choose_dp",
    "build_site_prototypes",
    "check_outgoing_labels",
    "render_contribution",
    "EpsilonLedger",
    "expression_clip_norm",
]

_MISSING = {"", "nan", "none", "na", "n/a", "unknown", "unassigned"}


class LabelContributionError(ScarchesFLError):
    """The label contribution cannot be made as configured; nothing was signed or sent."""

    exit_code = 2


@dataclass(frozen=True)
class DPChoice:
    epsilon: float
    delta: float
    clip_norm: float
    source: str  # "label policy" | "site configuration"

    def privacy(self) -> dict[str, Any]:
        return {
            "mechanism": "gaussian",
            "clip_norm": self.clip_norm,
            "epsilon": self.epsilon,
            "delta": self.delta,
        }


def choose_dp(
    policy: LabelPolicy,
    *,
    site_epsilon: float | None = None,
    site_delta: float | None = None,
    site_clip_norm: float | None = None,
) -> DPChoice | None:
    """The mechanism to use: the label policy's requirement (the site may ask for a smaller
    epsilon), else the site's own ``label_dp_*`` settings, else none."""
    req = policy.dp
    if req is not None:
        eps = req.epsilon if site_epsilon is None else min(float(site_epsilon), req.epsilon)
        delta = req.delta if site_delta is None else min(float(site_delta), req.delta)
        clip = (
            req.clip_norm if site_clip_norm is None else min(float(site_clip_norm), req.clip_norm)
        )
        return DPChoice(eps, delta, clip, "label policy")
    if site_epsilon is None:
        return None
    if site_delta is None or site_clip_norm is None:
        raise LabelContributionError(
            "label_dp_epsilon is set but the label policy states no DP parameters: set "
            "label_dp_delta and label_dp_clip_norm too (e.g. 1e-5 and 10)"
        )
    return DPChoice(
        float(site_epsilon), float(site_delta), float(site_clip_norm), "site configuration"
    )


@dataclass
class SiteContribution:
    """The prototypes that leave (``prototypes``, exactly as in the payload) and, for the local
    summary only, every type's local cell count and why a type stayed."""

    label_key: str
    prototypes: list[dict[str, Any]]
    local_counts: dict[str, int]
    kept_back: dict[str, str] = field(default_factory=dict)
    dp: DPChoice | None = None
    #: the L2 norm each cell's expression scores are clipped to under DP (expression part only)
    expression_clip_norm: float | None = None

    @property
    def privacy(self) -> dict[str, Any]:
        if self.dp is None:
            return {"mechanism": "none"}
        priv = self.dp.privacy()
        if self.expression_clip_norm is not None:
            priv["expression_clip_norm"] = self.expression_clip_norm
        return priv


def expression_clip_norm(level_info: Mapping[str, Any], tensors: Mapping[str, Any]) -> float:
    """The clip norm for expression scores under DP, from the reference's public numbers only:
    the largest norm of its types' expression means plus two pooled standard deviations (the
    square root of the pooled covariance's trace), rounded to 2 decimals."""
    means = np.asarray(tensors[level_info["means_tensor"]], dtype=np.float64)
    cov = np.asarray(tensors[level_info["covariance_tensor"]], dtype=np.float64)
    norm = float(np.linalg.norm(means, axis=1).max()) + 2.0 * math.sqrt(float(np.trace(cov)))
    return float(round(norm, 2))


def build_site_prototypes(
    latent: Any,
    labels: Sequence[Any],
    *,
    label_key: str,
    policy: LabelPolicy,
    dp: DPChoice | None = None,
    seed: int = 0,
    expression: Any = None,
    expression_clip: float | None = None,
) -> SiteContribution:
    """Per-type prototypes of ``latent`` (cells x dims) grouped by ``labels`` (the site's own
    annotation, one per cell): mean, spread and bucketed count for each type with at least
    ``policy.k`` cells after bucketing. Under ``dp`` each latent is clipped to ``clip_norm``,
    the mean gets N(0, sigma^2) noise (sigma from :func:`protocols.labels.gaussian_sigma` with
    sensitivity ``2 clip / count``) and the spread is not released.

    ``expression`` (cells x components: the cells' scores on the reference's public expression
    subspace, :func:`scarches_fl.refine.query_scores`) adds each type's mean and spread there
    (format version 2, ADR 0045). Under ``dp`` the two means of a type are one Gaussian
    mechanism: each cell's scores are clipped to ``expression_clip`` (required) as its latent is
    to ``clip_norm``, and both get noise ``clip x`` :func:`protocols.labels.joint_noise_scale`
    (``parts`` 2)."""
    z = np.asarray(latent, dtype=np.float64)
    if z.ndim != 2 or z.shape[0] != len(labels):
        raise LabelContributionError("the latent and the labels differ in length")
    x = None if expression is None else np.asarray(expression, dtype=np.float64)
    if x is not None and (x.ndim != 2 or x.shape[0] != z.shape[0]):
        raise LabelContributionError("the expression scores and the labels differ in length")
    if x is not None and dp is not None and not (expression_clip and expression_clip > 0):
        raise LabelContributionError(
            "expression prototypes under DP need a clip norm for the expression scores"
        )
    names = np.array(
        [normalise_name(str(v)) if v is not None else "" for v in labels], dtype=object
    )
    rng = np.random.default_rng([int(seed), 0x1ABE1])
    local: dict[str, int] = {}
    kept_back: dict[str, str] = {}
    protos: list[dict[str, Any]] = []
    seen: dict[str, str] = {}
    for name in sorted(set(names.tolist())):
        n = int(np.sum(names == name))
        local[name] = n
        if name.casefold() in _MISSING:
            kept_back[name] = "a missing-label marker"
            continue
        if ":" in name or len(name) > MAX_NAME_CHARS or not name.isprintable():
            kept_back[name] = (
                f"not a plain type name (1-{MAX_NAME_CHARS} printable characters, no ':')"
            )
            continue
        if name_key(name) in seen:
            kept_back[name] = f"the same type as {seen[name_key(name)]!r} but for case"
            continue
        seen[name_key(name)] = name
        count = bucket_count(n, policy.count_bucket)
        if count < policy.k:
            kept_back[name] = (
                f"{n} cells: fewer than k={policy.k} after rounding down to {policy.count_bucket}"
            )
            continue
        zc = z[names == name]
        xc = None if x is None else x[names == name]
        if dp is None:
            mean = zc.mean(axis=0)
            std = np.maximum(zc.std(axis=0, ddof=1), 1e-6)
            proto: dict[str, Any] = {
                "name": name,
                "count": count,
                "mean": mean,
                "std": std,
                "sigma": 0.0,
            }
            if xc is not None:
                proto["expression"] = {
                    "mean": xc.mean(axis=0),
                    "std": np.maximum(xc.std(axis=0, ddof=1), 1e-6),
                    "sigma": 0.0,
                }
            protos.append(proto)
        else:
            if xc is None:
                sigma = gaussian_sigma(dp.epsilon, dp.delta, 2.0 * dp.clip_norm / count)
            else:
                sigma = dp.clip_norm * joint_noise_scale(dp.epsilon, dp.delta, count, 2)
            mean = _clipped_mean(zc, dp.clip_norm) + rng.normal(0.0, sigma, size=zc.shape[1])
            proto = {
                "name": name,
                "count": count,
                "mean": mean,
                "std": None,
                "sigma": float(np.float32(sigma * (1 + 1e-6))),
            }
            if xc is not None:
                assert expression_clip is not None
                e_sigma = expression_clip * joint_noise_scale(dp.epsilon, dp.delta, count, 2)
                proto["expression"] = {
                    "mean": _clipped_mean(xc, expression_clip)
                    + rng.normal(0.0, e_sigma, size=xc.shape[1]),
                    "std": None,
                    "sigma": float(np.float32(e_sigma * (1 + 1e-6))),
                }
            protos.append(proto)
        if len(protos) > policy.max_types:
            raise LabelContributionError(
                f"more than {policy.max_types} cell types qualify; the label policy allows "
                f"{policy.max_types} per contribution: contribute a subset of the data"
            )
    return SiteContribution(
        label_key,
        protos,
        local,
        kept_back,
        dp,
        expression_clip if (x is not None and dp is not None) else None,
    )


def _clipped_mean(v: np.ndarray, clip: float) -> np.ndarray:
    """The mean of the rows of ``v``, each scaled down to L2 norm ``clip`` if longer."""
    norms = np.linalg.norm(v, axis=1, keepdims=True)
    return (v * np.minimum(1.0, clip / np.maximum(norms, 1e-12))).mean(axis=0)


class PrivacyGuardLabelsError(LabelContributionError):
    """The outgoing contribution holds something it must not; nothing was signed or sent."""

    exit_code = 3


_FIELDS = {
    "kind",
    "format_version",
    "origin",
    "site_id",
    "key_id",
    "sequence",
    "base",
    "label_key",
    "n_latent",
    "privacy",
    "prototypes",
}


def check_outgoing_labels(
    payload: Mapping[str, Any],
    *,
    policy: LabelPolicy,
    n_latent: int,
    cell_names: Sequence[str] = (),
    payload_bytes: bytes | None = None,
    n_expression: int | None = None,
) -> None:
    """The privacy guard of a label contribution: exactly the declared fields, one prototype
    per type with a bucketed count >= k, vectors of the latent dimension and, with
    ``n_expression`` (format version 2), of the expression subspace's (never one value per
    cell), no cell name anywhere; with ``payload_bytes``, those exact bytes pass the
    coordinator's strict parser and say the same. Raises :class:`PrivacyGuardLabelsError`."""

    def fail(msg: str) -> PrivacyGuardLabelsError:
        return PrivacyGuardLabelsError(f"privacy guard: {msg}; nothing was signed or sent")

    if payload_bytes is not None:
        from protocols.errors import VerificationError
        from protocols.labels import parse_contribution_payload

        try:
            parsed = parse_contribution_payload(payload_bytes)
        except VerificationError as exc:
            raise fail(f"the payload does not pass the strict parser: {exc}") from exc
        if parsed.to_json_obj() != payload:
            raise fail("the bytes to be signed say something else than the checked payload")

    fields = _FIELDS if n_expression is None else _FIELDS | {"n_expression"}
    if set(payload) != fields:
        raise fail(f"the payload has fields {sorted(payload)}, not the declared {sorted(fields)}")
    if n_expression is not None and payload["n_expression"] != n_expression:
        raise fail(f"n_expression is not the reference's {n_expression} components")
    proto_fields = {"name", "count", "mean", "std", "sigma"}
    if n_expression is not None:
        proto_fields.add("expression")
    protos = payload["prototypes"]
    if not isinstance(protos, list) or len(protos) > policy.max_types:
        raise fail("prototypes must be a list of at most max_types entries")
    strings: list[str] = [str(payload["label_key"])]
    for p in protos:
        if set(p) != proto_fields:
            raise fail(f"a prototype has fields {sorted(p)}")
        c = p["count"]
        if not isinstance(c, int) or c < policy.k or c % policy.count_bucket:
            raise fail(f"type {p['name']!r}: count {c} is below k or not bucketed")
        vectors = [("mean", p["mean"], n_latent), ("std", p["std"], n_latent)]
        if n_expression is not None:
            e = p["expression"]
            if not isinstance(e, dict) or set(e) != {"mean", "std", "sigma"}:
                raise fail(f"type {p['name']!r}: expression has fields other than mean, std, sigma")
            vectors += [
                ("expression mean", e["mean"], n_expression),
                ("expression std", e["std"], n_expression),
            ]
        for key, v, dim in vectors:
            if v is None:
                continue
            if not isinstance(v, list) or len(v) != dim:
                raise fail(f"type {p['name']!r}: {key} is not a {dim}-vector")
            if not all(isinstance(x, float | int) and math.isfinite(x) for x in v):
                raise fail(f"type {p['name']!r}: {key} holds a non-finite value")
        strings.append(str(p["name"]))
    cells = set(map(str, cell_names))
    leaked = [s for s in strings if s in cells]
    if leaked:
        raise fail(f"{leaked[0]!r} is the name of a cell of the query")
    text = json.dumps(payload, sort_keys=True)
    for name in list(cells)[:100_000]:
        if len(name) >= 8 and name in text:
            raise fail(f"the cell name {name!r} appears in the payload")


def render_contribution(
    contrib: SiteContribution,
    *,
    sequence: int,
    base_size: int,
    spent: float | None,
    budget: float | None,
) -> str:
    """The human summary: every number that leaves, and what stayed."""
    lines = [
        f"label contribution (sequence {sequence}, on reference version {base_size}), "
        f"label level {contrib.label_key!r}",
        "privacy: "
        + (
            "none (the label policy requires no mechanism)"
            if contrib.dp is None
            else f"Gaussian mechanism from the {contrib.dp.source}: epsilon "
            f"{contrib.dp.epsilon:g}, delta {contrib.dp.delta:g}, latents clipped to "
            f"L2 norm {contrib.dp.clip_norm:g}; the spread is not sent"
        ),
    ]
    if contrib.dp is not None:
        lines.append(
            f"epsilon spent on this study: {spent or 0.0:g} before, "
            f"{(spent or 0.0) + contrib.dp.epsilon:g} after"
            + (f" (budget {budget:g})" if budget is not None else "")
        )
    lines.append(
        "what leaves, per type (name, cells at this site -> count sent, noise sigma, mean, spread):"
    )
    for p in contrib.prototypes:
        mean = ", ".join(f"{float(x):.4g}" for x in p["mean"])
        std = "not sent" if p["std"] is None else ", ".join(f"{float(x):.4g}" for x in p["std"])
        lines.append(
            f"  {p['name']}: {contrib.local_counts[p['name']]} -> {p['count']}, sigma "
            f"{p['sigma']:.4g}; mean [{mean}]; spread [{std}]"
        )
        e = p.get("expression")
        if e is not None:
            e_mean = ", ".join(f"{float(x):.4g}" for x in e["mean"])
            e_std = (
                "not sent" if e["std"] is None else ", ".join(f"{float(x):.4g}" for x in e["std"])
            )
            lines.append(
                f"    in the reference's expression subspace ({len(e['mean'])} components), "
                f"sigma {e['sigma']:.4g}: mean [{e_mean}]; spread [{e_std}]"
            )
    for name, why in sorted(contrib.kept_back.items()):
        lines.append(f"  stays here: {name!r} ({why})")
    lines.append("nothing else: no per-cell value, no cell name, no gene-level expression value")
    return "\n".join(lines) + "\n"


class EpsilonLedger:
    """``STATE/epsilon.json``: the epsilon this site has spent per study (sum over its DP label
    contributions; basic composition)."""

    def __init__(self, state_dir: str | Path) -> None:
        self.path = Path(state_dir) / "epsilon.json"

    def _read(self) -> dict[str, float]:
        if not self.path.is_file():
            return {}
        try:
            doc = json.loads(self.path.read_text(encoding="utf-8"))
            return {str(k): float(v) for k, v in doc.get("spent", {}).items()}
        except (ValueError, AttributeError, TypeError) as exc:
            raise LabelContributionError(
                f"{self.path} is not the epsilon record this agent writes ({exc}); restore it "
                "from a backup -- without it the budget cannot be enforced"
            ) from exc

    def spent(self, study: str) -> float:
        return self._read().get(study, 0.0)

    def check(self, study: str, epsilon: float, budget: float | None) -> None:
        if budget is None:
            return
        before = self.spent(study)
        if before + epsilon > budget + 1e-12:
            raise LabelContributionError(
                f"this contribution would spend epsilon {epsilon:g} on study {study!r}, which "
                f"has spent {before:g} of its budget {budget:g} (label_epsilon_budget); nothing "
                "was sent. Contribute under a smaller epsilon, or not again for this study"
            )

    def charge(self, study: str, epsilon: float) -> float:
        doc = self._read()
        doc[study] = doc.get(study, 0.0) + float(epsilon)
        atomic_write(self.path, json.dumps({"spent": doc}, indent=2, sort_keys=True).encode())
        return doc[study]
