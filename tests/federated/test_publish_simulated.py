"""docs/federated.md's simulated run into a ledger: the simulation publishes its initial model
in its own throw-away ledger and enrols the virtual sites there, `federate verify` checks the
records with that ledger's keys, `federate publish` appends the rounds, and the auditor's
replay ends in the federated bundle. Another ledger, or a contributor revoked after the run:
refused before anything is appended."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from scarches_fl_cli.main import main

pytestmark = [pytest.mark.flower, pytest.mark.slow, pytest.mark.timeout(900)]


def test_simulated_run_verifies_and_publishes_under_its_ledger(
    tmp_path: Path, shared_data: Path, capsys
) -> None:
    from protocols.keys import generate_private_key, save_public_key
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
    argv = ["audit", "--ledger", str(state), "--trust", trust, "--state", str(tmp_path / "aud")]
    assert main(argv) == 0
    report = capsys.readouterr().out
    assert "VERIFIED" in report and result.aggregate_digest in report
