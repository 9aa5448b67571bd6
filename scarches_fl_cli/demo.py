"""``scarches-fl demo``: a whole consortium on loopback, on the bundled data.

The demo drives the real command line in real processes, exactly as an operator, three site
admins and an auditor would: it trains a reference on the panc8 reference studies (without their
ductal cells: the type the reference will learn from a site), initialises a coordinator (TLS on),
enrols three sites, starts the registry server, lets every site map its own query study and
contribute (concurrently, on the same base; hospital-b also contributes its label prototypes,
among them ductal), then hospital-a maps its study again on the grown reference -- once with the
genesis labels only, once with hospital-b's contribution -- audits the ledger, and prints two
tables. Every process it starts is stopped by its PID, also on Ctrl-C.

The demo owns its workdir: every run starts from an empty one (``--keep`` keeps only the trained
reference), so a rerun never meets the previous run's coordinator keys, auditor state, plots or
summary. It marks the workdir as a demo's (:data:`MARKER`) and refuses to empty a folder that
holds anything else.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType

__all__ = ["register", "DemoSite", "DEMO_SITES", "prepare_workdir", "MARKER"]

logger = logging.getLogger(__name__)

PANC8 = "panc8_sub_nebula.h5ad"
REFERENCE_STUDIES = ("indrop1", "indrop2", "indrop3", "indrop4", "celseq")
#: The cell type the genesis reference lacks and hospital-b teaches it (39 ductal cells).
GROWTH_TYPE = "ductal"
#: The site that contributes label prototypes, and the later site that maps again.
GROWTH_TEACHER, GROWTH_LEARNER = "hospital-b", "hospital-a"

#: Written into a workdir the demo made; only such a workdir (or an empty one) is emptied.
MARKER = ".scarches-fl-demo"
#: Everything a demo run writes at the top of its workdir.
_WORKDIR_ENTRIES = frozenset({MARKER, "operator", "sites", "auditor", "logs", "plots",
                              "demo-summary.json"})
#: What ``--keep`` keeps from a previous run.
_KEPT_REFERENCE = Path("operator") / "reference"


@dataclass(frozen=True)
class DemoSite:
    site_id: str
    studies: tuple[str, ...]


DEMO_SITES = (
    DemoSite("hospital-a", ("celseq2",)),
    DemoSite("hospital-b", ("smartseq2",)),
    DemoSite("hospital-c", ("fluidigmc1",)),
)


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "demo",
        help="a coordinator, three sites and an auditor on loopback, on the bundled data",
        description=(
            "Run a whole consortium on this machine: train a reference on the panc8 reference "
            "studies, start a coordinator (TLS on loopback), enrol three sites that each map "
            "their own study and contribute signed condition weights, audit the ledger, and "
            "print a table. Needs the shared datasets (../shared/data beside the checkout)."
        ),
    )
    p.add_argument("--workdir", type=Path, default=Path("demo-workdir"),
                   help="where every role's state, outputs and plots go (default: ./demo-workdir)")
    p.add_argument("--data-dir", type=Path, default=None,
                   help="folder holding panc8_sub_nebula.h5ad (default: ../shared/data, ./shared/data)")
    p.add_argument("--max-epochs", type=int, default=None,
                   help="reference training epochs (default: the library's default)")
    p.add_argument("--seed", type=int, default=0, help="random seed of training and mapping")
    p.add_argument("--keep", action="store_true",
                   help="reuse the reference trained by the previous run in this workdir; "
                        "everything else is made anew")
    p.set_defaults(handler=_run_demo)


class DemoError(Exception):
    user_message = True
    exit_code = 1


def find_shared_data(explicit: Path | None) -> Path:
    """The folder holding the bundled datasets; an error that says where it looked."""
    candidates = []
    if explicit is not None:
        candidates.append(explicit)
    if os.environ.get("SCARCHES_FL_SHARED"):
        candidates.append(Path(os.environ["SCARCHES_FL_SHARED"]) / "data")
    here = Path.cwd()
    pkg_root = Path(__file__).resolve().parent.parent
    for base in (here, pkg_root):
        candidates += [base.parent / "shared" / "data", base / "shared" / "data"]
    for c in candidates:
        if (c / PANC8).is_file():
            return c
    raise DemoError(
        f"could not find {PANC8}; looked in: {', '.join(str(c) for c in candidates)}. "
        "Put the consortium's shared/ folder beside the checkout, or pass --data-dir."
    )


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class _Processes:
    """Every child process of the demo, so that all of them are stopped by PID."""

    procs: list[subprocess.Popen] = field(default_factory=list)

    def start(self, argv: list[str], log_path: Path) -> subprocess.Popen:
        log = open(log_path, "ab")  # noqa: SIM115 - closed with the process
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=_child_env())
        proc._demo_log = log  # type: ignore[attr-defined]
        self.procs.append(proc)
        return proc

    def stop_all(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 10
        for proc in self.procs:
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=5)
            log = getattr(proc, "_demo_log", None)
            if log is not None:
                log.close()


def _child_env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        FLWR_TELEMETRY_ENABLED="0",
        FLWR_DISABLE_UPDATE_CHECK="1",
        RAY_USAGE_STATS_ENABLED="0",
        PYTHONUNBUFFERED="1",
    )
    return env


def _cli() -> list[str]:
    return [sys.executable, "-m", "scarches_fl_cli"]


def _run(argv: list[str], log_path: Path, what: str) -> str:
    """Run one CLI step to completion; its output goes to a log, and a failure names the log."""
    t0 = time.monotonic()
    res = subprocess.run(argv, capture_output=True, text=True, env=_child_env(), timeout=1800)
    with open(log_path, "a", encoding="utf-8") as fh:
        fh.write(f"$ {' '.join(argv)}\n{res.stdout}{res.stderr}\n")
    if res.returncode != 0:
        tail = (res.stderr or res.stdout).strip().splitlines()[-8:]
        raise DemoError(f"{what} failed (exit {res.returncode}); log: {log_path}\n  " + "\n  ".join(tail))
    logger.info("%s done in %.1f s", what, time.monotonic() - t0)
    return res.stdout


def _wait_healthy(address: str, trust: Path, proc: subprocess.Popen, log: Path, timeout: float = 60) -> None:
    from protocols.registry_client import RegistryClient

    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise DemoError(f"the coordinator exited with code {proc.returncode}; log: {log}")
        try:
            with RegistryClient(address, trust=json.loads(trust.read_text()), timeout=2) as client:
                client.health()
                return
        except Exception as exc:  # noqa: BLE001 - retried until the deadline
            last = exc
            time.sleep(0.3)
    raise DemoError(f"the coordinator did not become healthy within {timeout:.0f} s ({last}); log: {log}")


def _is_demo_workdir(wd: Path) -> bool:
    """Made by the demo: it holds the marker, or (a workdir of a version before the marker) only
    what a demo writes, including its operator folder."""
    if (wd / MARKER).is_file():
        return True
    names = {entry.name for entry in wd.iterdir()}
    return bool(names) and names <= _WORKDIR_ENTRIES and "operator" in names


def prepare_workdir(wd: Path, *, keep: bool) -> None:
    """Make ``wd`` an empty demo workdir (with ``keep``, holding only the previous reference).
    Refuses, touching nothing, a folder that holds anything the demo did not write."""
    if wd.exists() and not wd.is_dir():
        raise DemoError(f"--workdir {wd} is a file; pass a folder for the demo to own")
    if wd.is_dir() and any(wd.iterdir()) and not _is_demo_workdir(wd):
        raise DemoError(
            f"--workdir {wd} holds files that are not a demo's (no {MARKER} in it); the demo "
            "empties its workdir on every run, so pass a new or empty folder, e.g. "
            "--workdir demo-workdir"
        )
    wd.mkdir(parents=True, exist_ok=True)
    (wd / MARKER).write_text("made by `scarches-fl demo`; emptied by its next run\n")
    kept = {wd / MARKER}
    if keep:
        kept |= {wd / _KEPT_REFERENCE.parent, wd / _KEPT_REFERENCE}
    for folder in (wd, wd / _KEPT_REFERENCE.parent):
        if folder.is_dir() and (folder == wd or folder in kept):
            for entry in list(folder.iterdir()):
                if entry not in kept:
                    _remove(entry)


def _remove(path: Path) -> None:
    import shutil

    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink()


def _run_demo(args: argparse.Namespace) -> int:
    from scarches_fl._extras import require_extra

    require_extra("model", command="demo")
    data_dir = find_shared_data(args.data_dir)
    panc8 = data_dir / PANC8
    wd: Path = args.workdir.resolve()
    prepare_workdir(wd, keep=bool(args.keep))
    logs = wd / "logs"
    logs.mkdir()
    print(f"scarches-fl demo: workdir {wd}, data {panc8}")

    procs = _Processes()
    previous_sigterm = signal.getsignal(signal.SIGTERM)

    def _on_sigterm(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        return _consortium(args, panc8, wd, logs, procs)
    finally:
        procs.stop_all()
        signal.signal(signal.SIGTERM, previous_sigterm)


def _consortium(args: argparse.Namespace, panc8: Path, wd: Path, logs: Path, procs: _Processes) -> int:
    t_start = time.monotonic()
    cli = _cli()
    reference = wd / "operator" / "reference"
    if not (args.keep and (reference / "manifest.json").is_file()):
        print(f"[1/7] operator: training the reference on {', '.join(REFERENCE_STUDIES)} "
              f"(without their {GROWTH_TYPE} cells)")
        genesis = _genesis_data(panc8, wd / "operator" / "genesis.h5ad")
        train = cli + [
            "reference", "train", "--data", str(genesis), "--batch-key", "batch",
            "--label-key", "cell_type", "--batches", ",".join(REFERENCE_STUDIES),
            "--seed", str(args.seed), "--out", str(reference), "--force",  # retrained on purpose
        ]
        if args.max_epochs is not None:
            train += ["--max-epochs", str(args.max_epochs)]
        _run(train, logs / "reference.log", "reference training")
    else:
        print("[1/7] operator: reusing the trained reference")

    state = wd / "operator" / "coordinator"
    print("[2/7] operator: initialising the coordinator (log key, operator key, TLS, genesis)")
    _run(cli + ["coordinator", "init", "--dir", str(state), "--reference", str(reference),
                "--origin", "demo.scarches-fl.local/ledger"], logs / "coordinator-init.log", "coordinator init")
    trust = state / "trust.json"

    print(f"[3/7] sites: {len(DEMO_SITES)} site keys made at the sites, enrolled by the operator")
    for site in DEMO_SITES:
        site_dir = wd / "sites" / site.site_id
        _run(cli + ["site", "keygen", "--out", str(site_dir / "keys")], logs / f"{site.site_id}.log", "site keygen")
        _run(cli + ["coordinator", "enroll", "--dir", str(state), "--site-id", site.site_id,
                    "--public-key", str(site_dir / "keys" / "site.pub")], logs / "coordinator-enroll.log",
             f"enrolling {site.site_id}")

    port = _free_port()
    address = f"127.0.0.1:{port}"
    print(f"[4/7] operator: serving the registry on {address} (TLS)")
    server_log = logs / "coordinator-serve.log"
    server = procs.start(cli + ["coordinator", "serve", "--dir", str(state), "--listen", address], server_log)
    _wait_healthy(address, trust, server, server_log)

    print("[5/7] sites: each maps its own study on the same base and contributes (concurrently); "
          f"{GROWTH_TEACHER} also contributes its label prototypes")
    running = []
    for site in DEMO_SITES:
        site_dir = wd / "sites" / site.site_id
        argv = cli + [
            "site", "map", "--coordinator", address, "--trust", str(trust),
            "--key", str(site_dir / "keys" / "site.key"), "--site-id", site.site_id,
            "--state", str(site_dir / "state"), "--data", str(panc8), "--batch-key", "batch",
            "--label-key", "cell_type", "--batches", ",".join(site.studies),
            "--out", str(site_dir / "mapped.h5ad"),
        ]
        if site.site_id == GROWTH_TEACHER:
            argv.append("--contribute-labels")
        log = logs / f"{site.site_id}.log"
        running.append((site, procs.start(argv, log), time.monotonic(), log))
    site_seconds: dict[str, float] = {}
    deadline = time.monotonic() + 1800
    while len(site_seconds) < len(running):
        for site, proc, t0, log in running:
            if site.site_id in site_seconds or proc.poll() is None:
                continue
            site_seconds[site.site_id] = time.monotonic() - t0  # each site's own finish time
            if proc.returncode != 0:
                raise DemoError(f"site {site.site_id} failed to map (exit {proc.returncode}); log: {log}")
        if time.monotonic() > deadline:
            raise DemoError("the sites did not finish mapping within 30 minutes; logs in " + str(logs))
        time.sleep(0.1)

    # the operator accepts the teacher's new type into the shared vocabulary (until then it is
    # "hospital-b:ductal", a type of that site alone)
    _run(cli + ["coordinator", "label-policy", "accept", "--dir", str(state), "--label-key",
                "cell_type", "--name", f"{GROWTH_TEACHER}:{GROWTH_TYPE}", "--as", GROWTH_TYPE],
         logs / "coordinator-label-policy.log", "label-policy accept")
    print(f"[6/7] {GROWTH_LEARNER}: maps its study again on the grown reference (default "
          f"labels: expression prototypes), with the genesis labels only and with "
          f"{GROWTH_TEACHER}'s contribution, whose {GROWTH_TYPE} the operator accepted into the "
          f"vocabulary")
    learner = next(s for s in DEMO_SITES if s.site_id == GROWTH_LEARNER)
    learner_dir = wd / "sites" / learner.site_id
    for name, extra in (("mapped-genesis-labels.h5ad", ["--genesis-labels-only"]),
                        ("mapped-grown.h5ad", [])):
        _run(cli + [
            "site", "map", "--coordinator", address, "--trust", str(trust),
            "--key", str(learner_dir / "keys" / "site.key"), "--site-id", learner.site_id,
            "--state", str(learner_dir / "state"), "--data", str(panc8), "--batch-key", "batch",
            "--label-key", "cell_type", "--batches", ",".join(learner.studies),
            "--out", str(learner_dir / name), *extra,
        ], logs / f"{learner.site_id}.log", f"{learner.site_id} mapping again")
    growth = _growth_row(learner_dir)

    print("[7/7] auditor: verifying the ledger and replaying the served model")
    audit_report = wd / "auditor" / "audit-report.md"
    audit_report.parent.mkdir(parents=True, exist_ok=True)
    audit_out = _run(cli + ["audit", "--coordinator", address, "--trust", str(trust),
                            "--state", str(wd / "auditor" / "state"), "--report", str(audit_report)],
                     logs / "audit.log", "audit")

    rows = _site_rows(wd, panc8, site_seconds)
    plots = _plots(wd, panc8, reference)
    _print_table(rows)
    _print_growth(growth)
    verdict = [line for line in audit_out.splitlines() if line.strip()]
    print("\nauditor: " + (verdict[-1] if verdict else "(no output)"))
    print(f"audit report: {audit_report}")
    for p in plots:
        print(f"plot: {p}")
    (wd / "demo-summary.json").write_text(json.dumps({"sites": rows, "growth": growth,
                                                      "plots": [str(p) for p in plots],
                                                      "seconds": time.monotonic() - t_start}, indent=2))
    print(f"total: {time.monotonic() - t_start:.0f} s; summary in {wd / 'demo-summary.json'}")
    return 0


def _site_rows(wd: Path, panc8: Path, seconds: dict[str, float]) -> list[dict]:
    import anndata as ad
    import numpy as np

    rows = []
    for site in DEMO_SITES:
        site_dir = wd / "sites" / site.site_id
        out = ad.read_h5ad(site_dir / "mapped.h5ad")
        truth = out.obs["cell_type"].astype(str).to_numpy()
        pred = out.obs["cell_type_pred"].astype(str).to_numpy()
        sent = _bytes_sent(site_dir / "state")
        meta = out.uns.get("scarches_fl", {})
        rows.append({
            "site": site.site_id,
            "cells": int(out.n_obs),
            "conditions_added": [f"{site.site_id}/{s}" for s in site.studies],
            "bytes_sent": sent,
            "label_accuracy": float(np.mean(truth == pred)),
            "unknown_fraction": float(np.mean(pred == "Unknown")),
            "seconds": round(seconds[site.site_id], 1),
            "reference_version": meta.get("tree_size"),
        })
    return rows


def _genesis_data(panc8: Path, out: Path) -> Path:
    """The operator's training data: the reference studies without their GROWTH_TYPE cells."""
    import anndata as ad

    full = ad.read_h5ad(panc8)
    keep = (full.obs["batch"].astype(str).isin(REFERENCE_STUDIES)
            & (full.obs["cell_type"].astype(str) != GROWTH_TYPE)).to_numpy()
    out.parent.mkdir(parents=True, exist_ok=True)
    full[keep].copy().write_h5ad(out)
    return out


def _growth_row(site_dir: Path) -> dict:
    """The learner's accuracy on GROWTH_TYPE and on the other types, before (genesis labels) and
    after (with the contributed prototypes), and where the labels came from."""
    import anndata as ad
    import numpy as np

    row: dict = {"site": GROWTH_LEARNER, "type": GROWTH_TYPE, "taught_by": GROWTH_TEACHER}
    for when, name in (("before", "mapped-genesis-labels.h5ad"), ("after", "mapped-grown.h5ad")):
        out = ad.read_h5ad(site_dir / name)
        truth = out.obs["cell_type"].astype(str).to_numpy()
        pred = out.obs["cell_type_pred"].astype(str).to_numpy()
        new = truth == GROWTH_TYPE
        row["cells_of_type"] = int(new.sum())
        row[f"type_accuracy_{when}"] = float(np.mean(pred[new] == truth[new])) if new.any() else None
        row[f"other_accuracy_{when}"] = float(np.mean(pred[~new] == truth[~new]))
        source = out.obs["cell_type_source"].astype(str).to_numpy()  # genesis or <site>#<entry>
        row[f"type_sources_{when}"] = sorted(set(source[new & (pred == GROWTH_TYPE)].tolist()))
    return row


def _print_growth(g: dict) -> None:
    def pct(v: float | None) -> str:
        return "-" if v is None else f"{v:.3f}"

    print(f"\nlabel knowledge grows: {g['site']}'s {g['cells_of_type']} {g['type']} cells "
          f"(a type the genesis reference lacks; {g['taught_by']} contributed its prototypes)")
    print(f"{'labels used':<34} {g['type'] + ' acc.':>12} {'other types acc.':>17}")
    print(f"{'genesis only':<34} {pct(g['type_accuracy_before']):>12} {pct(g['other_accuracy_before']):>17}")
    print(f"{'genesis + ' + g['taught_by'] + ' contribution':<34} {pct(g['type_accuracy_after']):>12} "
          f"{pct(g['other_accuracy_after']):>17}")
    if g["type_sources_after"]:
        print(f"obs['cell_type_source'] of those {g['type']} calls: {', '.join(g['type_sources_after'])}")


def _bytes_sent(state: Path) -> int:
    """What left the site: the envelope and the diff of every delivered update in its outbox."""
    total = 0
    outbox = state / "outbox"
    if not outbox.is_dir():
        return 0
    for entry in outbox.rglob("*"):
        if entry.is_file() and entry.name in ("envelope.json", "diff.safetensors"):
            total += entry.stat().st_size
    return total


def _plots(wd: Path, panc8: Path, reference: Path) -> list[Path]:
    """The joint embedding of the reference and every site's cells, by role, by study, by true
    cell type and by predicted label (the report's palette: reference in grey, each site its
    own colour, Unknown in black)."""
    import anndata as ad
    import numpy as np

    from scarches_fl import report
    from scarches_fl.model import ReferenceModel

    model = ReferenceModel.from_bundle(reference)
    full = ad.read_h5ad(panc8)
    ref = full[(full.obs["batch"].isin(REFERENCE_STUDIES)
                & (full.obs["cell_type"].astype(str) != GROWTH_TYPE)).to_numpy()].copy()
    ref_latent = model.get_latent(ref, batch_key="batch", namespace="ref")
    parts_latent = [ref_latent]
    ref_role = report.REFERENCE_PREFIX
    studies = [np.char.add(f"{ref_role}: ", ref.obs["batch"].astype(str).to_numpy().astype(str))]
    types = [np.asarray(ref.obs["cell_type"].astype(str))]
    roles = [np.full(ref.n_obs, ref_role)]
    preds = [np.full(ref.n_obs, ref_role)]
    for site in DEMO_SITES:
        out = ad.read_h5ad(wd / "sites" / site.site_id / "mapped.h5ad")
        parts_latent.append(np.asarray(out.obsm["X_scarches"]))
        studies.append(np.char.add(f"{site.site_id}: ",
                                   out.obs["batch"].astype(str).to_numpy().astype(str)))
        types.append(np.asarray(out.obs["cell_type"].astype(str)))
        roles.append(np.full(out.n_obs, site.site_id))
        preds.append(np.asarray(out.obs["cell_type_pred"].astype(str)))
    latent = np.concatenate(parts_latent)
    return report.plot_joint_embedding(
        latent,
        {"role": np.concatenate(roles), "study": np.concatenate(studies),
         "cell type": np.concatenate(types), "predicted label": np.concatenate(preds)},
        out_dir=wd / "plots",
        title="panc8: reference (grey) + three sites",
    )


def _print_table(rows: list[dict]) -> None:
    header = f"{'site':<12} {'cells':>5}  {'conditions added':<24} {'bytes sent':>10} {'label acc.':>10} {'Unknown':>8} {'time s':>7}"
    print("\n" + header)
    print("-" * len(header))
    for r in rows:
        print(
            f"{r['site']:<12} {r['cells']:>5}  {', '.join(r['conditions_added']):<24} {r['bytes_sent']:>10,} "
            f"{r['label_accuracy']:>10.3f} {r['unknown_fraction']:>8.1%} {r['seconds']:>7.1f}"
        )
