"""The rules of federated reference training without Flower: who holds which study, FedAvg by
cells, condition columns from their owner only, KL warm-up, early stopping, signatures."""

from __future__ import annotations

import numpy as np
import pytest

from protocols.federated import (
    CONTRIBUTION_PAYLOAD_TYPE,
    ROUND_PAYLOAD_TYPE,
    RUN_PAYLOAD_TYPE,
    ContributionRejected,
    FederationError,
    envelope_sha256,
    sign_payload,
    tensor_digest,
    verify_contribution,
    verify_round_chain,
)
from protocols.keys import generate_private_key
from scarches_fl import _federated as F
from scarches_fl.module import default_hyperparameters

HP = default_hyperparameters(n_hidden=8, n_layers=2, n_latent=3)
G = 12


def test_every_study_at_exactly_one_site_and_sites_balanced():
    batches = np.array(["a"] * 50 + ["b"] * 30 + ["c"] * 20 + ["d"] * 5)
    plans = F.plan_sites(batches, 3)
    held = [s for p in plans for s in p.studies]
    assert sorted(held) == ["a", "b", "c", "d"]
    rows = np.concatenate([r for p in plans for r in p.studies.values()])
    assert sorted(rows.tolist()) == list(range(len(batches)))
    assert [p.site_id for p in plans] == ["site-0", "site-1", "site-2"]
    assert max(p.n_cells for p in plans) == 50


def test_more_sites_than_studies_splits_the_largest_into_disjoint_parts():
    batches = np.array(["a"] * 40 + ["b"] * 10)
    plans = F.plan_sites(batches, 4, seed=1)
    assert all(p.n_cells > 0 for p in plans)
    names = sorted(s for p in plans for s in p.studies)
    assert names == ["a.part0", "a.part1", "a.part2", "b"]
    rows = np.concatenate([r for p in plans for r in p.studies.values()])
    assert sorted(rows.tolist()) == list(range(50))
    for p in plans:
        for name, r in p.studies.items():
            assert set(batches[r]) == {name.split(".")[0]}


def _contrib(site, n, own, tensors, fill):
    out = F.contribution_tensors(tensors, HP, G, 4, own)
    return F.Contribution(site, n, tuple(own), {k: np.full_like(v, fill) for k, v in out.items()})


def test_fedavg_by_cells_and_condition_columns_only_from_their_owner():
    conds = F.condition_list({"s1": ["x", "y"], "s2": ["z"], "s3": ["w"]})
    assert conds == ["s1/x", "s1/y", "s2/z", "s3/w"]
    owners = {i: c.split("/")[0] for i, c in enumerate(conds)}
    g = F.initial_tensors(HP, G, 4, seed=0)
    c1 = _contrib("s1", 30, [0, 1], g, 1.0)
    c2 = _contrib("s2", 10, [2], g, 5.0)
    new = F.aggregate(g, [c1, c2], HP, G, 4, owners)
    specs = __import__("scarches_fl.module", fromlist=["tensor_specs"]).tensor_specs(HP, G, 4)
    for name, spec in specs.items():
        if spec.role == "condition":
            cols = [np.take(new[name], [j], axis=spec.axis) for j in range(4)]
            assert np.all(cols[0] == 1.0) and np.all(cols[1] == 1.0)
            assert np.all(cols[2] == 5.0)
            # s3 did not contribute: its column keeps the previous value, bit for bit.
            assert np.array_equal(cols[3], np.take(g[name], [3], axis=spec.axis))
        else:
            np.testing.assert_allclose(new[name], (30 * 1.0 + 10 * 5.0) / 40, rtol=1e-6)
    # A site sending a column it does not own is refused.
    bad = _contrib("s2", 10, [3], g, 9.0)
    with pytest.raises(ValueError, match="does not own"):
        F.aggregate(g, [bad], HP, G, 4, owners)


def test_kl_warmup_and_early_stopping():
    ws = [F.kl_weight_for_round(r, 4) for r in range(1, 8)]
    assert 0 < ws[0] < ws[1] < ws[2] < ws[3] < 1 and ws[4:] == [1.0, 1.0, 1.0]
    assert F.kl_weight_for_round(1, 0) == 1.0
    es = F.EarlyStopping(patience=2)
    assert not es.update(1, 10.0, warm=False)  # during warm-up nothing counts
    assert not es.update(2, 9.0, warm=True) and es.best_round == 2
    assert not es.update(3, 9.5, warm=True)
    assert es.update(4, 9.2, warm=True)


def test_local_training_changes_only_shared_weights_and_own_columns(shared_data):
    import anndata as ad

    from scarches_fl.data import register

    a = ad.read_h5ad(shared_data / "panc8_sub_nebula.h5ad")
    sub = a[a.obs["batch"].isin(["celseq", "fluidigmc1"])].copy()
    reg = register(sub, batch_key="batch", namespace="s1")
    conds = ["s0/q", "s1/celseq", "s1/fluidigmc1"]
    hp = default_hyperparameters(n_hidden=16, n_latent=4)
    g = F.initial_tensors(hp, sub.n_vars, 3, seed=0)
    ds = F.make_site_dataset(reg.x, list(reg.conditions), conds, seed=0)
    assert ds.own_conditions == [1, 2]
    res = F.local_train(hp, sub.n_vars, 3, g, ds, F.LocalTrainingConfig(epochs=1, prox_mu=0.1))
    assert res.n_train == ds.n_train and np.isfinite(res.train_loss)
    assert res.tensors["encoder.layers.0.weight_s"].shape == (16, 2)
    assert not np.array_equal(res.tensors["encoder.layers.0.weight_x"],
                              g["encoder.layers.0.weight_x"])
    v, n = F.validation_loss(hp, sub.n_vars, 3, g, ds)
    assert n == ds.n_val > 0 and np.isfinite(v)


def _payload(site, **kw):
    p = {"kind": "contribution", "run_id": "r1", "round": 1, "base_digest": "sha256:aa",
         "contribution_digest": tensor_digest({"t": np.ones(3, np.float32)}), "n_train": 5,
         "conditions": [f"{site}/x"], "site_id": site}
    p.update(kw)
    return p


def test_contribution_signature_binds_site_round_base_and_arrays():
    k1, k2 = generate_private_key(), generate_private_key()
    keys = {"s1": k1.public_key(), "s2": k2.public_key()}
    expected = {"s1": ["s1/x"], "s2": ["s2/x"]}
    arrays = tensor_digest({"t": np.ones(3, np.float32)})
    kw = dict(site_keys=keys, run_id="r1", server_round=1, base_digest="sha256:aa",
              arrays_digest=arrays, expected_conditions=expected)
    env = sign_payload(k1, CONTRIBUTION_PAYLOAD_TYPE, _payload("s1"))
    assert verify_contribution(env, **kw)["n_train"] == 5

    def reason(env, **over):
        with pytest.raises(ContributionRejected) as ei:
            verify_contribution(env, **{**kw, **over})
        return ei.value.reason

    # Signed by another site's key, claiming to be s1.
    assert reason(sign_payload(k2, CONTRIBUTION_PAYLOAD_TYPE, _payload("s1"))) == "bad_signature"
    assert reason(sign_payload(k1, CONTRIBUTION_PAYLOAD_TYPE, _payload("s9"))) == "unknown_site"
    assert reason(env, server_round=2) == "wrong_round"
    assert reason(env, base_digest="sha256:bb") == "wrong_base"
    assert reason(env, run_id="r2") == "wrong_run"
    assert reason(env, arrays_digest=tensor_digest({"t": np.zeros(3, np.float32)})) == \
        "digest_mismatch"
    assert reason(sign_payload(k1, CONTRIBUTION_PAYLOAD_TYPE,
                               _payload("s1", conditions=["s2/x"]))) == "wrong_conditions"
    assert reason(b"{not json") == "malformed"


def test_round_chain_detects_a_missing_round_and_a_swapped_contribution():
    ck, sk = generate_private_key(), generate_private_key()
    site_keys = {"s1": sk.public_key()}
    contribs, rounds = {}, []
    prev = "sha256:00"
    for r in (1, 2):
        p = _payload("s1", round=r, base_digest=prev)
        env = sign_payload(sk, CONTRIBUTION_PAYLOAD_TYPE, p)
        contribs[(r, "s1")] = env
        agg = f"sha256:{r:02d}"
        rounds.append(sign_payload(ck, ROUND_PAYLOAD_TYPE, {
            "kind": "federated_round", "run_id": "r1", "round": r, "base_digest": prev,
            "aggregate_digest": agg, "contributors": [{
                "site_id": "s1", "contribution_digest": p["contribution_digest"],
                "envelope_sha256": envelope_sha256(env)}], "excluded": []}))
        prev = agg
    run = sign_payload(ck, RUN_PAYLOAD_TYPE, {
        "kind": "federated_run", "run_id": "r1", "initial_digest": "sha256:00",
        "final": {"round": 2, "aggregate_digest": prev, "bundle_digest": prev}})
    rep = verify_round_chain(run, rounds, contribs, coordinator_key=ck.public_key(),
                             site_keys=site_keys, bundle_digest=prev)
    assert rep.rounds == 2 and rep.contributions_verified == 2
    with pytest.raises(FederationError, match="round"):
        verify_round_chain(run, rounds[1:], contribs, coordinator_key=ck.public_key(),
                           site_keys=site_keys)
    swapped = {(1, "s1"): contribs[(2, "s1")], (2, "s1"): contribs[(1, "s1")]}
    with pytest.raises(FederationError, match="differs"):
        verify_round_chain(run, rounds, swapped, coordinator_key=ck.public_key(),
                           site_keys=site_keys)
    with pytest.raises(FederationError, match="bundle"):
        verify_round_chain(run, rounds, contribs, coordinator_key=ck.public_key(),
                           site_keys=site_keys, bundle_digest="sha256:ff")


def test_contribution_shape_error_names_the_tensor():
    from scarches_fl._federated import contribution_shape_error
    from scarches_fl.module import default_hyperparameters, tensor_specs

    specs = tensor_specs(default_hyperparameters(n_hidden=8, n_latent=3, n_layers=1), 20, 5)
    good = {}
    for name, spec in specs.items():
        shape = list(spec.shape)
        if spec.role == "condition":
            shape[spec.axis] = 2  # the site's own two columns
        good[name] = np.zeros(shape, dtype=np.float32)
    assert contribution_shape_error(specs, good, 2) is None
    name = next(n for n, s in specs.items() if s.role == "condition")
    assert name in (contribution_shape_error(specs, good, 3) or "")
    bad = dict(good, **{"decoder.out.bias": np.zeros(19, dtype=np.float32)})
    assert "decoder.out.bias" in (contribution_shape_error(specs, bad, 2) or "")


def test_label_share_minimum_covers_every_group_a_share_sums_over():
    """ADR 0038: every group a label share sums over (a type, a batch, all its cells) holds at
    least the per-site minimum; the rejection names the group and carries its reason code."""
    from protocols.federated import check_share_minimum, share_groups

    stats = {"counts": np.array([5.0, 12.0]), "sums": np.zeros((2, 3)),
             "scatter": np.zeros((2, 3, 3))}
    assert share_groups("label_statistics", stats) == [("type 0", 5.0), ("type 1", 12.0)]
    check_share_minimum("label_statistics", stats, 5)
    with pytest.raises(ContributionRejected, match="type 0 sums over 5 cells") as exc:
        check_share_minimum("label_statistics", stats, 6)
    assert exc.value.reason == "below_site_minimum"
    assert exc.value.reason_code == "E_LABEL_SHARE_MINIMUM"
    # per type (rows) and per batch (columns) of the type x batch table, and all of it
    table = {"counts": np.array([[4.0, 3.0], [6.0, 0.0]])}
    groups = dict(share_groups("expression_statistics", table))
    assert groups == {"type 0": 7.0, "type 1": 6.0, "batch 0": 10.0, "batch 1": 3.0,
                      "all included cells": 13.0}
    with pytest.raises(ContributionRejected, match="batch 1 sums over 3 cells"):
        check_share_minimum("expression_statistics", table, 5)
    check_share_minimum("expression_statistics", table, 3)
    check_share_minimum("expression_moments", {"count": np.array([9.0])}, 9)
    with pytest.raises(ContributionRejected, match="below_site_minimum"):
        check_share_minimum("expression_moments", {"count": np.array([2.0])}, 5)
    # a calibration over no cell ("none scored") and an empty share pass; over 2 cells not
    check_share_minimum("label_calibration", {"counts": np.array([0.0, 0.0])}, 5)
    check_share_minimum("expression_statistics", {}, 5)
    with pytest.raises(ContributionRejected, match="all scored cells"):
        check_share_minimum("expression_calibration", {"counts": np.array([2.0, 1.0])}, 5)
    with pytest.raises(ContributionRejected, match="malformed"):
        check_share_minimum("label_statistics", {"sums": np.zeros((1, 3))}, 5)
