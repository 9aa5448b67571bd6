"""Label knowledge through the ledger (protocols.labels): the Gaussian mechanism's calibration,
the vocabulary, the replayed label knowledge per version, and its snapshot."""

from __future__ import annotations

import math

import pytest

from protocols.errors import VerificationError
from protocols.labels import (
    LabelPolicy,
    LabelPolicyChange,
    bucket_count,
    gaussian_sigma,
    label_policy_entry,
    name_key,
    normalise_name,
)
from protocols.ledger import capture_snapshot, replay, restore_state
from tests.protocols._factories import ORIGIN
from tests.protocols._label_factories import (
    contribution,
    dp_contribution,
    labelled_consortium,
    new_latent_space,
)


def _delta(sigma: float, eps: float, sens: float) -> float:
    phi = lambda t: 0.5 * math.erfc(-t / math.sqrt(2))  # noqa: E731
    a, b = sens / (2 * sigma), eps * sigma / sens
    return phi(a - b) - math.exp(eps) * phi(-a - b)


@pytest.mark.parametrize("eps", [0.5, 1.0, 4.0, 8.0])
def test_gaussian_sigma_is_the_smallest_that_meets_delta(eps):
    delta, sens = 1e-5, 0.5
    s = gaussian_sigma(eps, delta, sens)
    assert _delta(s, eps, sens) <= delta * (1 + 1e-9)
    assert _delta(s * 0.999, eps, sens) > delta
    if eps <= 1:  # never above the classic bound where that bound holds
        assert s <= sens * math.sqrt(2 * math.log(1.25 / delta)) / eps
    # linear in the sensitivity
    assert gaussian_sigma(eps, delta, 2 * sens) == pytest.approx(2 * s, rel=1e-9)


def test_names_normalise_whitespace_and_match_without_case():
    assert normalise_name("  Ductal \t cell ") == "Ductal cell"
    assert name_key("DUCTAL  cell") == name_key("ductal cell")
    assert bucket_count(47, 10) == 40 and bucket_count(19, 10) == 10


def test_contribution_adds_a_named_type_at_later_versions_only():
    c = labelled_consortium()
    before = c.state.size
    digest = c.state.digest
    applied = c.append(contribution(c))
    assert c.state.digest == digest  # the model is unchanged
    old = c.state.label_knowledge(size=before)["levels"]["cell_type"]["prototype"]
    new = c.state.label_knowledge()["levels"]["cell_type"]["prototype"]
    assert old["classes"] == ["alpha", "beta"]
    assert new["classes"] == ["alpha", "beta", "site-a:delta"]
    added = new["prototypes"][-1]
    assert added["source"] == f"site-a#{applied.index}" and added["n_cells"] == 40
    assert new["class_prior"] == pytest.approx([100 / 240, 100 / 240, 40 / 240], rel=1e-6)
    assert "source" not in new["prototypes"][0]  # the genesis's own


def test_a_known_name_joins_its_type_and_reweights_it():
    c = labelled_consortium()
    protos = [
        {
            "name": "BETA",
            "count": 100,
            "mean": [4.0, 1.0, 0.0],
            "std": [1.0, 1.0, 1.0],
            "sigma": 0.0,
        }
    ]
    c.append(contribution(c, prototypes=protos))
    p = c.state.label_knowledge()["levels"]["cell_type"]["prototype"]
    assert p["classes"] == ["alpha", "beta"]
    betas = [q for q in p["prototypes"] if q["label"] == "beta"]
    assert [q["weight"] for q in betas] == pytest.approx([0.5, 0.5])
    assert p["class_prior"] == pytest.approx([1 / 3, 2 / 3], rel=1e-6)


def test_two_sites_same_new_name_stay_apart_until_the_operator_decides():
    c = labelled_consortium("site-a", "site-b")
    c.append(contribution(c, "site-a"))
    c.append(contribution(c, "site-b"))
    classes = c.state.label_knowledge()["levels"]["cell_type"]["prototype"]["classes"]
    assert classes[2:] == ["site-a:delta", "site-b:delta"]
    c.append(
        label_policy_entry(
            LabelPolicyChange(
                "accept", ORIGIN, label_key="cell_type", name="site-a:delta", target="delta"
            ),
            [c.operator],
        )
    )
    classes = c.state.label_knowledge()["levels"]["cell_type"]["prototype"]["classes"]
    assert classes[2:] == ["delta", "site-b:delta"]
    c.append(
        label_policy_entry(
            LabelPolicyChange(
                "map", ORIGIN, label_key="cell_type", name="site-b:delta", target="Delta"
            ),
            [c.operator],
        )
    )
    p = c.state.label_knowledge()["levels"]["cell_type"]["prototype"]
    assert p["classes"] == ["alpha", "beta", "delta"] and p["cell_counts"] == [100, 100, 80]
    # a later site's "Delta " is the shared type directly
    c.append(
        contribution(
            c,
            "site-a",
            sequence=2,
            prototypes=[
                {
                    "name": "Delta",
                    "count": 20,
                    "mean": [0.0, 4.0, 0.0],
                    "std": [1.0, 1.0, 1.0],
                    "sigma": 0.0,
                }
            ],
        )
    )
    assert c.state.label_knowledge()["levels"]["cell_type"]["prototype"]["cell_counts"] == [
        100,
        100,
        100,
    ]


@pytest.mark.parametrize(
    "action,name,target",
    [
        ("accept", "site-a:delta", "ALPHA"),
        ("map", "site-a:delta", "gamma"),
        ("accept", "delta", "delta"),
        ("accept", "site-a:delta", "x:y"),
    ],
)
def test_label_policy_refuses_what_would_merge_or_escape(action, name, target):
    c = labelled_consortium()
    c.append(contribution(c))  # site-a:delta exists: the refusal is about the merge
    env = label_policy_entry(
        LabelPolicyChange(action, ORIGIN, label_key="cell_type", name=name, target=target),
        [c.operator],
    )
    with pytest.raises(VerificationError) as ei:
        c.append(env)
    assert ei.value.reason_code == "E_LABEL_POLICY"


def test_dp_prototype_claims_a_wider_region():
    c = labelled_consortium()
    c.append(dp_contribution(c, epsilon=1.0))
    p = c.state.label_knowledge()["levels"]["cell_type"]["prototype"]["prototypes"][-1]
    sigma = gaussian_sigma(1.0, 1e-5, 2 * 10.0 / 40)
    assert p["spread_inflation"] == pytest.approx((1 + 1 / 40) * (1 + sigma**2), rel=1e-5)


def test_replay_and_snapshot_give_the_same_label_knowledge():
    c = labelled_consortium("site-a", "site-b")
    c.append(contribution(c, "site-a"))
    c.append(
        label_policy_entry(
            LabelPolicyChange("settings", ORIGIN, settings=LabelPolicy(k=30)), [c.operator]
        )
    )
    c.append(contribution(c, "site-b"))
    again = replay(c.trust, c.entries, c.lookup)
    for n in range(c.state.size + 1):
        if n:
            assert again.label_knowledge(size=n) == c.state.label_knowledge(size=n)
    meta, tensors = capture_snapshot(c.state).encode()
    restored = restore_state(
        c.trust, meta, tensors, [c.state.tree.leaf_hash(i) for i in range(c.state.size)]
    )
    assert restored.labels == c.state.labels
    assert restored.label_knowledge() == c.state.label_knowledge()
    assert restored.labels.policy.k == 30


def test_a_new_latent_space_starts_without_contributions():
    c = labelled_consortium()
    c.append(contribution(c))
    new_latent_space(c, scale=2.0)
    assert c.state.label_knowledge()["levels"]["cell_type"]["prototype"]["classes"] == [
        "alpha",
        "beta",
    ]


def test_expression_parts_replay_into_the_expression_section():
    from tests.protocols._label_factories import expression_part

    c = labelled_consortium()
    before = c.state.size
    protos = [
        {
            "name": "beta",
            "count": 40,
            "mean": [4.0, 0.0, 0.0],
            "std": [1.0, 1.0, 1.0],
            "sigma": 0.0,
            "expression": expression_part(mean=(0.5, 0.5)),
        },
        {
            "name": "delta",
            "count": 30,
            "mean": [0.0, 4.0, 0.0],
            "std": [1.0, 1.0, 1.0],
            "sigma": 0.0,
            "expression": expression_part(mean=(3.0, -1.0), std=(2.0, 0.5)),
        },
    ]
    applied = c.append(contribution(c, prototypes=protos))
    c.append(
        label_policy_entry(
            LabelPolicyChange(
                "accept", ORIGIN, label_key="cell_type", name="site-a:delta", target="delta"
            ),
            [c.operator],
        )
    )
    old = c.state.label_knowledge(size=before)["levels"]["cell_type"]["expression"]
    assert "contributed" not in old
    new = c.state.label_knowledge()["levels"]["cell_type"]["expression"]
    assert new["classes"] == ["alpha", "beta"]  # the reference's own stay as they are
    src = f"site-a#{applied.index}"
    assert new["contributed"] == [
        {"label": "beta", "anchor": True, "n_cells": 40, "mean": [0.5, 0.5],
         "std": [1.0, 1.0], "sigma": 0.0, "source": src},
        {"label": "delta", "anchor": False, "n_cells": 30, "mean": [3.0, -1.0],
         "std": [2.0, 0.5], "sigma": 0.0, "source": src},
    ]  # fmt: skip
    # a replay and a snapshot restore give the same knowledge, expression parts included
    again = replay(c.trust, c.entries, c.lookup)
    assert again.label_knowledge() == c.state.label_knowledge()
    meta, tensors = capture_snapshot(c.state).encode()
    restored = restore_state(
        c.trust, meta, tensors, [c.state.tree.leaf_hash(i) for i in range(c.state.size)]
    )
    assert restored.label_knowledge() == c.state.label_knowledge()


def test_joint_noise_covers_both_parts():
    from protocols.labels import joint_noise_scale

    # two parts of one mechanism: each part's noise, in units of its clip norm, is what one
    # vector of sensitivity 2 sqrt(2) / count needs
    s = joint_noise_scale(4.0, 1e-5, 30, 2)
    assert s == pytest.approx(gaussian_sigma(4.0, 1e-5, 2 * math.sqrt(2) / 30), rel=1e-12)
    assert s > joint_noise_scale(4.0, 1e-5, 30, 1)
