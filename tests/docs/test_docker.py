"""The container images and the compose file run exactly the documented CLI.

No Docker engine runs on these machines, so this file checks what can be checked without one:
hadolint on the Dockerfiles, that every command an image or the compose file runs parses with the
real ``scarches-fl`` parser, the image hygiene rules (non-root, volumes, health check, no secrets
copied in), and -- the important part -- it replays the compose file's start-up sequence as
plain processes on loopback: each service's command, in dependency order, with its volumes mapped
to temporary directories.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from scarches_fl_cli.main import build_parser

ROOT = Path(__file__).resolve().parents[2]
DOCKER = ROOT / "docker"
DOCKERFILES = sorted(DOCKER.glob("*.Dockerfile"))


def _dockerfile_exec_forms(path: Path) -> dict[str, list[str]]:
    """ENTRYPOINT, CMD and HEALTHCHECK CMD of a Dockerfile, in exec (JSON) form."""
    text = path.read_text().replace("\\\n", " ")
    found: dict[str, list[str]] = {}
    for line in text.splitlines():
        line = line.strip()
        for key in ("ENTRYPOINT", "CMD"):
            if line.startswith(key + " "):
                found[key] = json.loads(line[len(key) + 1 :])
        if line.startswith("HEALTHCHECK "):
            found["HEALTHCHECK"] = json.loads(line.split(" CMD ", 1)[1])
    return found


def test_there_are_two_images() -> None:
    names = {p.name for p in DOCKERFILES}
    assert names == {"coordinator.Dockerfile", "site-agent.Dockerfile"}


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_image_hygiene(path: Path) -> None:
    text = path.read_text()
    forms = _dockerfile_exec_forms(path)
    assert forms["ENTRYPOINT"] == ["scarches-fl"]
    assert "USER 10001" in text, "images run as a non-root numeric user"
    assert "VOLUME" in text and "/state" in text
    assert "HEALTHCHECK" in forms
    assert "-c constraints.txt" in text, "torch must come from the CPU constraints"
    for secret in (".key", "trust.json", ".pem"):
        assert f"COPY {secret}" not in text and secret not in "".join(
            line for line in text.splitlines() if line.startswith("COPY")
        ), f"{path.name} must not bake {secret} into the image"


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_image_commands_are_documented_cli(path: Path) -> None:
    parser = build_parser()
    forms = _dockerfile_exec_forms(path)
    parser.parse_args(forms["CMD"])
    health = forms["HEALTHCHECK"]
    assert health[0] == "scarches-fl"
    parser.parse_args(health[1:])


def test_hadolint_is_clean() -> None:
    hadolint = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    if not Path(hadolint).exists():
        pytest.skip("hadolint is not installed (it comes with the dev extra on x86_64)")
    res = subprocess.run([hadolint, *map(str, DOCKERFILES)], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stdout + res.stderr


def _compose() -> dict:
    return yaml.safe_load((DOCKER / "compose.yaml").read_text())


def test_compose_commands_are_documented_cli() -> None:
    parser = build_parser()
    services = _compose()["services"]
    assert {"coordinator", "hospital-a", "hospital-b", "hospital-c"} <= set(services)
    for name, svc in services.items():
        parser.parse_args([str(a) for a in svc["command"]])
        # a site never mounts the coordinator's keys: only trust.json would be handed out
        if name.startswith("hospital-"):
            assert svc["command"][0] == "site"
            mounted = [str(v).split(":")[0] for v in svc.get("volumes", [])]
            assert "coordinator-state" not in mounted, (
                f"{name} must not see the coordinator's state (private keys); hand out trust.json"
            )


def _order(services: dict) -> list[str]:
    done: list[str] = []
    pending = dict(services)
    for _ in range(len(services) + 1):
        for name in sorted(pending):
            deps = pending[name].get("depends_on", {})
            if all(d in done for d in deps):
                done.append(name)
                del pending[name]
                break
        if not pending:
            return done
    raise AssertionError(f"compose depends_on has a cycle among {sorted(pending)}")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.slow
def test_compose_start_up_sequence_without_docker(tmp_path: Path, shared_data: Path) -> None:
    services = _compose()["services"]
    port = _free_port()
    volumes = tmp_path / "volumes"
    env = dict(os.environ, FLWR_TELEMETRY_ENABLED="0", PYTHONUNBUFFERED="1")
    cli = [sys.executable, "-m", "scarches_fl_cli"]
    server = None
    try:
        for name in _order(services):
            svc = services[name]
            mounts: list[tuple[str, Path]] = []
            for spec in svc.get("volumes", []):
                source, target = spec.split(":")[:2]
                host = shared_data if source.endswith("shared/data") else volumes / source
                host.mkdir(parents=True, exist_ok=True)
                mounts.append((target, host))
            mounts.sort(key=lambda m: -len(m[0]))
            argv = []
            for arg in map(str, svc["command"]):
                arg = arg.replace("coordinator:7443", f"127.0.0.1:{port}").replace("0.0.0.0:7443", f"127.0.0.1:{port}")
                for target, host in mounts:
                    if arg == target or arg.startswith(target + "/"):
                        arg = str(host) + arg[len(target):]
                        break
                argv.append(arg)
            if argv[:2] == ["reference", "train"]:
                argv += ["--max-epochs", "3"]  # the sequence, not the science: keep CI short
            if argv[:2] == ["coordinator", "serve"]:
                log = open(tmp_path / "serve.log", "wb")  # noqa: SIM115
                server = subprocess.Popen(cli + argv, stdout=log, stderr=subprocess.STDOUT, env=env)
                state = argv[argv.index("--dir") + 1]
                deadline = time.monotonic() + 60
                while time.monotonic() < deadline:
                    assert server.poll() is None, (tmp_path / "serve.log").read_text()
                    ok = subprocess.run(cli + ["coordinator", "health", "--dir", state,
                                               "--address", f"127.0.0.1:{port}"],
                                        capture_output=True, env=env, timeout=30)
                    if ok.returncode == 0:
                        break
                    time.sleep(0.5)
                else:
                    raise AssertionError("coordinator never became healthy")
                continue
            res = subprocess.run(cli + argv, capture_output=True, text=True, env=env, timeout=900)
            assert res.returncode == 0, f"service {name}: {' '.join(argv)}\n{res.stdout}\n{res.stderr}"
        for site in ("hospital-a", "hospital-b", "hospital-c"):
            assert (volumes / f"{site}-out" / "mapped.h5ad").is_file()
    finally:
        if server is not None:
            server.terminate()
            try:
                server.wait(timeout=15)
            except subprocess.TimeoutExpired:
                server.kill()
                server.wait(timeout=5)
