"""``scarches-fl demo`` -- the README's first command -- runs end to end and cleans up after itself."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

CLI = [sys.executable, "-m", "scarches_fl_cli"]


def _env(shared_data: Path) -> dict[str, str]:
    return dict(os.environ, SCARCHES_FL_SHARED=str(shared_data.parent), PYTHONUNBUFFERED="1")


@pytest.mark.slow
def test_demo_end_to_end(tmp_path: Path, shared_data: Path) -> None:
    wd = tmp_path / "demo"
    res = subprocess.run(CLI + ["demo", "--workdir", str(wd), "--max-epochs", "5"],
                         capture_output=True, text=True, env=_env(shared_data), timeout=1200)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    out = res.stdout
    assert "label acc." in out and "bytes sent" in out
    for site in ("hospital-a", "hospital-b", "hospital-c"):
        assert site in out
    summary = json.loads((wd / "demo-summary.json").read_text())
    assert len(summary["sites"]) == 3
    for row in summary["sites"]:
        assert row["cells"] > 0
        # a site sends its signed envelope and the condition columns: kilobytes, not data
        assert 0 < row["bytes_sent"] < 64_000
        assert 0.0 <= row["label_accuracy"] <= 1.0
    growth = summary["growth"]  # a later site's ductal cells, before and after a contribution
    assert growth["cells_of_type"] > 0 and growth["type"] == "ductal"
    assert growth["type_accuracy_before"] == 0.0  # the genesis reference has no such type
    assert 0.0 <= growth["type_accuracy_after"] <= 1.0
    assert "label knowledge grows" in out
    for plot in summary["plots"]:
        assert Path(plot).is_file() and Path(plot).stat().st_size > 10_000
    assert "verified" in out.lower() or "ok" in out.lower()


def test_demo_stops_its_processes_on_ctrl_c(tmp_path: Path, shared_data: Path) -> None:
    wd = tmp_path / "demo"
    # A shell without job control starts background jobs with SIGINT ignored, and a child keeps
    # that disposition (Python then never installs its Ctrl-C handler). Give the demo the
    # terminal's default, so the test checks the demo and not how pytest was launched.
    proc = subprocess.Popen(CLI + ["demo", "--workdir", str(wd), "--max-epochs", "2"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=_env(shared_data),
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    children: set[int] = set()
    try:
        deadline = time.monotonic() + 600
        assert proc.stdout is not None
        for line in proc.stdout:
            if "[5/7]" in line or time.monotonic() > deadline:
                break
        me = psutil.Process(proc.pid)
        children = {c.pid for c in me.children(recursive=True)}
        assert children, "the demo should be running the coordinator and the sites by now"
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
    time.sleep(1)
    alive = [pid for pid in children if psutil.pid_exists(pid)
             and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE]
    for pid in alive:  # do not leak them into the rest of the test session
        os.kill(pid, signal.SIGKILL)
    assert not alive, f"the demo left processes running after Ctrl-C: {alive}"
    if proc.returncode not in (130, 1, -signal.SIGINT):
        pytest.fail(f"unexpected exit code {proc.returncode}")


@pytest.mark.slow
def test_demo_reruns_in_the_same_workdir(tmp_path: Path, shared_data: Path) -> None:
    """A second run in the same workdir works (it failed with the first run's auditor state
    under the new coordinator's keys), with --keep too, and nothing of the first run's outputs
    survives it."""
    wd = tmp_path / "demo"
    argv = CLI + ["demo", "--workdir", str(wd), "--max-epochs", "2"]
    first = subprocess.run(argv, capture_output=True, text=True, env=_env(shared_data), timeout=1200)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    trust_before = (wd / "operator" / "coordinator" / "trust.json").read_bytes()
    reference_before = (wd / "operator" / "reference" / "manifest.json").read_bytes()
    stale = [wd / "plots" / "stale.png", wd / "auditor" / "state" / "stale", wd / "logs" / "x.log"]
    for path in stale:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("from the first run")
    again = subprocess.run([*argv, "--keep"], capture_output=True, text=True,
                           env=_env(shared_data), timeout=1200)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert "reusing the trained reference" in again.stdout and "VERIFIED" in again.stdout
    assert not [p for p in stale if p.exists()], "outputs of the first run survived the rerun"
    assert (wd / "operator" / "reference" / "manifest.json").read_bytes() == reference_before
    assert (wd / "operator" / "coordinator" / "trust.json").read_bytes() != trust_before
    summary = json.loads((wd / "demo-summary.json").read_text())
    assert all(Path(p).is_file() for p in summary["plots"])


def test_demo_workdir_is_emptied_and_foreign_folders_are_refused(tmp_path: Path) -> None:
    from scarches_fl_cli.demo import MARKER, DemoError, prepare_workdir

    wd = tmp_path / "wd"
    prepare_workdir(wd, keep=False)
    assert [p.name for p in wd.iterdir()] == [MARKER]
    for rel in ("operator/reference/manifest.json", "operator/coordinator/trust.json",
                "auditor/state/checkpoint", "plots/role.png", "demo-summary.json"):
        (wd / rel).parent.mkdir(parents=True, exist_ok=True)
        (wd / rel).write_text("old")
    prepare_workdir(wd, keep=True)
    left = sorted(str(p.relative_to(wd)) for p in wd.rglob("*"))
    assert left == [MARKER, "operator", "operator/reference", "operator/reference/manifest.json"]
    prepare_workdir(wd, keep=False)
    assert [p.name for p in wd.iterdir()] == [MARKER]
    # a workdir of a demo from before the marker: only the demo's own entries
    legacy = tmp_path / "legacy"
    (legacy / "operator" / "reference").mkdir(parents=True)
    (legacy / "demo-summary.json").write_text("{}")
    prepare_workdir(legacy, keep=False)
    assert [p.name for p in legacy.iterdir()] == [MARKER]
    # anything else is refused and left untouched
    mine = tmp_path / "mine"
    (mine / "operator").mkdir(parents=True)
    (mine / "thesis.tex").write_text("precious")
    with pytest.raises(DemoError, match="not a demo's"):
        prepare_workdir(mine, keep=False)
    assert (mine / "thesis.tex").read_text() == "precious" and (mine / "operator").is_dir()


def test_demo_refuses_a_foreign_workdir_before_doing_anything(tmp_path: Path, shared_data: Path,
                                                               capsys, monkeypatch) -> None:
    from scarches_fl_cli.main import main

    monkeypatch.setenv("SCARCHES_FL_SHARED", str(shared_data.parent))
    (tmp_path / "notes.txt").write_text("mine")
    assert main(["demo", "--workdir", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert "holds files that are not a demo's" in err and "--workdir" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]
