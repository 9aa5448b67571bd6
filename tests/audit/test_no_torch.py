"""The auditor's install needs no torch: the audit runs in a process where torch, anndata and
flwr cannot be imported (a meta-path blocker installed by ``sitecustomize`` on PYTHONPATH)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from benchmarks.gen_ledger import GeneratedLedger

BLOCKER = '''
import sys

BLOCKED = {"torch", "anndata", "flwr", "scvi", "lightning", "pytorch_lightning"}


class _Blocker:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ModuleNotFoundError(f"No module named {name!r} (blocked by the no-torch test)", name=name)
        return None


sys.meta_path.insert(0, _Blocker())
'''

REPO = Path(__file__).resolve().parents[2]


def _run(args: list[str], tmp_path: Path) -> subprocess.CompletedProcess[str]:
    block = tmp_path / "blocker"
    block.mkdir(exist_ok=True)
    (block / "sitecustomize.py").write_text(BLOCKER)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(block), str(REPO)])
    return subprocess.run(
        [sys.executable, "-c",
         "import sys; from scarches_fl_cli.main import main; rc = main(sys.argv[1:]); "
         "assert not {'torch', 'anndata', 'flwr'} & set(sys.modules); sys.exit(rc)", *args],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=120,
    )


def test_blocker_blocks(tmp_path: Path) -> None:
    block = tmp_path / "blocker"
    block.mkdir()
    (block / "sitecustomize.py").write_text(BLOCKER)
    env = dict(os.environ, PYTHONPATH=str(block))
    proc = subprocess.run([sys.executable, "-c", "import torch"], env=env, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode != 0 and "blocked by the no-torch test" in proc.stderr


def test_audit_and_ledger_show_without_torch(ledger: GeneratedLedger, tmp_path: Path) -> None:
    proc = _run(["audit", "--ledger", str(ledger.state_dir), "--trust", str(ledger.trust_path),
                 "--state", str(tmp_path / "aud"), "--json",
                 "--report", str(tmp_path / "r.html")], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    doc = json.loads(proc.stdout)
    assert doc["verdict"] == "verified" and doc["served_digest"] == ledger.served_digest
    proc = _run(["ledger", "show", "--ledger", str(ledger.state_dir), "--trust",
                 str(ledger.trust_path), "--kind", "policy"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "enrol" in proc.stdout
