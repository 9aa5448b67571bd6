"""Attack suite for label contributions: one hostile contribution per rejection rule of
:mod:`protocols.labels`. Each is refused with its stable code by the coordinator's append and by
an auditor's replay, and leaves the state unchanged."""

from __future__ import annotations

import pytest

from protocols.canonical import canonical_json
from protocols.dsse import sign_envelope
from protocols.errors import VerificationError
from protocols.labels import (
    LABEL_CONTRIBUTION_TYPE,
    LabelPolicy,
    LabelPolicyChange,
    gaussian_sigma,
    label_policy_entry,
)
from protocols.ledger import replay, revoke_entry
from tests.protocols._factories import ORIGIN, det_key
from tests.protocols._label_factories import (
    contribution,
    dp_contribution,
    labelled_consortium,
    new_latent_space,
    set_policy,
)


def assert_refused(c, envelope: bytes, code: str) -> None:
    size, root, labels = c.state.size, c.state.root(), c.state.labels
    with pytest.raises(VerificationError) as ei:
        c.state.apply(envelope, c.lookup)
    assert ei.value.reason_code == code, ei.value
    assert (c.state.size, c.state.root(), c.state.labels) == (size, root, labels)
    with pytest.raises(VerificationError) as ei:
        replay(c.trust, [*c.entries, envelope], c.lookup)
    assert ei.value.reason_code == code, ei.value


def _proto(**kw):
    p = {
        "name": "delta",
        "count": 40,
        "mean": [0.0, 4.0, 0.0],
        "std": [1.0, 1.0, 1.0],
        "sigma": 0.0,
    }
    p.update(kw)
    return p


def test_baseline_contribution_is_accepted():
    c = labelled_consortium()
    applied = c.append(contribution(c))
    assert applied.kind == "label_contribution" and applied.site_id == "site-a"
    assert c.state.sequences == {"site-a": 1}


def test_below_k_never_enters():
    c = labelled_consortium()
    assert_refused(c, contribution(c, prototypes=[_proto(count=10)]), "E_LABEL_BELOW_K")
    # k-1 cells cannot hide behind an unrounded count either
    assert_refused(c, contribution(c, prototypes=[_proto(count=19)]), "E_LABEL_BELOW_K")
    assert_refused(c, contribution(c, prototypes=[_proto(count=45)]), "E_LABEL_BELOW_K")


def test_non_finite_values():
    c = labelled_consortium()
    payload = _payload_obj(c)
    text = canonical_json(payload).replace(b"[0,4,0]", b"[0,4,1e400]")
    assert b"1e400" in text
    env = sign_envelope(LABEL_CONTRIBUTION_TYPE, text, [c.site_keys["site-a"]])
    assert_refused(c, env, "E_NONFINITE")


def test_wrong_latent_dimension():
    c = labelled_consortium()
    protos = [_proto(mean=[0.0, 4.0], std=[1.0, 1.0])]
    assert_refused(c, contribution(c, prototypes=protos), "E_LABEL_LATENT_DIM")
    obj = _payload_obj(c)
    obj["n_latent"] = 4
    assert_refused(c, _sign(c, obj), "E_LABEL_LATENT_DIM")


def test_unknown_base():
    c = labelled_consortium()
    obj = _payload_obj(c)
    obj["base"]["root"] = "ab" * 32
    assert_refused(c, _sign(c, obj), "E_BASE_UNKNOWN")


def test_unknown_site():
    c = labelled_consortium()
    stranger = det_key(77)
    obj = _payload_obj(c)
    env = sign_envelope(LABEL_CONTRIBUTION_TYPE, canonical_json(obj), [stranger])
    assert_refused(c, env, "E_KEY_UNKNOWN")


def test_revoked_site():
    c = labelled_consortium()
    c.append(revoke_entry(origin=ORIGIN, site_id="site-a", operator_keys=[c.operator]))
    assert_refused(c, contribution(c), "E_KEY_REVOKED")


@pytest.mark.parametrize(
    "name", ["site-b:ductal", "Unknown", "unknown", "  delta", "nan", "x" * 65, "a\x00b"]
)
def test_vocabulary_escape(name):
    c = labelled_consortium("site-a", "site-b")
    obj = _payload_obj(c)
    obj["prototypes"][0]["name"] = name
    assert_refused(c, _sign(c, obj), "E_LABEL_VOCABULARY")


def test_a_name_twice_after_normalisation():
    c = labelled_consortium()
    protos = [_proto(), _proto(name="DELTA")]
    assert_refused(c, contribution(c, prototypes=protos), "E_LABEL_VOCABULARY")


def test_dp_parameters_weaker_than_the_policy():
    c = labelled_consortium()
    set_policy(c, LabelPolicy(dp=_dp(epsilon=1.0)))
    assert_refused(c, contribution(c), "E_LABEL_DP_WEAK")  # no mechanism at all
    assert_refused(c, dp_contribution(c, epsilon=4.0), "E_LABEL_DP_WEAK")  # larger epsilon
    assert_refused(c, dp_contribution(c, epsilon=1.0, clip=20.0), "E_LABEL_DP_WEAK")  # wider clip
    assert_refused(c, dp_contribution(c, epsilon=1.0, delta=1e-3), "E_LABEL_DP_WEAK")
    # claims epsilon 1 but adds less noise than epsilon 1 needs
    assert_refused(c, dp_contribution(c, epsilon=1.0, sigma_factor=0.9), "E_LABEL_DP_WEAK")
    # releases the spread, which the mechanism does not cover
    obj = _payload_obj(c, dp_contribution(c, epsilon=1.0))
    obj["prototypes"][0]["std"] = [1.0, 1.0, 1.0]
    assert_refused(c, _sign(c, obj), "E_LABEL_DP_WEAK")
    c.append(dp_contribution(c, epsilon=0.5))  # stronger than the policy: accepted


def test_oversize():
    c = labelled_consortium()
    set_policy(c, LabelPolicy(max_types=2))
    protos = [_proto(name=f"t{i}") for i in range(3)]
    assert_refused(c, contribution(c, prototypes=protos), "E_OVERSIZE")
    empty = _payload_obj(c)
    empty["prototypes"] = []
    assert_refused(c, _sign(c, empty), "E_OVERSIZE")


def test_unknown_label_level():
    c = labelled_consortium()
    assert_refused(c, contribution(c, label_key="tissue"), "E_LABEL_LEVEL")


def test_replayed_contribution():
    c = labelled_consortium()
    env = contribution(c)
    c.append(env)
    assert_refused(c, env, "E_SEQUENCE_REPLAY")


def test_stale_base_after_a_new_latent_space():
    from protocols.ledger import make_federated_round

    c = labelled_consortium()
    old = c.state.size
    b = c.state.bundle()
    manifest = {k: v for k, v in b.manifest.items() if k != "digest"}
    from protocols.bundle import make_bundle

    agg = make_bundle(manifest, {k: v * 2 for k, v in b.tensors.items()})
    r = make_federated_round(
        agg,
        origin=ORIGIN,
        round_number=1,
        base_size=old,
        base_digest=b.digest,
        contributors=[("site-a", "sha256:" + "cd" * 32)],
        operator_keys=[c.operator],
    )
    c.append(r.envelope, r.blobs)
    assert_refused(c, contribution(c, base_size=old), "E_BASE_STALE")


def test_label_policy_needs_the_operator():
    c = labelled_consortium()
    change = LabelPolicyChange("settings", ORIGIN, settings=LabelPolicy(k=2, count_bucket=1))
    env = label_policy_entry(change, [c.site_keys["site-a"]])
    with pytest.raises(VerificationError) as ei:
        c.state.apply(env, c.lookup)
    assert ei.value.reason_code in ("E_SIG_THRESHOLD", "E_SIG_INVALID")


def _decide(c, action: str, name: str, target: str) -> bytes:
    return label_policy_entry(
        LabelPolicyChange(action, ORIGIN, label_key="cell_type", name=name, target=target),
        [c.operator],
    )


@pytest.mark.parametrize("action,target", [("accept", "delta"), ("map", "beta")])
def test_vocabulary_decision_for_a_site_never_enrolled_is_refused(action, target):
    # an operator (or a forged policy entry) pre-creating a shared name under a site id the
    # consortium does not know: any later site's "delta" would have merged into it
    c = labelled_consortium()
    c.append(contribution(c))
    assert_refused(c, _decide(c, action, "site-z:delta", target), "E_LABEL_POLICY_SITE_UNKNOWN")


@pytest.mark.parametrize("action,target", [("accept", "delta"), ("map", "beta")])
def test_vocabulary_decision_for_a_name_the_site_never_contributed_is_refused(action, target):
    c = labelled_consortium("site-a", "site-b")
    c.append(contribution(c, "site-a"))
    # site-b is enrolled but contributed nothing; site-a contributed delta, not gamma
    for name in ("site-b:delta", "site-a:gamma", "site-a:Delta"):
        assert_refused(c, _decide(c, action, name, target), "E_LABEL_POLICY_NOT_CONTRIBUTED")
    # the same decision once its contribution is in the ledger is accepted
    c.append(_decide(c, action, "site-a:delta", target))
    assert c.state.labels.pending_names("cell_type") == []


def test_vocabulary_decision_on_a_name_that_matched_the_vocabulary_is_refused():
    # site-a's "BETA" joined the genesis type beta when it was appended: there is no site type
    # site-a:BETA to decide on (mapping it elsewhere would re-decide a shared type)
    c = labelled_consortium()
    c.append(contribution(c, prototypes=[_proto(name="BETA")]))
    assert_refused(c, _decide(c, "map", "site-a:BETA", "alpha"), "E_LABEL_POLICY_NOT_CONTRIBUTED")


def test_vocabulary_decision_after_a_new_latent_space_is_refused():
    # a contribution on an earlier lineage no longer counts, so neither does deciding its name
    c = labelled_consortium()
    c.append(contribution(c))
    new_latent_space(c)
    assert_refused(
        c, _decide(c, "accept", "site-a:delta", "delta"), "E_LABEL_POLICY_NOT_CONTRIBUTED"
    )


def _dp(epsilon: float, delta: float = 1e-5, clip: float = 10.0):
    from protocols.labels import DPRequirement

    return DPRequirement(clip_norm=clip, epsilon=epsilon, delta=delta)


def _payload_obj(c, envelope: bytes | None = None) -> dict:
    import json

    from protocols.dsse import parse_envelope

    return json.loads(parse_envelope(envelope or contribution(c)).payload)


def _sign(c, obj: dict) -> bytes:
    return sign_envelope(LABEL_CONTRIBUTION_TYPE, canonical_json(obj), [c.site_keys["site-a"]])


def _expr_proto(**kw):
    from tests.protocols._label_factories import expression_part

    p = _proto()
    p["expression"] = expression_part()
    p.update(kw)
    return p


def test_expression_part_is_accepted_on_a_reference_with_expression_prototypes():
    c = labelled_consortium()
    applied = c.append(contribution(c, prototypes=[_expr_proto()]))
    assert applied.kind == "label_contribution"
    assert _payload_obj(c, contribution(c, prototypes=[_expr_proto()]))["format_version"] == 2


def test_expression_part_of_the_wrong_dimension():
    from tests.protocols._label_factories import expression_part

    c = labelled_consortium()
    bad = _expr_proto(expression=expression_part(mean=(1.0, 2.0, 3.0), std=(1.0, 1.0, 1.0)))
    assert_refused(c, contribution(c, prototypes=[bad]), "E_LABEL_EXPRESSION")
    obj = _payload_obj(c, contribution(c, prototypes=[_expr_proto()]))
    obj["n_expression"] = 5
    assert_refused(c, _sign(c, obj), "E_LABEL_EXPRESSION")


def test_expression_part_on_a_reference_without_expression_prototypes():
    c = labelled_consortium()
    # the same consortium's reference without its expression section: a fresh genesis
    from protocols.bundle import make_bundle
    from protocols.ledger import LedgerState, make_genesis
    from tests.protocols._factories import tiny_manifest_and_tensors
    from tests.protocols._label_factories import labels_manifest

    manifest, tensors = tiny_manifest_and_tensors(seed=0)
    labels = labels_manifest()
    del labels["expression"]
    manifest["labels"] = labels
    c.state, c.blobs, c.entries = LedgerState(c.trust), {}, []
    g = make_genesis(make_bundle(manifest, tensors), origin=ORIGIN, operator_keys=[c.operator])
    c.append(g.envelope, g.blobs)
    c.enrol("site-a", det_key(10))
    assert_refused(c, contribution(c, prototypes=[_expr_proto()]), "E_LABEL_EXPRESSION")
    c.append(contribution(c))  # a latent-only contribution (format version 1) still is fine


def test_expression_part_every_prototype_or_none():
    c = labelled_consortium()
    obj = _payload_obj(c, contribution(c, prototypes=[_expr_proto(), _expr_proto(name="eta")]))
    del obj["prototypes"][1]["expression"]
    assert_refused(c, _sign(c, obj), "E_PAYLOAD_MALFORMED")
    v1 = _payload_obj(c)
    v1["prototypes"][0]["expression"] = _expr_proto()["expression"]
    assert_refused(c, _sign(c, v1), "E_PAYLOAD_MALFORMED")  # version 1 has no expression


def test_expression_part_non_finite():
    c = labelled_consortium()
    text = canonical_json(_payload_obj(c, contribution(c, prototypes=[_expr_proto()])))
    assert b'"expression":{"mean":[1,2]' in text
    text = text.replace(b'"expression":{"mean":[1,2]', b'"expression":{"mean":[1,1e400]')
    env = sign_envelope(LABEL_CONTRIBUTION_TYPE, text, [c.site_keys["site-a"]])
    assert_refused(c, env, "E_NONFINITE")


def test_expression_part_under_dp_weaker_than_the_policy():
    from protocols.labels import joint_noise_scale

    c = labelled_consortium()
    set_policy(c, LabelPolicy(dp=_dp(epsilon=1.0)))
    scale = joint_noise_scale(1.0, 1e-5, 40, 2)
    priv = {
        "mechanism": "gaussian",
        "clip_norm": 10.0,
        "epsilon": 1.0,
        "delta": 1e-5,
        "expression_clip_norm": 50.0,
    }

    def dp_proto(latent_sigma: float, expr_sigma: float, expr_std=None) -> dict:
        return _proto(
            std=None,
            sigma=latent_sigma,
            expression={"mean": [1.0, 2.0], "std": expr_std, "sigma": expr_sigma},
        )

    ok = dp_proto(10.0 * scale * 1.001, 50.0 * scale * 1.001)
    # the latent part alone noised as if it were the only part: too little for two parts
    v1_sigma = gaussian_sigma(1.0, 1e-5, 2 * 10.0 / 40)
    weak_latent = dp_proto(v1_sigma, 50.0 * scale * 1.001)
    weak_expr = dp_proto(10.0 * scale * 1.001, 50.0 * scale * 0.9)
    spread = dp_proto(10.0 * scale * 1.001, 50.0 * scale * 1.001, expr_std=[1.0, 1.0])
    for bad in (weak_latent, weak_expr, spread):
        assert_refused(c, contribution(c, prototypes=[bad], privacy=priv), "E_LABEL_DP_WEAK")
    c.append(contribution(c, prototypes=[ok], privacy=priv))
