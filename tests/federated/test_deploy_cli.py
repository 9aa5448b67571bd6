"""The Deployment Engine commands an operator runs first, as docs/federated.md writes them: the
SuperLink certificate always covers the loopback names its own executor dials, a certificate
that does not is refused before anything starts, and a SuperLink whose executor dies stops
with an error instead of lingering."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from cryptography import x509

from scarches_fl_cli.main import main

pytestmark = [pytest.mark.flower]


def _sans(pem: Path) -> set[str]:
    cert = x509.load_pem_x509_certificate(pem.read_bytes())
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return {str(n) for n in sans.get_values_for_type(x509.DNSName)} | {
        str(n) for n in sans.get_values_for_type(x509.IPAddress)
    }


def test_tls_names_always_include_loopback(tmp_path: Path) -> None:
    out = tmp_path / "fl-tls"
    argv = ["federate", "tls", "--out", str(out), "--name", "fl.consortium.example"]
    assert main([*argv, "--name", "10.0.0.5"]) == 0
    assert _sans(out / "server.pem") == {
        "fl.consortium.example",
        "10.0.0.5",
        "localhost",
        "127.0.0.1",
    }


def test_superlink_refuses_a_certificate_its_executor_cannot_use(tmp_path: Path, capsys) -> None:
    """The certificate of an older `federate tls --name fl.consortium.example` (no 127.0.0.1):
    refused at once, naming the fix, before any process starts."""
    from coordinator._tls import make_self_signed

    tls = tmp_path / "fl-tls"
    tls.mkdir()
    make_self_signed(tls / "server.pem", tls / "server.key", names=("fl.consortium.example",))
    rc = main(
        ["federate", "superlink", "--state", str(tmp_path / "s"), "--listen", "0.0.0.0:9092"]
        + ["--tls", str(tls)]
    )
    err = capsys.readouterr().err
    assert rc == 2, err
    assert "not for 127.0.0.1" in err and "scarches-fl federate tls --out DIR" in err


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _fake_superlink(port: int) -> list[str]:
    code = (
        "import socket, time; s = socket.socket(); "
        f"s.bind(('127.0.0.1', {port})); s.listen(); time.sleep(120)"
    )
    return [sys.executable, "-c", code]


def test_superlink_stops_and_says_why_when_its_executor_dies(tmp_path: Path) -> None:
    from coordinator.federated_deploy import SuperLinkStopped, run_superlink

    port = _free_port()
    pids: list[int] = []

    def executor(link_pid: int) -> list[str]:
        pids.append(link_pid)
        line = "certificate is not valid for '127.0.0.1'"
        return [sys.executable, "-c", f"import sys; print({line!r}, file=sys.stderr); exit(3)"]

    t0 = time.monotonic()
    with pytest.raises(SuperLinkStopped) as exc:
        run_superlink(
            _fake_superlink(port), {}, listen=f"0.0.0.0:{port}", executor=executor, poll_s=0.1
        )
    assert "exited with code 3" in str(exc.value)
    assert "certificate is not valid for '127.0.0.1'" in str(exc.value)
    assert time.monotonic() - t0 < 60
    # the SuperLink was stopped by its PID and reaped: nothing lingers
    res = subprocess.run(["ps", "-o", "stat=", "-p", str(pids[0])], capture_output=True, text=True)
    assert res.stdout.strip() == "", f"the SuperLink process is still there: {res.stdout!r}"


def test_superlink_and_executor_stop_together_on_request(tmp_path: Path) -> None:
    from coordinator.federated_deploy import run_superlink

    port = _free_port()
    stop = threading.Event()
    started: list[int] = []

    def executor(link_pid: int) -> list[str]:
        started.append(link_pid)
        stop.set()  # as if SIGTERM arrived once both run
        return [sys.executable, "-c", "import time; time.sleep(120)"]

    rc = run_superlink(
        _fake_superlink(port), {}, listen=f"127.0.0.1:{port}", executor=executor, stop=stop
    )
    assert rc == 0 and started
    res = subprocess.run(["ps", "-o", "stat=", "-p", str(started[0])], capture_output=True)
    assert res.stdout.strip() == b""


def test_register_node_says_when_nothing_listens(tmp_path: Path, capsys) -> None:
    """Instead of flwr's "Connection to the SuperLink is unavailable"."""
    assert main(["federate", "tls", "--out", str(tmp_path / "fl-tls")]) == 0
    assert main(["federate", "node-keygen", "--out", str(tmp_path / "node")]) == 0
    capsys.readouterr()
    port = _free_port()
    argv = ["federate", "register-node", "--superlink", f"127.0.0.1:{port}"]
    argv += ["--tls", str(tmp_path / "fl-tls"), "--site-id", "hosp-a"]
    assert main([*argv, "--public-key", str(tmp_path / "node" / "node_auth.pub")]) == 2
    err = capsys.readouterr().err
    assert f"127.0.0.1:{port}: nothing answers there" in err and "federate superlink" in err


def test_init_model_fails_when_the_server_app_wrote_no_summary(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """``flwr run --stream`` exits 0 when the ServerApp fails (it prints "Exit Code: 201"), so
    the command decides from the ServerApp's summary file: none, or an earlier run's, is a
    failure with a non-zero exit, never a success a cron job would believe."""
    from scarches_fl_cli import federate

    monkeypatch.setattr(federate, "SUMMARY_WAIT_SECONDS", 0.5)
    monkeypatch.setattr(federate, "_require_flower", lambda command: None)
    monkeypatch.setattr(federate, "_submit", lambda args, command, run_config: 0)
    out = tmp_path / "ref-fed"
    argv = ["federate", "init-model", "--insecure", "--out", str(out)]
    assert main(argv) != 0
    assert "did not finish" in capsys.readouterr().err
    # An earlier run's summary in the same directory does not make this run a success.
    summary = out / "federation" / "initial-model.json"
    summary.parent.mkdir(parents=True)
    summary.write_text("{}")
    old = time.time() - 3600
    os.utime(summary, (old, old))
    assert main(argv) != 0
    assert "did not finish" in capsys.readouterr().err
