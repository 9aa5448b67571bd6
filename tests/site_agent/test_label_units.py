"""What a site's label contribution holds (site_agent.labels): bucketed counts, k, the Gaussian
mechanism, the guard, and the epsilon budget."""

from __future__ import annotations

import numpy as np
import pytest

from protocols.labels import DPRequirement, LabelPolicy, gaussian_sigma
from site_agent.labels import (
    EpsilonLedger,
    LabelContributionError,
    PrivacyGuardLabelsError,
    build_site_prototypes,
    check_outgoing_labels,
    choose_dp,
    render_contribution,
)


def _data(seed: int = 0):
    rng = np.random.default_rng(seed)
    counts = {"alpha": 57, "Beta  cell": 20, "rare": 19, "Unknown": 30}
    z = np.concatenate([rng.normal(i * 3, 1.0, size=(n, 4)) for i, n in enumerate(counts.values())])
    labels = [name for name, n in counts.items() for _ in range(n)]
    return z, labels


def test_only_types_with_k_cells_leave_with_bucketed_counts():
    z, labels = _data()
    c = build_site_prototypes(z, labels, label_key="cell_type", policy=LabelPolicy())
    assert [(p["name"], p["count"]) for p in c.prototypes] == [("Beta cell", 20), ("alpha", 50)]
    assert c.local_counts["alpha"] == 57
    assert "rare" in c.kept_back and "Unknown" in c.kept_back
    alpha = c.prototypes[1]
    assert np.allclose(alpha["mean"], z[:57].mean(axis=0))
    assert len(alpha["std"]) == 4 and alpha["sigma"] == 0.0
    text = render_contribution(c, sequence=3, base_size=9, spent=None, budget=None)
    assert "alpha: 57 -> 50" in text and "stays here: 'rare'" in text


def test_gaussian_mechanism_clips_adds_noise_and_keeps_the_spread():
    z, labels = _data()
    dp = choose_dp(LabelPolicy(dp=DPRequirement(clip_norm=2.0, epsilon=1.0, delta=1e-5)))
    assert dp is not None and dp.source == "label policy"
    c = build_site_prototypes(z * 100, labels, label_key="cell_type", policy=LabelPolicy(), dp=dp)
    for p in c.prototypes:
        assert p["std"] is None
        assert p["sigma"] >= gaussian_sigma(1.0, 1e-5, 2 * 2.0 / p["count"])
        # clipped to norm 2, then noise of about sigma per dimension
        assert np.linalg.norm(p["mean"]) < 2.0 + 6 * p["sigma"] * 2
    assert choose_dp(LabelPolicy()) is None
    with pytest.raises(LabelContributionError, match="label_dp_delta"):
        choose_dp(LabelPolicy(), site_epsilon=1.0)


def _payload(prototypes):
    return {
        "kind": "label_contribution",
        "format_version": 1,
        "origin": "o",
        "site_id": "s",
        "key_id": "0" * 64,
        "sequence": 1,
        "base": {},
        "label_key": "cell_type",
        "n_latent": 2,
        "privacy": {"mechanism": "none"},
        "prototypes": prototypes,
    }


def test_guard_refuses_per_cell_values_names_and_unbucketed_counts():
    ok = {"name": "alpha", "count": 20, "mean": [0.0, 1.0], "std": [1.0, 1.0], "sigma": 0.0}
    check_outgoing_labels(_payload([ok]), policy=LabelPolicy(), n_latent=2, cell_names=["AAACG-1"])
    bad = [
        _payload([{**ok, "count": 25}]),
        _payload([{**ok, "mean": [0.0] * 30}]),  # one value per cell
        _payload([{**ok, "name": "AAACGTTT-1"}]),  # a cell's name
        {**_payload([ok]), "cells": ["AAACG-1"]},
    ]
    for payload in bad:
        with pytest.raises(PrivacyGuardLabelsError):
            check_outgoing_labels(
                payload, policy=LabelPolicy(), n_latent=2, cell_names=["AAACGTTT-1"]
            )


def test_expression_part_leaves_per_type_only_and_the_guard_checks_it():
    z, labels = _data()
    rng = np.random.default_rng(1)
    x = rng.normal(size=(len(labels), 3))  # the cells' scores on a 3-component subspace
    c = build_site_prototypes(z, labels, label_key="cell_type", policy=LabelPolicy(), expression=x)
    alpha = c.prototypes[1]
    assert np.allclose(alpha["expression"]["mean"], x[:57].mean(axis=0))
    assert len(alpha["expression"]["std"]) == 3 and alpha["expression"]["sigma"] == 0.0
    text = render_contribution(c, sequence=3, base_size=9, spent=None, budget=None)
    assert "expression subspace (3 components)" in text
    e_ok = {"mean": [0.0, 1.0, 2.0], "std": [1.0, 1.0, 1.0], "sigma": 0.0}
    ok = {"name": "alpha", "count": 20, "mean": [0.0, 1.0], "std": [1.0, 1.0], "sigma": 0.0}
    v2 = {**_payload([{**ok, "expression": e_ok}]), "format_version": 2, "n_expression": 3}
    check_outgoing_labels(v2, policy=LabelPolicy(), n_latent=2, n_expression=3)
    bad = [
        {**v2, "prototypes": [{**ok, "expression": {**e_ok, "mean": [0.0] * 57}}]},  # per cell
        {**v2, "prototypes": [{**ok, "expression": {**e_ok, "cells": [1.0]}}]},
        {**v2, "prototypes": [ok]},  # a version 2 prototype without its expression part
        {**v2, "n_expression": 57},
        _payload([{**ok, "expression": e_ok}]),  # version 1 fields, an undeclared part
    ]
    for payload in bad:
        with pytest.raises(PrivacyGuardLabelsError):
            check_outgoing_labels(payload, policy=LabelPolicy(), n_latent=2, n_expression=3)
    with pytest.raises(PrivacyGuardLabelsError):  # an expression part the run did not declare
        check_outgoing_labels(
            _payload([{**ok, "expression": e_ok}]), policy=LabelPolicy(), n_latent=2
        )


def test_epsilon_budget_per_study(tmp_path):
    led = EpsilonLedger(tmp_path)
    led.check("site/a", 1.0, 1.5)
    assert led.charge("site/a", 1.0) == 1.0
    with pytest.raises(LabelContributionError, match="budget 1.5"):
        led.check("site/a", 1.0, 1.5)
    led.check("site/b", 1.0, 1.5)  # another study has its own budget
    assert EpsilonLedger(tmp_path).spent("site/a") == 1.0


def test_contribute_labels_fails_fast_before_training(tmp_path):
    """What --contribute-labels needs is checked before any fine-tuning (agent's pre-flight)."""
    from types import SimpleNamespace

    import anndata as ad
    import pandas as pd

    from protocols.labels import LabelLedger
    from site_agent.agent import _check_contribution_setup
    from site_agent.config import SiteConfig
    from tests.protocols._label_factories import labels_manifest

    adata = ad.AnnData(obs=pd.DataFrame({"batch": ["b1"] * 3, "cell_type": ["x"] * 3}))
    bundle = SimpleNamespace(manifest={"labels": labels_manifest()})
    verified = SimpleNamespace(
        bundle=bundle, reference=bundle, site_record=SimpleNamespace(labels=LabelLedger())
    )
    base = dict(site_id="site-a", state=tmp_path, batch_key="batch", contribute_labels=True)
    with pytest.raises(LabelContributionError, match="needs --label-key"):
        _check_contribution_setup(SiteConfig(**base), adata, verified)
    with pytest.raises(LabelContributionError, match="no column 'tissue'"):
        _check_contribution_setup(SiteConfig(**base, label_key="tissue"), adata, verified)
    with pytest.raises(LabelContributionError, match="no epsilon"):
        cfg = SiteConfig(**base, label_key="cell_type", label_epsilon_budget=2.0)
        _check_contribution_setup(cfg, adata, verified)
    EpsilonLedger(tmp_path).charge("site-a/b1", 2.0)
    cfg = SiteConfig(
        **base,
        label_key="cell_type",
        label_epsilon_budget=2.0,
        label_dp_epsilon=1.0,
        label_dp_delta=1e-5,
        label_dp_clip_norm=5.0,
    )
    with pytest.raises(LabelContributionError, match="budget 2"):
        _check_contribution_setup(cfg, adata, verified)
    empty = SimpleNamespace(manifest={"labels": {}})
    unlabelled = SimpleNamespace(bundle=empty, reference=empty, site_record=verified.site_record)
    with pytest.raises(LabelContributionError, match="carries no prototypes"):
        _check_contribution_setup(SiteConfig(**base, label_key="cell_type"), adata, unlabelled)
