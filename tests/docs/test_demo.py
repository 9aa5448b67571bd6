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

CLI = [sys.executable, "-m", "scarches_fl.cli"]


def _env(shared_data: Path) -> dict[str, str]:
    return dict(os.environ, SCARCHES_FL_SHARED=str(shared_data.parent), PYTHONUNBUFFERED="1")


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
    for plot in summary["plots"]:
        assert Path(plot).is_file() and Path(plot).stat().st_size > 10_000
    assert "verified" in out.lower() or "ok" in out.lower()


def test_demo_stops_its_processes_on_ctrl_c(tmp_path: Path, shared_data: Path) -> None:
    wd = tmp_path / "demo"
    proc = subprocess.Popen(CLI + ["demo", "--workdir", str(wd), "--max-epochs", "2"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=_env(shared_data))
    children: set[int] = set()
    try:
        deadline = time.monotonic() + 600
        assert proc.stdout is not None
        for line in proc.stdout:
            if "[5/6]" in line or time.monotonic() > deadline:
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
