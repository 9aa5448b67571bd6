"""``scarches-fl federate``: federated reference training over Flower.

* ``simulate``: N virtual sites on this machine (Simulation Engine), one command.
* ``verify``: the auditor's check of a run's signed records against a bundle, with the keys of
  the coordinator's ledger.
* ``publish``: append a verified run's rounds to the coordinator's ledger.
* ``tls``, ``node-keygen``: TLS material for the SuperLink; a site's SuperNode auth key.
* ``superlink``, ``register-node``, ``supernode``, ``init-model``, ``run``: the Deployment
  Engine, one process per role (see ``docs/federated.md``). A run has two steps around the
  ledger, its one trust root (ADR 0085): ``init-model`` writes the initial model the operator
  publishes (``coordinator init``) before enrolling the sites; ``run --ledger`` trains with the
  keys the ledger gives.

Only ``argparse`` at module level; flwr, torch and anndata load inside the handlers.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

__all__ = ["register"]

_REF_HELP = "scarches-fl federate simulate --data H5AD --batch-key K --label-key L --sites N --rounds R --out BUNDLE_DIR"


def _require_flower(command: str) -> None:
    """Stop before any work when the ``flower`` extra is missing, naming it (these commands
    run Flower, or start its executables)."""
    from scarches_fl._extras import require_extra

    require_extra("flower", command=command)


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "federate",
        help="federated reference training over Flower (simulation and deployment)",
        description="Train a reference CVAE across sites with Flower: shared weights by FedAvg "
        "(weighted by cells), each study's condition columns from its own site only; every "
        "contribution signed by the site key, every round a signed record.",
    )
    sub = p.add_subparsers(dest="federate_command", metavar="SUBCOMMAND")
    p.set_defaults(handler=lambda args: (p.print_help(), 2)[1])

    sim = sub.add_parser(
        "simulate",
        help="N virtual sites on this machine (Simulation Engine)",
        description=_REF_HELP,
    )
    sim.add_argument("--data", required=True, help="one .h5ad holding every study")
    sim.add_argument("--batch-key", required=True, help="obs column naming the study")
    sim.add_argument(
        "--label-key",
        default=None,
        help="obs column of cell-type labels: after training, the sites' per-type latent "
        "statistics become the bundle's prototypes (docs/federated.md)",
    )
    sim.add_argument("--sites", type=int, required=True, help="number of virtual sites")
    sim.add_argument("--rounds", type=int, required=True, help="maximum federated rounds")
    sim.add_argument("--out", required=True, help="bundle directory to write")
    sim.add_argument(
        "--ledger",
        default=None,
        metavar="STATE",
        help="coordinator state directory to create for the run's throw-away keys (its "
        "genesis is the initial model, the virtual sites are enrolled in it; default "
        "OUT/federation/coordinator)",
    )
    sim.add_argument(
        "--batches", default=None, help="comma-separated studies to train on (default: every study)"
    )
    _model_args(sim)
    _training_args(sim, seed=False)
    _label_args(sim)
    sim.set_defaults(handler=_simulate)

    ver = sub.add_parser(
        "verify",
        help="verify a run's signed records (and its bundle)",
        description="The auditor's offline check of a federated run: every round record "
        "signed by an operator key of the pinned trust.json, every site contribution by the "
        "key the ledger enrols for that site (verified and replayed first), the chain of "
        "aggregates from the initial model to the final one, and (with --bundle) that the "
        "bundle is it.",
    )
    ver.add_argument(
        "--records",
        required=True,
        help="the run's record directory (BUNDLE_DIR/federation for simulate)",
    )
    ver.add_argument("--bundle", default=None, help="bundle that must be the run's final model")
    ver.add_argument(
        "--ledger",
        required=True,
        metavar="STATE_DIR",
        help="a copy of the coordinator's state directory the run took its keys from",
    )
    ver.add_argument(
        "--trust",
        required=True,
        metavar="TRUST_JSON",
        help="the trust.json the operator handed out (pins the log key and operator keys)",
    )
    ver.add_argument("--json", action="store_true", help="print the report as JSON")
    ver.set_defaults(handler=_verify)

    pub = sub.add_parser(
        "publish",
        help="append a verified run to the coordinator's ledger",
        description="Verify a federated run's records and append one operator-signed "
        "federated_round entry per round to the coordinator's ledger (and, for a run with "
        "--label-key, one federated_labels entry with the bundle's label knowledge), so that "
        "the ledger's replay ends in the federated bundle. The records must verify under this ledger's "
        "keys: the run's (`federate run --ledger STATE`).",
    )
    pub.add_argument(
        "--dir",
        required=True,
        metavar="STATE",
        help="coordinator state directory, initialised with --reference RECORDS/models/round-0000",
    )
    pub.add_argument("--records", required=True, help="the run's record directory")
    pub.add_argument(
        "--bundle",
        metavar="REF",
        help="the run's bundle, for a run with label knowledge (default: the directory that "
        "holds --records, where `federate run` writes it)",
    )
    pub.set_defaults(handler=_publish)

    tls = sub.add_parser(
        "tls",
        help="CA and SuperLink certificate (operator)",
        description="Make a CA (ca.crt, ca.key) and a SuperLink certificate signed by it "
        "(server.pem, server.key) for the names sites dial, always with localhost and "
        "127.0.0.1 as well: the SuperLink's own executor dials 127.0.0.1.",
    )
    tls.add_argument("--out", required=True, help="directory for ca.crt, server.pem, server.key")
    tls.add_argument(
        "--name",
        action="append",
        default=[],
        help="a DNS name or IP address sites reach the SuperLink at (repeat); "
        "localhost and 127.0.0.1 are always added",
    )
    tls.set_defaults(handler=_tls)

    nk = sub.add_parser(
        "node-keygen",
        help="a site's SuperNode authentication key (ECDSA P-384)",
        description="Write node_auth.key (stays at the site) and node_auth.pub (for the "
        "operator's register-node).",
    )
    nk.add_argument("--out", required=True, help="directory for node_auth.key and node_auth.pub")
    nk.set_defaults(handler=_node_keygen)

    sl = sub.add_parser(
        "superlink",
        help="start the SuperLink (operator; runs until stopped)",
        description="Start Flower's SuperLink and its ServerApp executor with TLS and SuperNode "
        "authentication, and watch both: when either exits, the other is stopped and the "
        "command exits with an error that says why. Stops on SIGINT / SIGTERM.",
    )
    sl.add_argument("--state", required=True, help="directory for the SuperLink database")
    sl.add_argument("--listen", default="127.0.0.1:9092", help="HOST:PORT (Fleet+Control API)")
    sl.add_argument("--tls", default=None, help="directory written by 'federate tls'")
    sl.add_argument(
        "--insecure",
        action="store_true",
        help="no TLS and no SuperNode authentication (loopback development only)",
    )
    sl.set_defaults(handler=_superlink)

    rn = sub.add_parser(
        "register-node",
        help="enrol a site's SuperNode auth key (operator)",
        description="Register a site's node_auth.pub with the SuperLink (its Control API), "
        "so that the site's SuperNode may connect.",
    )
    rn.add_argument("--superlink", default="127.0.0.1:9092", help="SuperLink HOST:PORT")
    rn.add_argument("--tls", default=None, help="directory written by 'federate tls'")
    rn.add_argument("--public-key", required=True, help="the site's node_auth.pub")
    rn.add_argument("--site-id", required=True, help="the site's id")
    rn.set_defaults(handler=_register_node)

    sn = sub.add_parser(
        "supernode",
        help="start a site's SuperNode (site admin; runs until stopped)",
        description="Start this site's SuperNode: it connects to the SuperLink with the "
        "operator's CA and the site's node key, and trains on the site's data, which never "
        "leaves the site; contributions are signed with the site key.",
    )
    sn.add_argument("--superlink", required=True, help="SuperLink HOST:PORT (Fleet API)")
    sn.add_argument("--root-cert", default=None, help="the operator's ca.crt")
    sn.add_argument("--auth-key", default=None, help="node_auth.key from 'federate node-keygen'")
    sn.add_argument("--insecure", action="store_true", help="no TLS (loopback development only)")
    sn.add_argument("--site-id", required=True, help="this site's id, as enrolled in the ledger")
    sn.add_argument("--site-key", required=True, help="the site's Ed25519 site.key")
    sn.add_argument("--data", required=True, help="the site's .h5ad (never leaves the site)")
    sn.add_argument("--batch-key", required=True, help="obs column naming the study")
    sn.add_argument("--layer", default=None, help="read counts from this layer, not X")
    sn.add_argument(
        "--label-site-minimum",
        type=int,
        default=5,
        help="no label sum over fewer of this site's cells (a type, a batch) leaves it, even "
        "if the coordinator asks for a smaller --label-site-floor (default 5)",
    )
    sn.add_argument(
        "--port", type=int, default=0, help="local ClientAppIo port (default: a free one)"
    )
    sn.set_defaults(handler=_supernode)

    init = sub.add_parser(
        "init-model",
        help="ask the connected sites what they hold and write the initial model (operator)",
        description="The first step of a run: submit a run to the SuperLink that asks every "
        "connected SuperNode for its signed descriptor (studies, genes, cell types) and "
        "writes the initial model only (OUT/federation/models/round-0000), with "
        "OUT/federation/initial-model.json naming each site's studies and the key id its "
        "descriptor was signed with. Publish it with `coordinator init --reference`, enrol "
        "each site's key (`coordinator enroll`), then `federate run --ledger`.",
    )
    _superlink_args(init)
    init.add_argument(
        "--min-sites",
        type=int,
        default=1,
        help="sites that must have described themselves before the model is designed",
    )
    init.add_argument("--batch-key", default="batch", help="obs column naming the study")
    init.add_argument(
        "--label-key",
        default=None,
        help="obs column of cell-type labels at every site: the model gets a classifier of "
        "the types the sites name, and the run gives the bundle prototypes",
    )
    init.add_argument(
        "--label-site-floor",
        type=int,
        default=5,
        help="a cell type is named by a site only with at least this many labelled cells there",
    )
    init.add_argument("--out", required=True, help="bundle directory the run will write")
    _model_args(init)
    init.set_defaults(handler=_init_model)

    run = sub.add_parser(
        "run",
        help="submit a federated training run to the SuperLink (operator)",
        description="Submit a federated training run to the SuperLink and follow it until the "
        "ServerApp finishes; writes the bundle and the signed round records. The run starts "
        "from the ledger's current model (the initial model `federate init-model` wrote, "
        "published with `coordinator init`), takes a contribution only from a site with an "
        "active key in the ledger, and signs its records with the ledger's operator key.",
    )
    _superlink_args(run)
    run.add_argument(
        "--ledger",
        required=True,
        metavar="STATE",
        help="the coordinator state directory (its ledger gives the initial model, the site "
        "keys and the operator key that signs the records)",
    )
    run.add_argument("--rounds", type=int, required=True, help="maximum federated rounds")
    run.add_argument(
        "--min-sites",
        type=int,
        default=1,
        help="sites that must be connected before a round starts",
    )
    run.add_argument(
        "--round-timeout",
        type=float,
        default=600.0,
        metavar="SECONDS",
        help="how long a round waits for the sites' answers; a site without an "
        "answer by then is recorded as missing",
    )
    _label_args(run)
    run.add_argument("--out", required=True, help="bundle directory to write")
    _training_args(run)
    run.set_defaults(handler=_run)


def _superlink_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--superlink",
        default="127.0.0.1:9092",
        help="SuperLink HOST:PORT (its Control API; keep it local)",
    )
    p.add_argument("--tls", default=None, help="directory written by 'federate tls'")
    p.add_argument("--insecure", action="store_true", help="no TLS (loopback development only)")


def _label_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--label-min-cells",
        type=int,
        default=5,
        help="k: a cell type becomes a prototype with at least this many labelled cells "
        "summed over the sites (default 5, the site floor: ADR 0039)",
    )
    p.add_argument(
        "--label-site-floor",
        type=int,
        default=5,
        help="a cell type's statistics leave a site only with at least this many labelled "
        "cells there",
    )


def _model_args(p: argparse.ArgumentParser) -> None:
    """The initial model's design (``init-model``; ``simulate`` does both steps)."""
    p.add_argument(
        "--likelihood",
        choices=("nb", "trvae"),
        default="nb",
        help="nb: negative binomial on raw counts; trvae: MSE + MMD",
    )
    p.add_argument("--n-latent", type=int, default=10, help="latent dimensions")
    p.add_argument("--n-hidden", type=int, default=128, help="units per hidden layer")
    p.add_argument("--n-layers", type=int, default=2, help="hidden layers of encoder and decoder")
    p.add_argument("--seed", type=int, default=0, help="random seed")


def _training_args(p: argparse.ArgumentParser, *, seed: bool = True) -> None:
    p.add_argument("--local-epochs", type=int, default=5, help="epochs per site per round")
    p.add_argument("--lr", type=float, default=1e-3, help="learning rate of the sites' Adam")
    p.add_argument("--batch-size", type=int, default=128, help="cells per minibatch at a site")
    p.add_argument("--prox-mu", type=float, default=0.0, help="FedProx term (0: plain FedAvg)")
    p.add_argument(
        "--kl-warmup-rounds",
        type=int,
        default=0,
        help="rounds of linear KL warm-up (default 0: half of --rounds)",
    )
    p.add_argument(
        "--patience",
        type=int,
        default=5,
        help="rounds without improvement of the aggregated validation loss",
    )
    if seed:
        p.add_argument("--seed", type=int, default=0, help="random seed")


def _simulate(args: argparse.Namespace) -> int:
    _require_flower("federate simulate")
    from scarches_fl_cli.federated_simulation import simulate

    batches = [b for b in args.batches.split(",") if b] if args.batches else None
    result = simulate(
        args.data,
        batch_key=args.batch_key,
        label_key=args.label_key,
        label_min_cells=args.label_min_cells,
        label_site_floor=args.label_site_floor,
        n_sites=args.sites,
        rounds=args.rounds,
        out=args.out,
        ledger=args.ledger,
        batches=batches,
        local_epochs=args.local_epochs,
        lr=args.lr,
        batch_size=args.batch_size,
        prox_mu=args.prox_mu,
        kl_warmup_rounds=args.kl_warmup_rounds,
        patience=args.patience,
        likelihood=args.likelihood,
        n_hidden=args.n_hidden,
        n_layers=args.n_layers,
        n_latent=args.n_latent,
        seed=args.seed,
    )
    for r in result.rounds:
        print(
            f"round {r.round}: {len(r.contributors)} contributed, {len(r.excluded)} excluded, "
            f"{len(r.missing)} missing, validation "
            f"{r.validation_loss if r.validation_loss is None else round(r.validation_loss, 2)}"
            f", {r.seconds:.1f} s, {r.bytes_sent + r.bytes_received} bytes"
        )
    print(
        f"federated reference {result.bundle_digest} (round {result.final_round}) in "
        f"{args.out}; records in {Path(args.out) / 'federation'}"
    )
    return 0


def _verify(args: argparse.Namespace) -> int:
    from coordinator.federated_files import verify_run_directory
    from protocols._audit_sources import open_source
    from protocols.audit import load_trust_file, verified_ledger_state
    from protocols.federated import site_keys_of

    trust = load_trust_file(args.trust)
    source = open_source(ledger=args.ledger, trust=trust)
    try:
        state = verified_ledger_state(source, trust)
    finally:
        source.close()
    report = verify_run_directory(
        Path(args.records),
        site_keys=site_keys_of(state.policy),
        coordinator_key=state.policy.operator_public_keys(),
        bundle=args.bundle,
    )
    doc = {
        "ok": True,
        "run_id": report.run_id,
        "rounds": report.rounds,
        "initial_digest": report.initial_digest,
        "final_digest": report.final_digest,
        "contributions_verified": report.contributions_verified,
        "excluded": report.excluded,
        "label_shares_from": report.label_shares_from,
        "label_floors": report.label_floors,
    }
    if args.json:
        print(json.dumps(doc, indent=2))
    else:
        print(
            f"OK: run {report.run_id}, {report.rounds} rounds, "
            f"{report.contributions_verified} signed contributions verified, "
            f"{len(report.excluded)} exclusions recorded; final model {report.final_digest}"
            + (
                f"; label knowledge from the signed statistics of {len(report.label_shares_from)}"
                f" sites (k = {report.label_floors.get('min_cells')} pooled cells, site floor "
                f"{report.label_floors.get('site_floor')})"
                if report.label_shares_from
                else ""
            )
        )
    return 0


def _publish(args: argparse.Namespace) -> int:
    from coordinator.federated_ledger import publish_run

    entries = publish_run(args.dir, args.records, bundle=args.bundle)
    for e in entries:
        print(f"ledger entry {e.index}: {e.kind}")
    rounds = sum(1 for e in entries if e.kind == "federated_round")
    labels = any(e.kind == "federated_labels" for e in entries)
    print(
        f"appended {rounds} federated rounds"
        + (" and the run's label knowledge" if labels else "")
        + f" to {args.dir}"
    )
    return 0


def _tls(args: argparse.Namespace) -> int:
    from coordinator.federated_deploy import write_superlink_tls

    paths = write_superlink_tls(Path(args.out), names=args.name)
    for k, v in paths.items():
        print(f"{k}: {v}")
    return 0


def _node_keygen(args: argparse.Namespace) -> int:
    from coordinator.federated_deploy import write_node_auth_key

    priv, pub = write_node_auth_key(Path(args.out))
    print(f"wrote {priv} (keep at the site) and {pub} (give to the operator)")
    return 0


def _superlink(args: argparse.Namespace) -> int:
    _require_flower("federate superlink")
    from coordinator.federated_deploy import executor_command, run_superlink, superlink_command

    tls_dir = Path(args.tls) if args.tls else None
    cmd, env = superlink_command(
        Path(args.state), args.listen, tls_dir=tls_dir, insecure=args.insecure
    )
    return run_superlink(
        cmd,
        env,
        listen=args.listen,
        executor=lambda pid: executor_command(
            args.listen, tls_dir=tls_dir, insecure=args.insecure, superlink_pid=pid
        ),
    )


def _register_node(args: argparse.Namespace) -> int:
    import subprocess

    from coordinator.federated_deploy import check_superlink_reachable, register_node_command

    check_superlink_reachable(args.superlink, tls_dir=Path(args.tls) if args.tls else None)
    cmd, env = register_node_command(
        args.superlink,
        Path(args.public_key),
        args.site_id,
        tls_dir=Path(args.tls) if args.tls else None,
    )
    return subprocess.call(cmd, env=env)


def _supernode(args: argparse.Namespace) -> int:
    _require_flower("federate supernode")
    from coordinator.federated_deploy import supernode_command

    cmd, env = supernode_command(
        args.superlink,
        site_id=args.site_id,
        site_key=Path(args.site_key),
        data=Path(args.data),
        batch_key=args.batch_key,
        layer=args.layer,
        label_site_minimum=args.label_site_minimum,
        root_cert=Path(args.root_cert) if args.root_cert else None,
        auth_key=Path(args.auth_key) if args.auth_key else None,
        insecure=args.insecure,
        port=args.port,
    )
    return _exec(cmd, env)


def _submit(args: argparse.Namespace, command: str, run_config: dict[str, object]) -> int:
    """Submit a run with ``run_config`` to the SuperLink and follow it (``flwr run --stream``)."""
    _require_flower(command)
    import subprocess

    from coordinator.federated_deploy import check_superlink_reachable, run_command

    check_superlink_reachable(args.superlink, tls_dir=Path(args.tls) if args.tls else None)
    cmd, env, cleanup = run_command(
        args.superlink,
        tls_dir=Path(args.tls) if args.tls else None,
        insecure=args.insecure,
        run_config={
            "out": str((Path(args.out) / "federation").resolve()),
            "bundle": str(Path(args.out).resolve()),
            **run_config,
        },
    )
    try:
        return subprocess.call(cmd, env=env)
    finally:
        cleanup()


def _init_model(args: argparse.Namespace) -> int:
    started = time.time()
    rc = _submit(
        args,
        "federate init-model",
        {
            "init-only": True,
            "min-sites": args.min_sites,
            "batch-key": args.batch_key,
            "label-key": args.label_key or "",
            "label-site-floor": args.label_site_floor,
            "likelihood": args.likelihood,
            "n-latent": args.n_latent,
            "n-hidden": args.n_hidden,
            "n-layers": args.n_layers,
            "seed": args.seed,
        },
    )
    summary = Path(args.out) / "federation" / "initial-model.json"
    if rc == 0:
        _require_written(summary, since=started, command="federate init-model")
        doc = json.loads(summary.read_text())
        for site, info in sorted(doc["sites"].items()):
            studies = ", ".join(f"{k} ({v} cells)" for k, v in info["studies"].items())
            print(f"site {site}: key {info['key_id']}; {studies}")
        print(
            f"initial model {doc['initial_digest']} ({len(doc['conditions'])} conditions, "
            f"{doc['genes']} genes) in {doc['initial_model']}; publish it with "
            "`scarches-fl coordinator init --reference` and enrol each site's key with "
            "`scarches-fl coordinator enroll` (check the key ids above), then "
            "`scarches-fl federate run --ledger`"
        )
    return rc


def _run(args: argparse.Namespace) -> int:
    _require_flower("federate run")
    from coordinator.federated_ledger import run_keys

    # Before anything is submitted: the ledger opens and enrols sites (the ServerApp reads it
    # again, as the process that signs the records).
    keys = run_keys(args.ledger)
    print(
        f"run from the ledger's model {keys.model.digest} with the keys of "
        f"{len(keys.site_keys)} enrolled sites: {', '.join(sorted(keys.site_keys))}"
    )
    started = time.time()
    rc = _submit(
        args,
        "federate run",
        {
            "ledger": str(Path(args.ledger).resolve()),
            "rounds": args.rounds,
            "min-sites": args.min_sites,
            "round-timeout": args.round_timeout,
            "label-min-cells": args.label_min_cells,
            "label-site-floor": args.label_site_floor,
            "local-epochs": args.local_epochs,
            "lr": args.lr,
            "batch-size": args.batch_size,
            "prox-mu": args.prox_mu,
            "kl-warmup-rounds": args.kl_warmup_rounds,
            "patience": args.patience,
            "seed": args.seed,
        },
    )
    summary = Path(args.out) / "federation" / "federation-summary.json"
    if rc == 0:
        _require_written(summary, since=started, command="federate run")
        doc = json.loads(summary.read_text())
        print(
            f"federated reference {doc['bundle_digest']} (round {doc['final_round']}) in "
            f"{args.out}; records in {Path(args.out) / 'federation'}"
        )
    return rc


def _written(path: Path, *, since: float, seconds: float = 60.0) -> bool:
    """Whether ``path`` was written at or after ``since`` (wall clock), waiting up to
    ``seconds``: ``flwr run --stream`` can return before the ServerApp process wrote its last
    file, and an earlier run's file in the same directory must not count."""
    deadline = time.monotonic() + seconds
    while True:
        try:
            if path.stat().st_mtime >= since - 1.0:
                return True
        except FileNotFoundError:
            pass
        if time.monotonic() > deadline:
            return False
        time.sleep(0.5)


#: how long to wait, after ``flwr run`` returns, for the ServerApp's summary file
SUMMARY_WAIT_SECONDS = 60.0


def _require_written(path: Path, *, since: float, command: str) -> None:
    """The ServerApp's summary of this run, or :class:`FederationError`: ``flwr run`` exits 0
    even when the ServerApp fails (it prints the ServerApp's exit code instead)."""
    from protocols.federated import FederationError

    if not _written(path, since=since, seconds=SUMMARY_WAIT_SECONDS):
        raise FederationError(
            f"`{command}` did not finish: the ServerApp wrote no {path.name} in {path.parent} "
            f"within {SUMMARY_WAIT_SECONDS:.0f} s of `flwr run` returning, so it failed; the Flower output "
            "above says why (for example too few enrolled sites described themselves). Fix that "
            "and run the command again."
        )


def _exec(cmd: list[str], env: dict[str, str]) -> int:
    """Replace this process with ``cmd`` (a long-running Flower server), so signals reach it."""
    sys.stdout.flush()
    sys.stderr.flush()
    os.execvpe(cmd[0], cmd, env)
    return 0  # pragma: no cover
