"""Label contributions through the real registry server: accepted with a receipt (envelope
only, no blob), refused with their reason codes, and the operator's label policy applies to the
next submission."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from coordinator.admin import label_policy, label_state
from protocols.errors import ConfigError
from protocols.keys import key_id
from protocols.labels import build_contribution_payload, sign_contribution
from scarches_fl_cli.main import main
from tests.coordinator.conftest import ORIGIN, fetch_base, make_consortium, running_server
from tests.protocols._label_factories import labels_manifest

pytestmark = pytest.mark.network


def _contribution(site, base, *, count: int = 40, name: str = "delta") -> bytes:
    size, root, bundle = base
    payload = build_contribution_payload(
        origin=ORIGIN,
        site_id=site.site_id,
        site_key_id=key_id(site.key),
        sequence=site.next_seq(),
        base_size=size,
        base_root=root,
        base_digest=bundle.digest,
        label_key="cell_type",
        prototypes=[
            {
                "name": name,
                "count": count,
                "mean": [0.0, 4.0, 0.0, 0.0],
                "std": [1.0] * 4,
                "sigma": 0.0,
            }
        ],
    )
    return sign_contribution(payload, site.key)


@pytest.fixture
def package_loggers():
    """main() configures the package loggers, as the CLI does once per process: put them back."""
    names = ("scarches_fl", "protocols", "coordinator", "site_agent", "scarches_fl_cli")
    loggers = [logging.getLogger(n) for n in names]
    saved = [(lg.handlers[:], lg.level, lg.propagate) for lg in loggers]
    yield
    for lg, (handlers, level, propagate) in zip(loggers, saved, strict=True):
        lg.handlers[:] = handlers
        lg.setLevel(level)
        lg.propagate = propagate


def test_label_policy_command_refuses_names_nobody_contributed(
    tmp_path: Path, capsys, package_loggers
) -> None:
    """ADR 0046 at the operator's command line: accepting a name for a site that is not
    enrolled, or one an enrolled site never contributed, exits with a message that names the
    problem, the reason code and what can be decided; `label-policy show` lists it under
    `pending`; nothing is appended."""
    cons = make_consortium(tmp_path, sites=("site-a",), labels=labels_manifest(4))
    a = cons.sites["site-a"]
    with running_server(cons.state) as server, server.client(cons) as c:
        assert c.submit_update(_contribution(a, fetch_base(c, cons)), b"").receipt is not None
    argv = ["coordinator", "label-policy", "accept", "--dir", str(cons.state)]
    argv += ["--label-key", "cell_type", "--as", "delta", "--name"]
    capsys.readouterr()
    assert main([*argv, "site-q:delta"]) == 2
    err = capsys.readouterr().err
    assert "'site-q', which is not enrolled" in err and "E_LABEL_POLICY_SITE_UNKNOWN" in err
    assert main([*argv, "site-a:Delta"]) == 2
    err = capsys.readouterr().err
    assert "has not contributed a type 'Delta'" in err and "site-a:delta" in err
    assert "E_LABEL_POLICY_NOT_CONTRIBUTED" in err
    assert main(["coordinator", "label-policy", "show", "--dir", str(cons.state)]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["pending"] == {"cell_type": ["site-a:delta"]} and shown["accepted"] == []
    assert main([*argv, "site-a:delta"]) == 0
    assert label_state(cons.state)["accepted"] == [["cell_type", "site-a:delta", "delta"]]


def test_contributions_at_the_server_and_the_operator_policy(tmp_path: Path) -> None:
    cons = make_consortium(tmp_path, sites=("site-a",), labels=labels_manifest(4))
    a = cons.sites["site-a"]
    with running_server(cons.state) as server, server.client(cons) as c:
        base = fetch_base(c, cons)
        ok = c.submit_update(_contribution(a, base), b"")
        assert ok.receipt is not None, ok.rejection
        low = c.submit_update(_contribution(a, base, count=10), b"")
        assert low.rejection is not None and low.rejection.reason_code == "E_LABEL_BELOW_K"
        a.sequence -= 1
        size, _root, after = fetch_base(c, cons)
        assert size == base[0] + 1 and after.digest == base[2].digest  # the model is unchanged
    state = label_state(cons.state)
    assert [c["site_id"] for c in state["contributions"]] == ["site-a"]
    _entry, policy = label_policy(
        cons.state, action="settings", dp_epsilon=1.0, dp_delta=1e-5, dp_clip_norm=10.0
    )
    assert policy.dp is not None and policy.k == 20
    with pytest.raises(ConfigError, match="E_LABEL_POLICY"):
        label_policy(
            cons.state, action="map", label_key="cell_type", name="site-a:delta", target="gamma"
        )
    assert label_state(cons.state)["pending"] == {"cell_type": ["site-a:delta"]}
    # the vocabulary rule (ADR 0046): only a name an enrolled site contributed can be decided
    with pytest.raises(ConfigError, match="not enrolled.*E_LABEL_POLICY_SITE_UNKNOWN"):
        label_policy(
            cons.state, action="accept", label_key="cell_type", name="site-q:delta", target="delta"
        )
    with pytest.raises(ConfigError, match="site-a:delta.*E_LABEL_POLICY_NOT_CONTRIBUTED"):
        label_policy(
            cons.state, action="accept", label_key="cell_type", name="site-a:gamma", target="gamma"
        )
    label_policy(
        cons.state, action="accept", label_key="cell_type", name="site-a:delta", target="delta"
    )
    with running_server(cons.state) as server, server.client(cons) as c:
        base = fetch_base(c, cons)
        weak = c.submit_update(_contribution(a, base), b"")
        assert weak.rejection is not None and weak.rejection.reason_code == "E_LABEL_DP_WEAK"
    assert label_state(cons.state)["accepted"] == [["cell_type", "site-a:delta", "delta"]]
    assert label_state(cons.state)["pending"] == {}
