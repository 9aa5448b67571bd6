"""The evaluation report: metrics.json, 2-D embedding plots and a README a person can read.

Input is what ``scarches-fl map`` writes for a site's query cells (``obsm["X_scarches"]``,
``obs["<label>_pred"]``, ``obs["<label>_uncertainty"]``), optionally with the reference cells
embedded by the same model for a joint view and batch-mixing metrics. The 2-D view is UMAP when
``umap-learn`` is installed, else the first two principal components of the latent (PCA is
linear: it keeps distances between groups honest but separates fewer types than UMAP). Plots use
matplotlib's Agg backend (no display needed).
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import numpy as np

from protocols.errors import ScarchesFLError
from scarches_fl import metrics as M

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

__all__ = [
    "EvaluationError",
    "EvaluationInput",
    "build_report",
    "category_colours",
    "clean_embedding_axes",
    "embed_2d",
    "known_types_from_labels",
    "plot_joint_embedding",
    "select_reference_batches",
]

logger = logging.getLogger(__name__)

LATENT_KEY = "X_scarches"


class EvaluationError(ScarchesFLError):
    """The data cannot be evaluated as asked (the message names the missing piece)."""

    exit_code = 2


@dataclass
class EvaluationInput:
    """Cells to evaluate. ``query_*`` come from the site's mapped file; ``reference_*`` are
    optional (reference cells embedded by the same model). ``true_labels`` may hold None."""

    query_latent: np.ndarray
    query_batches: np.ndarray
    query_true: np.ndarray | None = None
    query_pred: np.ndarray | None = None
    query_uncertainty: np.ndarray | None = None
    reference_latent: np.ndarray | None = None
    reference_batches: np.ndarray | None = None
    reference_labels: np.ndarray | None = None
    known_types: Sequence[str] | None = None  # types the reference knows (for novel-type AUROC)
    notes: list[str] = field(default_factory=list)


def embed_2d(latent: np.ndarray, *, method: str = "auto", seed: int = 0) -> tuple[np.ndarray, str]:
    """2-D coordinates of the latent: UMAP if available (``auto``/``umap``), else PCA."""
    z = np.asarray(latent, dtype=np.float64)
    if method in ("auto", "umap"):
        try:
            import umap
        except ImportError:
            if method == "umap":
                raise EvaluationError(
                    "--embedding umap needs umap-learn: pip install umap-learn (or use pca)"
                ) from None
        else:
            logger.info(
                "computing a UMAP of %d cells for the plots (about 30 s for 10,000 cells; "
                "--embedding pca is instant)", z.shape[0]
            )
            n_neighbors = max(2, min(15, z.shape[0] - 1))
            coords = umap.UMAP(n_neighbors=n_neighbors, random_state=seed, n_jobs=1).fit_transform(z)
            return np.asarray(coords), "UMAP of the latent"
    if method not in ("auto", "umap", "pca"):
        raise EvaluationError(f"unknown embedding {method!r}; use auto, umap or pca")
    zc = z - z.mean(axis=0)
    _, s, vt = np.linalg.svd(zc, full_matrices=False)
    coords = zc @ vt[:2].T
    if coords.shape[1] < 2:
        coords = np.concatenate([coords, np.zeros((coords.shape[0], 1))], axis=1)
    var = s**2 / max((s**2).sum(), 1e-12)
    return coords, f"PCA of the latent (PC1 {100 * var[0]:.0f}%, PC2 {100 * var[1]:.0f}% variance)"


#: Categories whose name starts with this are reference cells: drawn first, in grey.
REFERENCE_PREFIX = "reference"
UNKNOWN = "Unknown"
_UNKNOWN_COLOUR = (0.0, 0.0, 0.0, 1.0)


def _is_reference(category: str) -> bool:
    return category == REFERENCE_PREFIX or category.startswith(REFERENCE_PREFIX + ":")


def _distinct_colours(n: int) -> list[Any]:
    """``n`` colours that are neither grey nor shades of one another: tab10 without its grey,
    then tab20's light tones without grey, then evenly spaced hues."""
    import matplotlib
    from matplotlib.colors import ListedColormap

    tab10_map, tab20_map = matplotlib.colormaps["tab10"], matplotlib.colormaps["tab20"]
    assert isinstance(tab10_map, ListedColormap) and isinstance(tab20_map, ListedColormap)
    # the qualitative maps list their colours as RGB tuples
    tab10 = [c for i, c in enumerate(cast(Sequence[Any], tab10_map.colors)) if i != 7]
    light = [c for i, c in enumerate(cast(Sequence[Any], tab20_map.colors))
             if i % 2 == 1 and i != 15]
    colours = list(tab10) + light
    extra = n - len(colours)
    if extra > 0:
        hsv = matplotlib.colormaps["hsv"]
        colours += [hsv(k / extra) for k in range(extra)]
    return colours[:n]


def category_colours(categories: Sequence[str]) -> dict[str, Any]:
    """The one palette of every embedding plot (report and demo): reference categories
    (``reference`` or ``reference: <study>``) in shades of grey, ``Unknown`` in black, every
    other category (sites, query studies, cell types, predictions) in its own distinct colour."""
    refs = [c for c in categories if _is_reference(c)]
    others = [c for c in categories if not _is_reference(c) and c != UNKNOWN]
    out: dict[str, Any] = {}
    for i, c in enumerate(refs):
        grey = 0.72 if len(refs) == 1 else 0.55 + 0.3 * i / (len(refs) - 1)
        out[c] = (grey, grey, grey, 1.0)
    out.update(zip(others, _distinct_colours(len(others)), strict=True))
    if UNKNOWN in categories:
        out[UNKNOWN] = _UNKNOWN_COLOUR
    return out


def _scatter_categories(
    ax: Axes, xy: np.ndarray, values: np.ndarray, *, title: str, size: float
) -> None:
    """Reference cells first (underneath, grey), then the other categories from the largest to
    the smallest (a site's 42 cells stay visible over 678), Unknown on top; legend in reading
    order. No numeric ticks: the axes of a 2-D embedding carry no units."""
    counts = {c: int(np.sum(values == c)) for c in set(values.tolist())}
    legend_order = sorted(counts, key=lambda v: (not _is_reference(v), v == UNKNOWN, v))
    draw_order = sorted(counts, key=lambda v: (not _is_reference(v), v == UNKNOWN, -counts[v]))
    pal = category_colours(legend_order)
    handles = {}
    for c in draw_order:
        m = values == c
        handles[c] = ax.scatter(
            xy[m, 0],
            xy[m, 1],
            s=size * (1.6 if c == UNKNOWN else 1.0),
            color=pal[c],
            label=f"{c} ({counts[c]})",
            linewidths=0,
            alpha=0.6 if _is_reference(c) else 0.9,
        )
    ax.set_title(title, fontsize=10)
    clean_embedding_axes(ax)
    ncol = 1 if len(legend_order) <= 16 else 2
    ax.legend(
        [handles[c] for c in legend_order],
        [f"{c} ({counts[c]})" for c in legend_order],
        loc="center left",
        bbox_to_anchor=(1.01, 0.5),
        fontsize=7,
        markerscale=2,
        frameon=False,
        ncol=ncol,
    )


def clean_embedding_axes(ax: Axes, how: str | None = None) -> None:
    """No numeric ticks on an embedding's axes; ``how`` (e.g. "UMAP of the latent") as the
    x label."""
    ax.set_xticks([])
    ax.set_yticks([])
    if how is not None:
        ax.set_xlabel(how, fontsize=8)


def _point_size(n_cells: int) -> float:
    """Marker area for a scatter of ``n_cells`` points: large for a few hundred cells, small
    (but visible) for hundreds of thousands."""
    return float(np.clip(6000.0 / max(n_cells, 1), 2.0, 20.0))


def _save_figure(fig: Figure, path: Path) -> None:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


def plot_joint_embedding(
    latent: np.ndarray,
    colorings: Mapping[str, np.ndarray],
    *,
    out_dir: Path,
    title: str,
    method: str = "auto",
    seed: int = 0,
) -> list[Path]:
    """One PNG per coloring of the same 2-D layout of ``latent`` (for example the reference and
    every site's cells, coloured by study, by cell type and by role). Returns the paths written
    as ``embedding_by_<coloring>.png`` in ``out_dir``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    z = np.asarray(latent)
    if z.ndim != 2 or z.shape[0] < 3:
        raise EvaluationError(f"need a cells x latent matrix with at least 3 cells, got shape {z.shape}")
    for name, values in colorings.items():
        if len(values) != z.shape[0]:
            raise EvaluationError(
                f"coloring {name!r} has {len(values)} values for {z.shape[0]} cells"
            )
    xy, how = embed_2d(z, method=method, seed=seed)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    size = _point_size(z.shape[0])
    paths: list[Path] = []
    for name, values in colorings.items():
        fig, ax = plt.subplots(figsize=(7.5, 5.5))
        _scatter_categories(ax, xy, np.asarray(values).astype(str), title=f"{title}: by {name}", size=size)
        clean_embedding_axes(ax, how)
        slug = "".join(ch if ch.isalnum() else "_" for ch in name.lower()).strip("_")
        path = out_dir / f"embedding_by_{slug}.png"
        _save_figure(fig, path)
        paths.append(path)
    return paths


def _plots(
    out_dir: Path,
    xy: np.ndarray,
    how: str,
    inp: EvaluationInput,
    is_query: np.ndarray,
    batches: np.ndarray,
    labels: np.ndarray | None,
) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    size = _point_size(len(xy))
    written = []

    def save(fig: Figure, name: str) -> None:
        _save_figure(fig, out_dir / name)
        written.append(name)

    origin = np.where(is_query, "query: ", REFERENCE_PREFIX + ": ")
    fig, ax = plt.subplots(figsize=(7.5, 5.5))
    _scatter_categories(
        ax,
        xy,
        np.char.add(origin.astype(str), batches.astype(str)),
        title="By batch (study; reference studies in grey)",
        size=size,
    )
    clean_embedding_axes(ax, how)
    save(fig, "embedding_by_batch.png")

    if labels is not None:
        fig, ax = plt.subplots(figsize=(7.5, 5.5))
        _scatter_categories(
            ax,
            xy,
            labels.astype(str),
            title="By true label (reference and query where known)",
            size=size,
        )
        clean_embedding_axes(ax, how)
        save(fig, "embedding_by_label.png")

    if inp.query_pred is not None:
        fig, ax = plt.subplots(figsize=(7.5, 5.5))
        shown = np.full(len(xy), REFERENCE_PREFIX, dtype=object)
        shown[is_query] = inp.query_pred.astype(str)
        _scatter_categories(
            ax,
            xy,
            shown.astype(str),
            title="Query cells by predicted label (reference in grey, Unknown in black)",
            size=size,
        )
        clean_embedding_axes(ax, how)
        save(fig, "embedding_by_prediction.png")

    if inp.query_uncertainty is not None:
        fig, (ax, ax2) = plt.subplots(
            1, 2, figsize=(11, 4.5), gridspec_kw={"width_ratios": [1.4, 1]}
        )
        if (~is_query).any():
            grey = category_colours([REFERENCE_PREFIX])[REFERENCE_PREFIX]
            ax.scatter(xy[~is_query, 0], xy[~is_query, 1], s=size, color=grey, linewidths=0)
        clean_embedding_axes(ax, how)
        sc = ax.scatter(
            xy[is_query, 0],
            xy[is_query, 1],
            s=size,
            c=inp.query_uncertainty,
            cmap="viridis",
            vmin=0.0,
            vmax=1.0,
            linewidths=0,
        )
        fig.colorbar(sc, ax=ax, label="uncertainty (1 = unknown to the reference)")
        ax.set_title("Query cells by label uncertainty (reference in grey)", fontsize=10)
        ax2.hist(inp.query_uncertainty, bins=np.linspace(0, 1, 21), color="tab:blue")
        ax2.set_xlabel("uncertainty")
        ax2.set_ylabel("query cells")
        ax2.set_title("Distribution of the uncertainty", fontsize=10)
        save(fig, "embedding_by_uncertainty.png")

    if inp.query_true is not None and inp.query_pred is not None:
        true = inp.query_true.astype(str)
        pred = inp.query_pred.astype(str)
        rows = sorted(set(true.tolist()))
        cols = sorted(set(pred.tolist()) | set(rows), key=lambda v: (v == "Unknown", v))
        mat = np.zeros((len(rows), len(cols)))
        for i, r in enumerate(rows):
            for j, c in enumerate(cols):
                mat[i, j] = np.sum((true == r) & (pred == c))
        frac = mat / np.maximum(mat.sum(axis=1, keepdims=True), 1)
        fig, ax = plt.subplots(figsize=(1.0 + 0.45 * len(cols), 1.0 + 0.4 * len(rows)))
        ax.imshow(frac, cmap="Blues", vmin=0, vmax=1)
        for i in range(len(rows)):
            for j in range(len(cols)):
                if mat[i, j]:
                    ax.text(
                        j,
                        i,
                        str(int(mat[i, j])),
                        ha="center",
                        va="center",
                        fontsize=7,
                        color="white" if frac[i, j] > 0.5 else "black",
                    )
        ax.set_xticks(range(len(cols)), cols, rotation=60, ha="right", fontsize=8)
        # a type the reference cannot name: "Unknown" is the right answer for its cells
        known = set(inp.known_types) if inp.known_types is not None else None
        names = [
            f"{r} (not in reference)" if known is not None and r not in known else r for r in rows
        ]
        ax.set_yticks(range(len(rows)), names, fontsize=8)
        ax.set_xlabel("predicted")
        ax.set_ylabel("true")
        ax.set_title("Query: true vs predicted (counts; colour = row fraction)", fontsize=10)
        save(fig, "confusion_matrix.png")
    return written


_EXPLAIN = {
    "accuracy": "fraction of query cells whose predicted label is the true one (Unknown = wrong)",
    "accuracy_known_types": "accuracy over query cells whose type the reference knows",
    "open_set_accuracy": "accuracy where Unknown is right for cells whose type the reference "
    "lacks (and wrong for every other cell)",
    "macro_f1": "mean over true types of F1 (small types count as much as large ones)",
    "fraction_unknown": "fraction of query cells called Unknown",
    "novel_auroc": "how well the uncertainty ranks cells of types absent from the reference "
    "above the others (1 = perfectly, 0.5 = chance)",
    "novel_fraction_called_unknown": "fraction of cells of novel types called Unknown",
    "mean_uncertainty": "mean uncertainty of the query cells",
    "entropy_of_batch_mixing": "how evenly batches mix among each cell's 15 neighbours "
    "(0 = separated, 1 = perfectly mixed)",
    "ebm_reference_vs_query": "the same, with two groups: reference vs query",
    "batch_silhouette": "batch overlap within each type (1 = batches indistinguishable)",
    "knn_purity": "fraction of a cell's 15 neighbours sharing its label, averaged per label",
    "label_silhouette": "how well types separate (0.5 = not at all, 1 = perfectly)",
    "nmi": "agreement of a k-means clustering of the latent with the labels (NMI)",
    "ari": "the same, adjusted Rand index (0 = random)",
}


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return "n/a" if math.isnan(v) else f"{v:.3f}"
    return str(v)


def _readme(metrics: Mapping[str, Any], plots: Sequence[str], how: str) -> str:
    lines = [
        "# scarches-fl evaluation report",
        "",
        f"Query cells: {metrics['n_query_cells']}; reference cells shown: "
        f"{metrics['n_reference_cells']}. 2-D view: {how}.",
        "",
        "Formulas for every number: docs/evaluation.md. All numbers are also in metrics.json.",
        "",
    ]
    for section, title in (
        ("label_transfer", "Label transfer (query cells)"),
        ("integration", "Integration of the latent space"),
    ):
        vals = metrics.get(section)
        if not vals:
            continue
        lines += [f"## {title}", "", "| metric | value | meaning |", "| --- | --- | --- |"]
        for k, v in vals.items():
            if k in _EXPLAIN:
                lines.append(f"| {k} | {_fmt(v)} | {_EXPLAIN[k]} |")
        lines.append("")
        missing = vals.get("types_not_in_reference") if isinstance(vals, Mapping) else None
        if missing:
            lines += [
                "Types of the query that the reference cannot name (marked "
                "\"(not in reference)\" in the confusion matrix; \"Unknown\" is the right answer "
                f"for their cells): {', '.join(missing)}",
                "",
            ]
    for note in metrics.get("notes", []):
        lines.append(f"- {note}")
    lines += ["", "## Plots", ""]
    captions = {
        "embedding_by_batch.png": "cells coloured by study; well-integrated data shows the "
        "colours interleaved within each cell-type island",
        "embedding_by_label.png": "cells coloured by their known label; each type should form "
        "its own island, shared by reference and query",
        "embedding_by_prediction.png": "query cells coloured by the predicted label "
        "(black = Unknown)",
        "embedding_by_uncertainty.png": "query cells coloured by uncertainty; bright regions are "
        "cells the reference cannot label confidently (possibly new types)",
        "confusion_matrix.png": "true (rows) against predicted (columns) labels of query cells; "
        "rows marked (not in reference) are types the reference cannot name",
    }
    for p in plots:
        lines.append(f"- `{p}`: {captions.get(p, '')}")
    return "\n".join(lines) + "\n"


def build_report(
    inp: EvaluationInput,
    out_dir: str | os.PathLike[str] | None,
    *,
    embedding: str = "auto",
    seed: int = 0,
    k: int = 15,
) -> dict[str, Any]:
    """Compute every metric the inputs allow, write ``metrics.json``, PNG plots and
    ``README.md`` into ``out_dir``; return the metrics dict. With ``out_dir=None`` only the
    metrics are computed (no 2-D view, no files)."""
    out = Path(out_dir) if out_dir is not None else None
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
    zq = np.asarray(inp.query_latent, dtype=np.float64)
    n_q = zq.shape[0]
    has_ref = inp.reference_latent is not None
    zr = (
        np.asarray(inp.reference_latent, dtype=np.float64)
        if has_ref
        else np.zeros((0, zq.shape[1]))
    )
    if zr.shape[1] != zq.shape[1]:
        raise EvaluationError(
            f"reference latent has {zr.shape[1]} dims, query {zq.shape[1]}; embed both with the "
            "same reference model"
        )
    z = np.concatenate([zr, zq])
    is_query = np.r_[np.zeros(zr.shape[0], bool), np.ones(n_q, bool)]
    rb = (
        inp.reference_batches
        if inp.reference_batches is not None
        else np.full(zr.shape[0], "reference")
    )
    batches = np.concatenate(
        [np.asarray(rb).astype(str), np.asarray(inp.query_batches).astype(str)]
    )

    labels = None
    if inp.query_true is not None and (not has_ref or inp.reference_labels is not None):
        rl = np.asarray(inp.reference_labels).astype(str) if has_ref else np.zeros(0, str)
        labels = np.concatenate([rl, np.asarray(inp.query_true).astype(str)])

    metrics: dict[str, Any] = {
        "n_query_cells": int(n_q),
        "n_reference_cells": int(zr.shape[0]),
        "k": int(k),
        "notes": list(inp.notes),
    }
    if inp.query_true is not None and inp.query_pred is not None:
        metrics["label_transfer"] = M.label_transfer_metrics(
            inp.query_true,
            inp.query_pred,
            inp.query_uncertainty,
            reference_labels=inp.known_types,
        )
        if inp.known_types is not None:
            metrics["label_transfer"]["types_not_in_reference"] = sorted(
                set(np.asarray(inp.query_true).astype(str).tolist()) - set(inp.known_types)
            )
        if inp.known_types is None:
            metrics["notes"].append(
                "novel-type AUROC not computed: pass --reference BUNDLE or --novel-types to say "
                "which types the reference knows"
            )
    else:
        metrics["notes"].append("label metrics need both the true label and the prediction")
    if labels is not None:
        lab_for_int = labels
    else:
        lab_for_int = np.full(z.shape[0], "all")
    integ = {}
    if np.unique(batches).size >= 2:
        integ = M.integration_metrics(z, batches, lab_for_int, k=k, seed=seed)
        if labels is None:
            for key in ("knn_purity", "batch_silhouette"):
                integ.pop(key, None)
    elif labels is not None:
        integ = M.integration_metrics(z, batches, labels, k=k, seed=seed)
    if has_ref and n_q > 1 and zr.shape[0] > 1:
        integ["ebm_reference_vs_query"] = M.entropy_of_batch_mixing(
            z, np.where(is_query, "query", "reference"), k=k, seed=seed
        )
    if not has_ref:
        metrics["notes"].append(
            "query cells only: pass --reference-data and --reference to see reference and query "
            "together and to score how well they mix"
        )
    metrics["integration"] = integ
    if out is None:
        return metrics

    xy, how = embed_2d(z, method=embedding, seed=seed)
    metrics["embedding_2d"] = how
    plots = _plots(out, xy, how, inp, is_query, batches, labels)
    metrics["plots"] = plots
    (out / "metrics.json").write_text(json.dumps(_jsonable(metrics), indent=2, sort_keys=True))
    (out / "README.md").write_text(_readme(metrics, plots, how))
    logger.info("report written to %s (%d plots)", out, len(plots))
    return metrics


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def select_reference_batches(
    ref: Any, conditions: list[str], *, batch_key: str, namespace: str,
    requested: str | None, source: str,
) -> tuple[Any, str]:
    """The cells of ``ref`` whose batch is one of the reference's studies: ``requested``
    (comma-separated) or, by default, every batch whose condition the bundle holds. Returns
    ``(cells, a note saying which batches were used and which left out)``."""
    from scarches_fl.data import condition_names

    values = ref.obs[batch_key].astype(str).to_numpy()
    present = list(dict.fromkeys(values.tolist()))
    names = condition_names(present, namespace)
    trained = [b for b in present if names[b] in set(conditions)]
    studies = ", ".join(c.split("/", 1)[1] for c in conditions if c.startswith(namespace + "/"))
    if requested:
        wanted = [b.strip() for b in requested.split(",") if b.strip()]
        unknown = [b for b in wanted if b not in present]
        if unknown:
            raise EvaluationError(
                f"--reference-batches {','.join(unknown)}: not batches of {source} (its "
                f"obs[{batch_key!r}] holds {', '.join(sorted(present))})"
            )
        foreign = [b for b in wanted if b not in trained]
        if foreign:
            raise EvaluationError(
                f"--reference-batches {','.join(foreign)}: the reference was not trained on "
                f"{'this study' if len(foreign) == 1 else 'these studies'} (it was trained on "
                f"{studies}); list only those, or leave out --reference-batches to pick them "
                "from the file"
            )
    else:
        wanted = trained
        if not wanted:
            raise EvaluationError(
                f"none of the batches in {source} ({', '.join(sorted(present))}) is a study the "
                f"reference was trained on ({studies}); pass the file the reference was trained "
                "on as --reference-data, or name its reference studies with --reference-batches"
            )
    left_out = [b for b in present if b not in wanted]
    mask = np.isin(values, wanted)
    note = (f"reference cells: {int(mask.sum())} of {len(values)} in {source}, batches "
            f"{', '.join(wanted)}"
            + (f" (left out, not reference studies: {', '.join(left_out)})" if left_out else ""))
    return (ref[mask].copy() if left_out else ref), note


def known_types_from_labels(labels_manifest: Mapping[str, Any], label_key: str) -> list[str] | None:
    """The cell types a reference's label knowledge names at ``label_key`` (None without
    label knowledge at that level)."""
    level = (labels_manifest or {}).get("levels", {}).get(label_key)
    if not level:
        return None
    known = set(level.get("prototype", {}).get("classes", []))
    known |= set(level.get("prototype", {}).get("excluded_types", {}))
    known |= set(level.get("atlas", {}).get("classes", []))
    known |= set(level.get("expression", {}).get("classes", []))
    return sorted(known)
