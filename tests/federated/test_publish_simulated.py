"""docs/federated.md's simulated run into a ledger: the simulation publishes its initial model
in its own throw-away ledger and enrols the virtual sites there, `federate verify` checks the
records with that ledger's keys, `federate publish` appends the rounds and the run's label
knowledge (ADR 0049), the auditor's replay ends in the federated bundle, and a site maps with
`--label-key` against the coordinator. Another ledger, or a contributor revoked after the run:
refused before anything is appended."""

from __future__ import annotations

import shutil
from pathlib import Path

import anndata as ad
import pytest

from coordinator.admin import _open
from protocols.bundle import read_bundle
from protocols.keys import generate_private_key, save_private_key, save_public_key
from scarches_fl_cli.main import main
from tests.coordinator.conftest import running_server

pytestmark = [pytest.mark.flower, pytest.mark.slow, pytest.mark.timeout(900)]


def test_simulated_run_verifies_and_publishes_under_its_ledger(
    tmp_path: Path, shared_data: Path, capsys
) -> None:
    from scarches_fl_cli.federated_simulation import simulate

    out = tmp_path / "ref-fed"
    state = tmp_path / "ref-fed-coordinator"
    result = simulate(
        shared_data / "panc8_sub_nebula.h5ad",
        batch_key="batch",
        label_key="cell_type",
        n_sites=2,
        rounds=1,
        out=out,
        ledger=state,
        batches=["celseq", "fluidigmc1"],
        local_epochs=1,
        seed=0,
    )
    records = out / "federation"
    assert not (records / "federation-policy.json").exists()  # no second key list
    trust = str(state / "trust.json")
    verify = ["federate", "verify", "--records", str(records), "--bundle", str(out)]
    capsys.readouterr()
    assert main([*verify, "--ledger", str(state), "--trust", trust]) == 0
    assert f"{len(result.sites)} signed contributions verified" in capsys.readouterr().out

    # Another ledger on the same initial model, a site enrolled under another key: neither
    # verify nor publish accepts the run there.
    initial = str(records / "models" / "round-0000")
    other_state = tmp_path / "other-coord"
    assert main(["coordinator", "init", "--dir", str(other_state), "--reference", initial]) == 0
    other = tmp_path / "other"
    save_public_key(generate_private_key(), other)
    enroll = ["coordinator", "enroll", "--dir", str(other_state), "--site-id", result.sites[0]]
    assert main([*enroll, "--public-key", str(other)]) == 0
    capsys.readouterr()
    other_trust = str(other_state / "trust.json")
    assert main([*verify, "--ledger", str(other_state), "--trust", other_trust]) != 0
    publish = ["federate", "publish", "--records", str(records)]
    assert main([*publish, "--dir", str(other_state)]) != 0
    assert "not signed by this ledger's operator key" in capsys.readouterr().err

    # A contributor revoked after the run (on a copy of the ledger): refused before anything
    # is appended, naming the fix.
    late = tmp_path / "late-coord"
    shutil.copytree(state, late)
    assert main(["coordinator", "revoke", "--dir", str(late), "--site-id", result.sites[0]]) == 0
    capsys.readouterr()
    assert main([*publish, "--dir", str(late)]) != 0
    err = capsys.readouterr().err
    assert "no active key in this ledger" in err and "coordinator enroll" in err

    assert main([*publish, "--dir", str(state)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert not any(ln.endswith(": policy") for ln in lines)  # the sites were enrolled already
    assert sum(ln.endswith(": federated_round") for ln in lines) == result.final_round
    assert lines[-2].endswith(": federated_labels") and "label knowledge" in lines[-1]
    argv = ["audit", "--ledger", str(state), "--trust", trust, "--state", str(tmp_path / "aud")]
    assert main(argv) == 0
    report = capsys.readouterr().out
    bundle = read_bundle(out)  # the ledger serves the labelled bundle the run wrote
    assert "VERIFIED" in report and bundle.digest in report
    with _open(state) as reg:
        size = reg.state.size
        assert reg.state.digest == bundle.digest
        assert reg.state.digest_at(size - 1) == result.aggregate_digest  # the final round's

    # a new site maps with --label-key against the coordinator: the served label knowledge
    site_key = tmp_path / "site-q.key"
    key = generate_private_key()
    save_private_key(key, site_key)
    save_public_key(key, tmp_path / "site-q.pub")
    enroll = ["coordinator", "enroll", "--dir", str(state), "--site-id", "site-q"]
    assert main([*enroll, "--public-key", str(tmp_path / "site-q.pub")]) == 0
    mapped = tmp_path / "site-q.h5ad"
    with running_server(state) as server:
        argv = [
            "site", "map", "--coordinator", server.address, "--trust", trust,
            "--key", str(site_key), "--site-id", "site-q", "--state", str(tmp_path / "sq"),
            "--data", str(shared_data / "panc8_sub_nebula.h5ad"), "--batch-key", "batch",
            "--label-key", "cell_type", "--batches", "celseq2", "--out", str(mapped),
            "--max-epochs", "2",
        ]  # fmt: skip
        capsys.readouterr()
        assert main(argv) == 0, capsys.readouterr().err
    obs = ad.read_h5ad(mapped).obs
    assert int(ad.read_h5ad(mapped).uns["scarches_fl"]["tree_size"]) == size + 1  # + enrolment
    classes = set(bundle.manifest["labels"]["levels"]["cell_type"]["prototype"]["classes"])
    predicted = set(obs["cell_type_pred"].astype(str))
    assert predicted <= classes | {"Unknown"} and predicted & classes
    agree = float((obs["cell_type_pred"].astype(str) == obs["cell_type"].astype(str)).mean())
    assert agree > 0.5, agree
