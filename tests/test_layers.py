"""The layer contracts of pyproject.toml ([tool.importlinter], ADR 0008) hold, and ``lint-imports``
fails when a module imports against them (shown on a copy of the tree with one wrong import
added)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("protocols", "scarches_fl", "coordinator", "site_agent", "scarches_fl_cli")


def _lint_imports(cwd: Path) -> subprocess.CompletedProcess[str]:
    tool = shutil.which("lint-imports") or str(Path(sys.executable).parent / "lint-imports")
    assert Path(tool).exists(), (
        "lint-imports is not installed; it comes with the dev extra: "
        "pip install -c constraints.txt -e '.[dev]'"
    )
    env = dict(os.environ, PYTHONPATH=str(cwd))  # the tree in cwd, not an installed copy
    return subprocess.run(
        [tool, "--no-cache"], cwd=cwd, env=env, capture_output=True, text=True, timeout=300
    )


def test_the_layer_contracts_hold() -> None:
    res = _lint_imports(ROOT)
    out = res.stdout + res.stderr
    assert res.returncode == 0, out[-5000:]
    kept = re.findall(r"^(.*) KEPT", out, re.M)
    assert len(kept) >= 3 and not re.search(r"BROKEN", out), out[-3000:]
    assert any("coordinator | site_agent <- scarches_fl_cli" in line for line in kept)
    assert any("command-line code lives in scarches_fl_cli only" in line for line in kept)


#: (module, the wrong import added to it, the contract it breaks, the chain lint-imports names)
WRONG_IMPORTS = [
    # the trust layer reaching up into the operator's service
    (
        "protocols/merkle.py",
        "import coordinator.storage",
        "coordinator | site_agent",
        "protocols.merkle -> coordinator.storage",
    ),
    # the two roles are independent
    (
        "site_agent/outbox.py",
        "from coordinator import storage",
        "coordinator | site_agent",
        "site_agent.outbox -> coordinator",
    ),
    # nothing imports the command-line layer, not even inside a function
    (
        "coordinator/storage.py",
        "def _wrong() -> None:\n    import scarches_fl_cli.federate",
        "scarches_fl_cli",
        "coordinator.storage -> scarches_fl_cli.federate",
    ),
    # every command lives in the command-line package
    (
        "scarches_fl/genes.py",
        "import argparse",
        "command-line code lives in scarches_fl_cli only",
        "scarches_fl.genes -> argparse",
    ),
    # the auditor's install has no torch
    ("protocols/canonical.py", "import torch", "no torch", "protocols.canonical -> torch"),
]


def test_wrong_imports_break_the_contracts(tmp_path: Path) -> None:
    """One run of lint-imports on a copy of the tree with every wrong import above added: it
    fails, marks each contract they break BROKEN and names each import."""
    for name in PACKAGES:
        shutil.copytree(ROOT / name, tmp_path / name, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    for module, line, _broken, _named in WRONG_IMPORTS:
        path = tmp_path / module
        path.write_text(path.read_text() + f"\n{line}  # deliberately wrong\n")
    res = _lint_imports(tmp_path)
    out = res.stdout + res.stderr
    assert res.returncode != 0, out[-3000:]
    for _module, _line, broken, named in WRONG_IMPORTS:
        assert re.search(rf"^.*{re.escape(broken)}.* BROKEN", out, re.M), (broken, out[-3000:])
        assert named in out, (named, out[-3000:])
