"""A federated bundle's expression prototypes from its sites' shares (ADR 0037): the stages the
coordinator runs between the three exchanges, and the same stages replayed from the stored
shares, so that a verifier recomputes the bundle's expression tensors without trusting the
coordinator's arithmetic. No I/O, no torch."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from scarches_fl import _expression_sums as ES
from scarches_fl.refine import (
    EXPRESSION_COMPONENTS,
    EXPRESSION_GENE_MEAN,
    expression_level,
    expression_projection_info,
)

__all__ = [
    "CALIBRATION_ARRAYS",
    "check_calibration_arrays",
    "federated_subspace",
    "site_view",
    "federated_expression",
    "replay_expression",
]

CALIBRATION_ARRAYS = ("nll", "novelty_hist", "in_sample_hist", "counts")


def check_calibration_arrays(arrays: Mapping[str, np.ndarray]) -> Mapping[str, np.ndarray]:
    """``arrays`` when they are exactly a site's calibration sums and finite, else
    ``ValueError``."""
    if set(arrays) != set(CALIBRATION_ARRAYS) or not all(
        np.all(np.isfinite(v)) for v in arrays.values()
    ):
        raise ValueError(f"calibration arrays must be exactly {sorted(CALIBRATION_ARRAYS)}, finite")
    return arrays


def federated_subspace(
    moments: Sequence[ES.ExpressionMoments], n_genes: int
) -> tuple[int, tuple[np.ndarray, np.ndarray], int]:
    """(components p, (gene mean, components) as float32, cells) from the sites' moments."""
    pooled = ES.pool_moments(list(moments))
    p = int(min(ES.DEFAULT_N_COMPONENTS, pooled.n - 1, n_genes))
    gene_mean, comps = ES.subspace_from_moments(pooled, p)
    return p, (gene_mean.astype(np.float32), comps.astype(np.float32)), int(pooled.n)


def site_view(model: ES.ExpressionTypeModel, site: str) -> ES.ExpressionTypeModel:
    """The type model as ``site`` receives it: its own batches' offsets, under its own names."""
    prefix = f"{site}/"
    return ES.ExpressionTypeModel(
        model.classes,
        model.counts,
        model.means,
        model.within,
        {b[len(prefix) :]: o for b, o in model.offsets.items() if b.startswith(prefix)},
    )


def federated_expression(
    model: ES.ExpressionTypeModel,
    projection: tuple[np.ndarray, np.ndarray],
    n_components: int,
    n_cells: int,
    calibration: Sequence[Mapping[str, np.ndarray]],
) -> tuple[dict[str, Any], dict[str, Any], dict[str, np.ndarray]]:
    """(``labels["expression"]``, the level's ``expression`` section, the bundle's expression
    tensors) from the type model, the subspace and the sites' calibration sums."""
    temperature, quantiles = ES.calibrate_expression(list(calibration))
    level, level_tensors = expression_level(
        0,
        model,
        cell_counts=[int(n) for n in model.counts],
        kappa=ES.DEFAULT_KAPPA,
        temperature=temperature,
        quantiles=quantiles,
    )
    level["federated"] = True
    tensors = {
        EXPRESSION_GENE_MEAN: projection[0],
        EXPRESSION_COMPONENTS: projection[1],
        **level_tensors,
    }
    return expression_projection_info(n_components, n_cells), level, tensors


def replay_expression(
    shares: Mapping[str, Mapping[str, tuple[Sequence[str], Mapping[str, np.ndarray]]]],
    *,
    classes: Sequence[str],
    n_genes: int,
    floor: int,
) -> tuple[dict[str, Any], dict[str, Any], dict[str, np.ndarray]]:
    """The coordinator's stages on stored shares: ``shares[task][site] = (types, arrays)`` for
    the tasks ``expression_moments``, ``expression_statistics`` and ``expression_calibration``
    (the sites whose shares the run's label record lists). ``ValueError`` on a share that does
    not parse."""
    moments = [
        ES.moments_from_arrays(a, n_genes=n_genes)
        for _site, (_t, a) in sorted(shares["expression_moments"].items())
    ]
    p, projection, n_cells = federated_subspace(moments, n_genes)
    sums = [
        ES.sums_from_arrays(
            types, a, n_components=p, classes=classes, floor=floor, batch_prefix=f"{site}/"
        )
        for site, (types, a) in sorted(shares["expression_statistics"].items())
    ]
    model = ES.type_model(ES.pool_sums(sums), p)
    calibration = [
        check_calibration_arrays(a)
        for _site, (_t, a) in sorted(shares["expression_calibration"].items())
    ]
    return federated_expression(model, projection, p, n_cells, calibration)
