"""Federated reference training on one machine: Flower's Simulation Engine with N virtual sites.

``simulate`` splits the studies of one AnnData over N virtual sites (each study at exactly one
site; with more sites than studies the largest studies are divided into parts, see
``scarches_fl._federated.plan_sites``), gives every site a throw-away Ed25519 key (in a
temporary directory removed after the run), runs the same ServerApp and ClientApp code as a
deployment, and leaves ``OUT`` as the federated reference bundle (``manifest.json``,
``model.safetensors``) with ``OUT/federation/``: ``run.json`` and ``rounds/`` (signed records and
contribution envelopes), ``site-plan.json``, ``federation-summary.json``.

The keys come from a ledger, as in a deployment (ADR 0085): once the sites have described
themselves, the initial model becomes the genesis of a throw-away coordinator state directory
(``ledger``, default ``OUT/federation/coordinator``: ``coordinator init``), the virtual sites'
public keys are enrolled in it (``coordinator enroll``), and the run trains with the keys its
replayed ledger gives and signs its records with its operator key. ``federate verify --ledger``
and ``federate publish --dir`` read that ledger.

It uses ``flwr.simulation.run_simulation`` (the in-process Simulation Engine, Ray backend). It is
marked deprecated in Flower 1.41 in favour of ``flwr run``; we keep it because it needs no local
SuperLink on a fixed port (several users or tests on one machine would collide), and the apps are
the objects a deployment loads (docs/adr/0031-simulation-in-process.md).
"""

from __future__ import annotations

import builtins
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from coordinator.federated_deploy import FLOWER_ENV
from protocols.federated import FederationError

__all__ = ["simulate", "SimulationPlan", "plan_simulation"]

log = logging.getLogger(__name__)


class SimulationPlan:
    """Which virtual site holds which cells, where each site's private key lives, and its
    public key (enrolled in the simulation's ledger)."""

    def __init__(
        self, sites: list[Any], key_paths: dict[str, str], public_keys: dict[str, Any]
    ) -> None:
        self.sites = sites
        self.key_paths = key_paths
        self.public_keys = public_keys


def plan_simulation(
    data: str | os.PathLike[str],
    *,
    batch_key: str,
    n_sites: int,
    out: Path,
    batches: Sequence[str] | None = None,
    seed: int = 0,
    keys_dir: str | os.PathLike[str],
) -> SimulationPlan:
    import anndata as ad

    from protocols.keys import generate_private_key, save_private_key
    from scarches_fl import _federated as F
    from scarches_fl.data import DataError

    adata = ad.read_h5ad(str(data), backed="r")
    try:
        if batch_key not in adata.obs:
            raise DataError(
                f"batch key {batch_key!r} is not a column of obs "
                f"({list(adata.obs.columns)}); pass --batch-key"
            )
        values = np.asarray(adata.obs[batch_key].astype(str))
    finally:
        adata.file.close()
    rows = np.arange(len(values))
    if batches:
        unknown = sorted(set(batches) - set(values.tolist()))
        if unknown:
            raise DataError(
                f"batches {unknown} are not values of obs[{batch_key!r}] "
                f"({sorted(set(values.tolist()))})"
            )
        rows = rows[np.isin(values, list(batches))]
    plans = F.plan_sites(values[rows], n_sites, seed=seed)
    # Plans index into the filtered rows; map back to the file's rows.
    plans = [F.SitePlan(p.site_id, {k: rows[v] for k, v in p.studies.items()}) for p in plans]
    keys_dir = Path(keys_dir)
    keys_dir.mkdir(parents=True, exist_ok=True)
    key_paths: dict[str, str] = {}
    pubs: dict[str, Any] = {}
    for p in plans:
        path = keys_dir / f"{p.site_id}.key"
        k = generate_private_key()
        save_private_key(k, path, overwrite=True)
        key_paths[p.site_id] = str(path)
        pubs[p.site_id] = k.public_key()
    Path(out).mkdir(parents=True, exist_ok=True)
    import json

    from protocols.bundle import atomic_write

    # Which rows of the file each virtual site held (for evaluation and reproducibility).
    atomic_write(
        out / "site-plan.json",
        json.dumps(
            {p.site_id: {k: np.asarray(v).tolist() for k, v in p.studies.items()} for p in plans},
            sort_keys=True,
        ).encode(),
    )
    return SimulationPlan(plans, key_paths, pubs)


def simulate(
    data: str | os.PathLike[str],
    *,
    batch_key: str,
    n_sites: int,
    rounds: int,
    out: str | os.PathLike[str],
    ledger: str | os.PathLike[str] | None = None,
    label_key: str | None = None,
    label_min_cells: int = 5,
    label_site_floor: int = 5,
    batches: Sequence[str] | None = None,
    local_epochs: int = 5,
    lr: float = 1e-3,
    batch_size: int = 128,
    prox_mu: float = 0.0,
    kl_warmup_rounds: int = 0,
    patience: int = 5,
    likelihood: str = "nb",
    n_hidden: int = 128,
    n_layers: int = 2,
    n_latent: int = 10,
    seed: int = 0,
    round_timeout: float = 600.0,
    client_mods: Sequence[Any] = (),
    num_cpus: int | None = None,
    flwr_home: str | None = None,
) -> Any:
    """Run federated reference training on ``n_sites`` virtual sites; returns the
    :class:`~coordinator.federated_server.FederationResult`. ``ledger``: the coordinator state
    directory to create for the run's keys (default ``OUT/federation/coordinator``; it must not
    exist yet). ``client_mods``: Flower client
    mods around every virtual site's ClientApp (tests use them to make a site fail or to alter
    a contribution in transit; virtual site ``site-i`` is partition ``i``)."""
    import tempfile

    out = Path(out)
    ledger_dir = Path(ledger) if ledger is not None else out / "federation" / "coordinator"
    if ledger_dir.exists() and (not ledger_dir.is_dir() or any(ledger_dir.iterdir())):
        from protocols.errors import ConfigError

        raise ConfigError(
            f"--ledger {ledger_dir}: already exists and is not empty; the simulation creates a "
            "new coordinator state directory for its throw-away keys. Pick a new directory"
        )
    out.mkdir(parents=True, exist_ok=True)
    os.environ.update(FLOWER_ENV)
    home_tmp = None
    if flwr_home is not None:
        os.environ["FLWR_HOME"] = str(flwr_home)
    elif "FLWR_HOME" not in os.environ:
        # A private FLWR_HOME (its default config names a remote SuperLink), removed afterwards.
        home_tmp = tempfile.TemporaryDirectory(prefix="scarches-fl-flwr-home-")
        os.environ["FLWR_HOME"] = home_tmp.name
    from coordinator.admin import enroll_site, init_state
    from coordinator.federated_ledger import federation_keys
    from coordinator.federated_server import FederationSettings, build_server_app
    from site_agent.federated_client import FederatedSiteConfig, build_client_app

    records = out / "federation"
    keys_tmp = tempfile.TemporaryDirectory(prefix="scarches-fl-sim-keys-")
    plan = plan_simulation(
        data,
        batch_key=batch_key,
        n_sites=n_sites,
        out=records,
        batches=batches,
        seed=seed,
        keys_dir=keys_tmp.name,
    )
    configs = [
        FederatedSiteConfig(
            site_id=p.site_id,
            data_path=str(data),
            batch_key=batch_key,
            site_key_path=plan.key_paths[p.site_id],
            studies={k: np.asarray(v).tolist() for k, v in p.studies.items()},
            # the virtual sites hold the minimum the simulated federation asks for
            label_site_minimum=max(1, int(label_site_floor)),
        )
        for p in plan.sites
    ]

    def trust_initial_model(initial: Any) -> tuple[dict[str, Any], Any]:
        """The initial model (written to models/round-0000) becomes the genesis of the
        throw-away ledger, which enrols the virtual sites; the run takes its keys from there."""
        init_state(ledger_dir, reference=records / "models" / "round-0000")
        for site_id, public_key in sorted(plan.public_keys.items()):
            enroll_site(ledger_dir, site_id=site_id, public_key=public_key)
        keys = federation_keys(ledger_dir)
        if keys.model.digest != initial.digest:
            raise FederationError("internal: the simulation's ledger does not serve its model")
        return keys.site_keys, keys.signing_key

    settings = FederationSettings(
        out_dir=str(records),
        bundle_dir=str(out),
        site_keys=None,
        coordinator_key=None,
        trust_initial_model=trust_initial_model,
        rounds=rounds,
        local_epochs=local_epochs,
        lr=lr,
        batch_size=batch_size,
        prox_mu=prox_mu,
        kl_warmup_rounds=kl_warmup_rounds,
        patience=patience,
        min_sites=n_sites,
        round_timeout=round_timeout,
        # The wait ends as soon as every virtual site has described itself; Ray starting N
        # workers on a loaded machine took over 30 s (a run failed with 2 of 3 sites).
        wait_for_sites=120.0,
        seed=seed,
        likelihood=likelihood,
        n_hidden=n_hidden,
        n_layers=n_layers,
        n_latent=n_latent,
        batch_key=batch_key,
        label_key=label_key,
        label_min_cells=label_min_cells,
        label_site_floor=label_site_floor,
    )

    def resolve(context: Any) -> Any:
        return configs[int(context.node_config["partition-id"])]

    server_app = build_server_app(settings)
    client_app = build_client_app(resolve, mods=client_mods)
    cpus = int(num_cpus or max(1, min(len(configs), os.cpu_count() or 1)))
    backend_config: dict[str, dict[str, Any]] = {
        "client_resources": {"num_cpus": 1, "num_gpus": 0.0},
        "init_args": {"num_cpus": cpus, "num_gpus": 0, "include_dashboard": False},
    }
    from flwr.simulation import run_simulation

    print_before = builtins.print
    try:
        run_simulation(
            server_app=server_app,
            client_app=client_app,
            num_supernodes=n_sites,
            backend_config=backend_config,
        )
    finally:
        # Ray may still have replaced builtins.print (RAY_TQDM_PATCH_PRINT set by the caller's
        # environment before ours); numba cannot compile against a replaced print.
        builtins.print = print_before
        keys_tmp.cleanup()  # virtual sites' private keys exist only for the run
        if home_tmp is not None:
            os.environ.pop("FLWR_HOME", None)
            home_tmp.cleanup()
    result = settings.extra.get("result")
    if result is None:
        raise FederationError(
            "the federated simulation ended without a result; see the log "
            "above for the ServerApp's error"
        )
    return result
