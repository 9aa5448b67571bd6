"""docs/federated.md's simulated run into a ledger: `coordinator init` on the run's initial
model, `federate publish --enroll` (the virtual sites' keys come from the run's policy, no
copying them out by hand), and the auditor's replay ends in the federated bundle."""

from __future__ import annotations

from pathlib import Path

import pytest

from scarches_fl_cli.main import main

pytestmark = [pytest.mark.flower, pytest.mark.slow, pytest.mark.timeout(900)]


def test_publish_enroll_puts_a_simulated_run_into_the_ledger(
    tmp_path: Path, shared_data: Path, capsys
) -> None:
    from protocols.keys import generate_private_key, save_public_key
    from scarches_fl_cli.federated_simulation import simulate

    out = tmp_path / "ref-fed"
    result = simulate(
        shared_data / "panc8_sub_nebula.h5ad",
        batch_key="batch",
        label_key="cell_type",
        n_sites=2,
        rounds=1,
        out=out,
        batches=["celseq", "fluidigmc1"],
        local_epochs=1,
        seed=0,
    )
    records = out / "federation"
    state = tmp_path / "coord"
    initial = str(records / "models" / "round-0000")
    assert main(["coordinator", "init", "--dir", str(state), "--reference", initial]) == 0
    # A site already enrolled under another key than the run's policy names: refused, nothing
    # appended.
    other = tmp_path / "other"
    other_state = tmp_path / "other-coord"
    assert main(["coordinator", "init", "--dir", str(other_state), "--reference", initial]) == 0
    save_public_key(generate_private_key(), other)
    enroll = ["coordinator", "enroll", "--dir", str(other_state), "--site-id", result.sites[0]]
    assert main([*enroll, "--public-key", str(other)]) == 0
    capsys.readouterr()
    publish = ["federate", "publish", "--records", str(records), "--enroll"]
    assert main([*publish, "--dir", str(other_state)]) != 0
    assert "policy names another key" in capsys.readouterr().err

    # Without --enroll, contributors this ledger does not know: refused before anything is
    # appended, naming the fix.
    assert main(["federate", "publish", "--records", str(records), "--dir", str(state)]) != 0
    err = capsys.readouterr().err
    assert "not enrolled in this ledger" in err and "--enroll" in err

    assert main([*publish, "--dir", str(state)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines.count("ledger entry 1: policy") == 1
    assert sum(ln.endswith(": policy") for ln in lines) == len(result.sites)
    assert sum(ln.endswith(": federated_round") for ln in lines) == result.final_round
    trust = str(state / "trust.json")
    argv = ["audit", "--ledger", str(state), "--trust", trust, "--state", str(tmp_path / "aud")]
    assert main(argv) == 0
    report = capsys.readouterr().out
    assert "VERIFIED" in report and result.aggregate_digest in report
