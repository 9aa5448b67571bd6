"""A labelled tiny reference and label contributions for the label-knowledge tests."""

from __future__ import annotations

from typing import Any

import numpy as np

from protocols.bundle import make_bundle
from protocols.labels import (
    LabelPolicy,
    LabelPolicyChange,
    build_contribution_payload,
    gaussian_sigma,
    label_policy_entry,
    sign_contribution,
)
from tests.protocols._factories import (
    ORIGIN,
    Consortium,
    consortium,
    det_key,
    tiny_manifest_and_tensors,
)

N_LATENT = 3
#: components of the labelled reference's expression subspace
N_EXPRESSION = 2


def labels_manifest(n_latent: int = N_LATENT) -> dict[str, Any]:
    """Two genesis types, alpha and beta, one prototype each, in an n_latent-dim latent space."""
    eye = np.eye(n_latent).tolist()
    return {
        "schema": "scarches-fl.labels",
        "schema_version": 1,
        "unknown_label": "Unknown",
        "n_latent": n_latent,
        "novelty_tail": 0.05,
        "knowledge": ["prototypes"],
        "atlas": {"included": False},
        "expression": {"n_components": N_EXPRESSION},
        "levels": {
            "cell_type": {
                "index": 0,
                "prototype": {
                    "min_cells": 20,
                    "classes": ["alpha", "beta"],
                    "cell_counts": [100, 100],
                    "type_cell_counts": {"alpha": 100, "beta": 100},
                    "prototypes": [
                        {
                            "label": "alpha",
                            "mean": [0.0] * n_latent,
                            "std": [1.0] * n_latent,
                            "weight": 1.0,
                            "n_cells": 100,
                        },
                        {
                            "label": "beta",
                            "mean": [4.0] + [0.0] * (n_latent - 1),
                            "std": [1.0] * n_latent,
                            "weight": 1.0,
                            "n_cells": 100,
                        },
                    ],
                    "shared_covariance": eye,
                    "class_prior": [0.5, 0.5],
                    "calibration": {
                        "temperature": 1.0,
                        "novelty_quantiles": [0.0, 1.0, 4.0, 9.0, 30.0],
                    },
                },
                "expression": {"classes": ["alpha", "beta"], "cell_counts": [100, 100]},
            }
        },
    }


def expression_part(mean=(1.0, 2.0), std=(1.0, 1.0), sigma=0.0) -> dict[str, Any]:
    """The expression part of a prototype (format version 2)."""
    return {"mean": list(mean), "std": None if std is None else list(std), "sigma": sigma}


def labelled_consortium(*sites: str, seed: int = 0) -> Consortium:
    manifest, tensors = tiny_manifest_and_tensors(seed=seed)
    manifest["labels"] = labels_manifest()
    base = make_bundle(manifest, tensors)
    c = consortium()
    # replace the tiny genesis by the labelled one: a fresh ledger
    from protocols.ledger import LedgerState, make_genesis

    c.state, c.base, c.blobs, c.entries = LedgerState(c.trust), base, {}, []
    g = make_genesis(base, origin=ORIGIN, operator_keys=[c.operator])
    c.append(g.envelope, g.blobs)
    for i, s in enumerate(sites or ("site-a",)):
        c.enrol(s, det_key(10 + i))
    return c


def new_latent_space(c: Consortium, *, scale: float = 1.0) -> None:
    """Append a ``federated_round`` whose aggregate is the served model's weights times
    ``scale``: a new latent space, on which earlier contributions no longer count."""
    from protocols.ledger import make_federated_round

    b = c.state.bundle()
    manifest = {k: v for k, v in b.manifest.items() if k != "digest"}
    agg = make_bundle(manifest, {k: np.asarray(v) * scale for k, v in b.tensors.items()})
    r = make_federated_round(
        agg,
        origin=ORIGIN,
        round_number=1,
        base_size=c.state.size,
        base_digest=b.digest,
        contributors=[("site-a", "sha256:" + "cd" * 32)],
        operator_keys=[c.operator],
    )
    c.append(r.envelope, r.blobs)


def contribution(
    c: Consortium,
    site_id: str = "site-a",
    *,
    sequence: int = 1,
    prototypes: list | None = None,
    privacy: dict | None = None,
    base_size: int | None = None,
    label_key: str = "cell_type",
    key=None,
) -> bytes:
    """A signed contribution of one type ``delta`` (40 cells) unless told otherwise."""
    st = c.state
    size = st.size if base_size is None else base_size
    protos = (
        prototypes
        if prototypes is not None
        else [
            {
                "name": "delta",
                "count": 40,
                "mean": [0.0, 4.0, 0.0],
                "std": [1.0, 1.0, 1.0],
                "sigma": 0.0,
            }
        ]
    )
    payload = build_contribution_payload(
        origin=ORIGIN,
        site_id=site_id,
        site_key_id=_kid(key or c.site_keys[site_id]),
        sequence=sequence,
        base_size=size,
        base_root=st.root_at(size),
        base_digest=st.digest_at(size),
        label_key=label_key,
        prototypes=protos,
        privacy=privacy,
    )
    return sign_contribution(payload, key or c.site_keys[site_id])


def dp_contribution(
    c: Consortium,
    *,
    epsilon: float,
    delta: float = 1e-5,
    clip: float = 10.0,
    count: int = 40,
    sigma_factor: float = 1.0,
    **kw: Any,
) -> bytes:
    sigma = gaussian_sigma(epsilon, delta, 2 * clip / count) * sigma_factor
    protos = [
        {"name": "delta", "count": count, "mean": [0.0, 4.0, 0.0], "std": None, "sigma": sigma}
    ]
    priv = {"mechanism": "gaussian", "clip_norm": clip, "epsilon": epsilon, "delta": delta}
    return contribution(c, prototypes=protos, privacy=priv, **kw)


def set_policy(c: Consortium, policy: LabelPolicy) -> None:
    c.append(
        label_policy_entry(LabelPolicyChange("settings", ORIGIN, settings=policy), [c.operator])
    )


def _kid(key) -> str:
    from protocols.keys import key_id

    return key_id(key)
