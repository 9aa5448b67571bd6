"""One trust root for federated training (ADR 0085): a run in two steps around the
coordinator's ledger, on an in-process grid. The init step designs the initial model from the
sites' descriptors with no keys at all; the operator publishes it and enrols the sites; the
run then takes its site keys and its record-signing key from the replayed ledger, so a site
the ledger revoked cannot take part, and the records verify (and publish) under the ledger's
keys only."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from coordinator.admin import _open
from protocols.federated import FederationError
from tests.federated.test_server_inprocess import InProcessGrid, _task_identity, site_configs

pytestmark = [pytest.mark.flower, pytest.mark.timeout(300)]

__all__ = ["_task_identity", "site_configs"]  # the fixtures this module reuses

ROOT = Path(__file__).resolve().parents[2]
SMALL = dict(
    rounds=1, local_epochs=1, n_hidden=16, n_latent=4, round_timeout=7.5, wait_for_sites=0.0
)


def _initial_model(tmp_path, configs, **kw):
    """Step 1 (``federate init-model``): no keys; only round-0000 is written."""
    from coordinator.federated_server import FederationSettings, run_federation

    settings = FederationSettings(
        out_dir=str(tmp_path / "records"),
        site_keys=None,
        coordinator_key=None,
        init_only=True,
        min_sites=3,
        **SMALL,
        **kw,
    )
    result = run_federation(InProcessGrid(configs), settings)
    assert result.rounds == [] and result.sites == ["s-a", "s-b", "s-c"]
    assert not list((tmp_path / "records" / "rounds").glob("*.json"))  # nothing signed
    return tmp_path / "records" / "models" / "round-0000", result


def _run_config(tmp_path, state, **kw):
    return {
        "ledger": str(state),
        "out": str(tmp_path / "records"),
        "bundle": str(tmp_path / "bundle"),
        "rounds": 1,
        "local-epochs": 1,
        "min-sites": 2,
        "wait-for-sites": 0.0,
        "round-timeout": 7.5,
        **kw,
    }


def test_revoked_site_cannot_take_part_and_records_verify_under_the_ledger(
    tmp_path, site_configs, capsys
):
    from coordinator.admin import enroll_site, init_state, revoke_site
    from coordinator.federated_ledger import federation_keys, publish_run
    from coordinator.federated_server import run_federation, settings_from_run_config
    from protocols.bundle import read_bundle
    from protocols.federated import (
        CONTRIBUTION_PAYLOAD_TYPE,
        ContributionRejected,
        sign_payload,
        verify_contribution,
    )
    from protocols.keys import load_private_key
    from scarches_fl_cli.main import main

    configs, keys = site_configs
    # With a label key: the run (label key from the model) ends with the label exchanges.
    round0, init = _initial_model(tmp_path, configs, label_key="cell_type")
    state = tmp_path / "coord"
    init_state(state, reference=round0)
    for site in ("s-a", "s-b", "s-c"):
        enroll_site(state, site_id=site, public_key=keys[site])
    revoke_site(state, site_id="s-c")

    # Step 2: the ledger's keys. s-c is still connected and answers, but holds no active key.
    settings = settings_from_run_config(_run_config(tmp_path, state))
    assert sorted(settings.site_keys) == ["s-a", "s-b"]
    assert settings.initial_model.digest == read_bundle(round0).digest
    result = run_federation(InProcessGrid(configs), settings)
    assert result.sites == ["s-a", "s-b"] and result.run_id == init.run_id
    assert [c["site_id"] for c in result.rounds[0].contributors] == ["s-a", "s-b"]
    # A contribution s-c signs with its (revoked) key is refused under the ledger's keys.
    cfg_c = next(c for c in configs if c.site_id == "s-c")
    forged = sign_payload(
        load_private_key(cfg_c.site_key_path),
        CONTRIBUTION_PAYLOAD_TYPE,
        {"kind": "contribution", "site_id": "s-c", "run_id": result.run_id, "round": 1},
    )
    with pytest.raises(ContributionRejected) as exc:
        verify_contribution(
            forged,
            site_keys=settings.site_keys,
            run_id=result.run_id,
            server_round=1,
            base_digest="sha256:00",
            arrays_digest="sha256:00",
            expected_conditions={},
        )
    assert exc.value.reason == "unknown_site"

    # The auditor's check: keys from the replayed ledger and the pinned trust.json only.
    verify = [
        "federate",
        "verify",
        "--records",
        str(tmp_path / "records"),
        "--ledger",
        str(state),
        "--trust",
        str(state / "trust.json"),
        "--bundle",
        str(tmp_path / "bundle"),
    ]
    capsys.readouterr()
    assert main(verify) == 0
    assert "2 signed contributions verified" in capsys.readouterr().out
    # The auditor's install (the base dependencies only): the same check where no module of the
    # model or flower extras can be imported (the label prototypes are recomputed from the
    # stored shares with numpy).
    code = (
        "import sys\n"
        "for name in ('torch', 'anndata', 'flwr', 'scipy', 'sklearn', 'h5py', 'scanpy',\n"
        "             'pynndescent', 'umap', 'matplotlib'):\n"
        "    sys.modules[name] = None\n"
        "from scarches_fl_cli.main import main\n"
        "sys.exit(main(sys.argv[1:]))\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code, *verify],
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "2 signed contributions verified" in proc.stdout
    assert "label knowledge from the signed statistics of 2 sites" in proc.stdout
    # Records signed by another key than the ledger's operator key do not verify.
    other = tmp_path / "other"
    init_state(other, reference=round0)
    for site in ("s-a", "s-b"):
        enroll_site(other, site_id=site, public_key=keys[site])
    assert main([*verify[:4], "--ledger", str(other), "--trust", str(other / "trust.json")]) != 0
    assert "does not verify" in capsys.readouterr().err
    with pytest.raises(Exception, match="not signed by this ledger's operator key"):
        publish_run(other, tmp_path / "records")

    # Publish: a contributor revoked after the run is refused before anything is appended
    # (on a copy of the state directory, which holds the same keys).
    import shutil

    late = tmp_path / "coord-late"
    shutil.copytree(state, late)
    size = federation_keys(late).size
    revoke_site(late, site_id="s-b")
    with pytest.raises(Exception, match="s-b have no active key"):
        publish_run(late, tmp_path / "records")
    assert federation_keys(late).size == size + 1  # only the revocation
    with pytest.raises(Exception, match="holds no bundle"):  # a labelled run needs its bundle
        publish_run(state, tmp_path / "records")
    assert federation_keys(state).size == size
    entries = publish_run(state, tmp_path / "records", bundle=tmp_path / "bundle")
    assert [e.kind for e in entries] == ["federated_round", "federated_labels"]
    # the ledger serves the labelled bundle, whose weights are the final aggregate
    assert federation_keys(state).model.digest == read_bundle(tmp_path / "bundle").digest
    with _open(state) as reg:
        assert reg.state.digest_at(reg.state.size - 1) == result.aggregate_digest
    # A new run cannot start from a published run's aggregate: its rounds, counted from 1,
    # could never be published after this run's (refused before anything is submitted).
    from coordinator.federated_ledger import run_keys

    with pytest.raises(FederationError, match="already holds federated round 1"):
        run_keys(state)


def test_a_site_whose_studies_are_not_the_initial_models_is_left_out(tmp_path, site_configs):
    """The run starts from the ledger's model: a site announcing other studies than the model
    holds for it (here: one study fewer) does not train."""
    import dataclasses

    from coordinator.admin import enroll_site, init_state
    from coordinator.federated_server import run_federation, settings_from_run_config

    configs, keys = site_configs
    round0, _ = _initial_model(tmp_path, configs)
    state = tmp_path / "coord"
    init_state(state, reference=round0)
    for site in ("s-a", "s-b", "s-c"):
        enroll_site(state, site_id=site, public_key=keys[site])
    import anndata as ad

    cfg_b = next(c for c in configs if c.site_id == "s-b")
    a = ad.read_h5ad(cfg_b.data_path)
    a[a.obs["batch"] == "celseq"].copy().write_h5ad(tmp_path / "s-b-less.h5ad")
    changed = [
        dataclasses.replace(c, data_path=str(tmp_path / "s-b-less.h5ad"))
        if c.site_id == "s-b"
        else c
        for c in configs
    ]
    result = run_federation(
        InProcessGrid(changed), settings_from_run_config(_run_config(tmp_path, state))
    )
    assert result.sites == ["s-a", "s-c"]
