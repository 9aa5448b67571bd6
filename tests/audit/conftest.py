"""Fixtures for the auditor's tests: small signed ledgers in coordinator state directories.

Built with ``benchmarks/gen_ledger.py`` (signing code, checkpoints, the coordinator's storage) on a
tiny numpy bundle, once per session, then copied for each test that tampers with one.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from benchmarks.gen_ledger import GeneratedLedger, build_ledger, new_keys

N_SITES = 3
N_UPDATES = 12


def small_ledger(out: Path, **kw: object) -> GeneratedLedger:
    params: dict[str, object] = dict(
        n_updates=N_UPDATES, n_sites=N_SITES, base_every=4, n_genes=20, hidden=8
    )
    params.update(kw)
    return build_ledger(out, **params)  # type: ignore[arg-type]


@pytest.fixture(scope="session")
def pristine(tmp_path_factory: pytest.TempPathFactory) -> GeneratedLedger:
    out = tmp_path_factory.mktemp("pristine") / "state"
    return small_ledger(out, keys=new_keys(N_SITES))


@pytest.fixture()
def ledger(pristine: GeneratedLedger, tmp_path: Path) -> GeneratedLedger:
    """A private copy of the pristine ledger, free to tamper with."""
    dst = tmp_path / "state"
    shutil.copytree(pristine.state_dir, dst)
    return GeneratedLedger(
        dst, dst / "trust.json", pristine.keys, pristine.size, pristine.update_indices,
        pristine.policy_indices, pristine.served_digest, 0.0,
    )
