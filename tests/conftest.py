"""Shared fixtures: where the consortium's real datasets are, and seeding."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

PROJECT_ROOT = Path(__file__).resolve().parent.parent
_SHARED_CANDIDATES = [
    Path(os.environ["SCARCHES_FL_SHARED"]) if os.environ.get("SCARCHES_FL_SHARED") else None,
    PROJECT_ROOT.parent / "shared",
    PROJECT_ROOT / "shared",
]


def shared_dir() -> Path:
    """The ``shared/`` folder beside the checkout (CI puts it there)."""
    looked = []
    for cand in _SHARED_CANDIDATES:
        if cand is None:
            continue
        looked.append(str(cand))
        if (cand / "data").is_dir():
            return cand
    pytest.fail(
        "the shared datasets were not found; looked in: "
        + ", ".join(looked)
        + ". Put the consortium's shared/ folder beside the checkout or set SCARCHES_FL_SHARED."
    )
    raise AssertionError  # unreachable


@pytest.fixture(scope="session")
def shared_data() -> Path:
    return shared_dir() / "data"


@pytest.fixture(scope="session")
def testvectors() -> Path:
    return shared_dir() / "testvectors"


@pytest.fixture(autouse=True)
def _flower_offline(monkeypatch: pytest.MonkeyPatch, tmp_path_factory: pytest.TempPathFactory):
    """Flower must never phone home from a test (see FLOWER-NOTES.md)."""
    monkeypatch.setenv("FLWR_TELEMETRY_ENABLED", "0")
    monkeypatch.setenv("FLWR_DISABLE_UPDATE_CHECK", "1")
    monkeypatch.setenv("FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION", "1")
    monkeypatch.setenv("RAY_USAGE_STATS_ENABLED", "0")
