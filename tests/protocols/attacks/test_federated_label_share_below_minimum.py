"""Attack suite for federated label shares (ADR 0038): an enrolled site signs, correctly, a share
of each label exchange that sums over fewer of its cells than the federation's per-site minimum.
The signature, run, model and digest checks pass; the minimum refuses it with
``E_LABEL_SHARE_MINIMUM`` and names the group, as the coordinator does before pooling and
``federate verify`` does on a stored share."""

from __future__ import annotations

import numpy as np
import pytest

from protocols.federated import (
    LABEL_SHARE_PAYLOAD_TYPE,
    ContributionRejected,
    check_share_minimum,
    sign_payload,
    tensor_digest,
    verify_label_share,
)
from tests.protocols._factories import det_key

SITE = det_key(7)
MODEL = "sha256:" + "ab" * 32


def _hostile(task: str, arrays: dict[str, np.ndarray], types: list[str]) -> bytes:
    payload = {
        "kind": "label_share",
        "task": task,
        "run_id": "run-1",
        "site_id": "hosp-a",
        "key_id": "k",
        "base_digest": MODEL,
        "share_digest": tensor_digest(arrays),
        "types": types,
    }
    return sign_payload(SITE, LABEL_SHARE_PAYLOAD_TYPE, payload)


@pytest.mark.parametrize(
    ("task", "arrays", "group"),
    [
        # one type of 2 cells beside a large one: its sum is nearly a cell's latent vector
        (
            "label_statistics",
            {
                "counts": np.array([40.0, 2.0]),
                "sums": np.zeros((2, 3)),
                "scatter": np.zeros((2, 3, 3)),
            },
            "type 1 sums over 2 cells",
        ),
        # a study with 3 cells of the kept types, inside an otherwise large share
        (
            "expression_statistics",
            {
                "counts": np.array([[30.0, 1.0], [20.0, 2.0]]),
                "type_sums": np.zeros((2, 4)),
                "batch_sums": np.zeros((2, 4)),
                "gram": np.zeros((4, 4)),
            },
            "batch 1 sums over 3 cells",
        ),
        # the expression moments of a single labelled cell: that cell's profile
        (
            "expression_moments",
            {"count": np.array([1.0]), "total": np.zeros(6), "gram": np.zeros((6, 6))},
            "all labelled cells sums over 1",
        ),
        (
            "label_calibration",
            {"nll": np.zeros(61), "novelty_hist": np.zeros(400), "counts": np.array([4.0, 4.0])},
            "all scored cells sums over 4",
        ),
    ],
)
def test_a_signed_share_below_the_site_minimum_is_refused(task, arrays, group):
    env = _hostile(task, arrays, ["a", "b"] if task == "label_statistics" else [])
    payload = verify_label_share(
        env,
        site_keys={"hosp-a": SITE.public_key()},
        run_id="run-1",
        model_digest=MODEL,
        task=task,
        arrays_digest=tensor_digest(arrays),
    )
    assert payload["site_id"] == "hosp-a"  # every other rule passes
    with pytest.raises(ContributionRejected, match=group) as exc:
        check_share_minimum(task, arrays, 5)
    assert exc.value.reason_code == "E_LABEL_SHARE_MINIMUM"
    assert exc.value.reason == "below_site_minimum"
