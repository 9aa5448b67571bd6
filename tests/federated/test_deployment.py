"""Flower Deployment Engine on loopback: a SuperLink (TLS on, SuperNode authentication on) and
three SuperNodes as real processes, started with the ``scarches-fl federate`` commands; the run
in two steps around the ledger (ADR 0085): ``init-model`` writes the initial model, the operator
publishes it (``coordinator init``) and enrols the sites, ``run --ledger`` trains two rounds with
the ledger's keys; the signed round records verify against the ledger and the written bundle, and
publish into it."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = [pytest.mark.flower, pytest.mark.network, pytest.mark.slow,
              pytest.mark.timeout(900)]

SITES = {"hosp-a": ["indrop3"], "hosp-b": ["indrop1", "celseq", "fluidigmc1"],
         "hosp-c": ["indrop2", "indrop4"]}
CLI = [sys.executable, "-m", "scarches_fl_cli"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _cli(*args: str, env: dict, timeout: float = 120) -> str:
    r = subprocess.run([*CLI, *args], env=env, capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, f"{args[:2]} failed:\n{r.stdout}\n{r.stderr}"
    return r.stdout


def _stop(procs: list[subprocess.Popen]) -> None:
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + 20
    for p in procs:
        try:
            p.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait(timeout=10)


def test_superlink_and_three_supernodes_with_tls_and_node_auth(tmp_path, shared_data):
    import anndata as ad

    from protocols.keys import generate_private_key, save_private_key, save_public_key

    env = dict(os.environ)
    env.update({"FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1",
                "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
                "RAY_USAGE_STATS_ENABLED": "0", "FLWR_HOME": str(tmp_path / "flwr-home")})
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    a = ad.read_h5ad(shared_data / "panc8_sub_nebula.h5ad")
    for site, studies in SITES.items():
        a[a.obs["batch"].isin(studies)].copy().write_h5ad(tmp_path / f"{site}.h5ad")
        k = generate_private_key()
        save_private_key(k, tmp_path / f"{site}.key")
        save_public_key(k, tmp_path / f"{site}.pub")
    _cli("federate", "tls", "--out", str(tmp_path / "tls"), env=env)
    port = _free_port()
    link = f"127.0.0.1:{port}"
    procs: list[subprocess.Popen] = []
    logs = []
    try:
        log = open(tmp_path / "superlink.log", "w")  # noqa: SIM115 - closed in finally
        logs.append(log)
        procs.append(subprocess.Popen(
            [*CLI, "federate", "superlink", "--state", str(tmp_path / "link"), "--listen", link,
             "--tls", str(tmp_path / "tls")], env=env, stdout=log, stderr=subprocess.STDOUT))
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    break
            assert procs[0].poll() is None, (tmp_path / "superlink.log").read_text()[-3000:]
            time.sleep(0.5)
        time.sleep(1.0)
        for site in SITES:
            _cli("federate", "node-keygen", "--out", str(tmp_path / f"node-{site}"), env=env)
            _cli("federate", "register-node", "--superlink", link, "--tls",
                 str(tmp_path / "tls"), "--public-key", str(tmp_path / f"node-{site}" /
                                                           "node_auth.pub"),
                 "--site-id", site, env=env)
        for site in SITES:
            log = open(tmp_path / f"supernode-{site}.log", "w")  # noqa: SIM115
            logs.append(log)
            procs.append(subprocess.Popen(
                [*CLI, "federate", "supernode", "--superlink", link, "--root-cert",
                 str(tmp_path / "tls" / "ca.crt"), "--auth-key",
                 str(tmp_path / f"node-{site}" / "node_auth.key"), "--site-id", site,
                 "--site-key", str(tmp_path / f"{site}.key"), "--data",
                 str(tmp_path / f"{site}.h5ad"), "--batch-key", "batch"],
                env=env, stdout=log, stderr=subprocess.STDOUT))
        out = tmp_path / "reference"
        # Step 1: the initial model from what the sites announce (no keys yet).
        init = subprocess.run(
            [*CLI, "federate", "init-model", "--superlink", link, "--tls",
             str(tmp_path / "tls"), "--min-sites", "3", "--batch-key", "batch",
             "--out", str(out)], env=env, capture_output=True, text=True, timeout=400)
        assert init.returncode == 0, init.stdout[-3000:] + init.stderr[-3000:]
        initial = out / "federation" / "models" / "round-0000"
        deadline = time.monotonic() + 60
        while not (out / "federation" / "initial-model.json").exists():
            assert time.monotonic() < deadline, init.stdout[-3000:]
            time.sleep(1.0)
        assert not (out / "federation" / "rounds" / "run.json").exists()
        # It names each site's key id, to check against the keys the operator enrols.
        from protocols.keys import key_id, load_public_key

        for site in SITES:
            kid = key_id(load_public_key(tmp_path / f"{site}.pub"))
            assert f"site {site}: key {kid}" in init.stdout, init.stdout[-3000:]
        # The operator publishes it and enrols the three sites: the ledger is the trust root.
        state = tmp_path / "coord-state"
        _cli("coordinator", "init", "--dir", str(state), "--reference", str(initial), env=env)
        for site in SITES:
            _cli("coordinator", "enroll", "--dir", str(state), "--site-id", site,
                 "--public-key", str(tmp_path / f"{site}.pub"), env=env)
        # Step 2: train with the ledger's keys.
        run = subprocess.run(
            [*CLI, "federate", "run", "--superlink", link, "--tls", str(tmp_path / "tls"),
             "--ledger", str(state), "--rounds", "2", "--min-sites", "3",
             "--round-timeout", "300", "--local-epochs", "1",
             "--out", str(out)], env=env, capture_output=True, text=True, timeout=700)
        assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
        # ``flwr run --stream`` returns when the ServerApp finished; the bundle is written last.
        deadline = time.monotonic() + 60
        while not (out / "federation" / "rounds" / "run.json").exists():
            assert time.monotonic() < deadline, run.stdout[-3000:]
            time.sleep(1.0)
        report = _cli("federate", "verify", "--records", str(out / "federation"), "--ledger",
                      str(state), "--trust", str(state / "trust.json"), "--bundle", str(out),
                      env=env)
        assert "2 rounds, 6 signed contributions verified" in report
        published = _cli("federate", "publish", "--dir", str(state), "--records",
                         str(out / "federation"), env=env)
        assert "federated rounds to" in published
    finally:
        _stop(procs[1:])  # SuperNodes first, then the SuperLink
        _stop(procs[:1])
        for log in logs:
            log.close()
