"""Flower's Deployment Engine for federated reference training: the commands behind
``scarches-fl federate tls | node-keygen | superlink | register-node | supernode | run``.

Every Flower process gets :data:`FLOWER_ENV` (telemetry, update
checks, run-time dependency installs, Ray usage stats and Ray's replacement of ``print`` off) and a private ``FLWR_HOME``.

* SuperLink (operator): TLS (a CA made here signs the SuperLink certificate) and SuperNode
  authentication on; run-time dependency installation off. One port serves the Fleet API (what
  sites use, ``/v1/fleet/*``), the Control API and the Runtime API: expose only the Fleet paths
  to sites (reverse proxy / network policy, see ``docs/federated.md``).
* SuperNode (site): its ECDSA P-384 authentication key (OpenSSH format, as Flower reads it), the
  operator's CA, and a node config naming the site id, its data, batch key and site key.
* Run (operator): a generated Flower app directory (``pyproject.toml`` only: the apps are
  ``coordinator.federated_server:app`` and ``site_agent.federated_client:app`` from the installed
  scarches-fl, which must be the same version at the SuperLink and every SuperNode) submitted
  with ``flwr run`` through a connection written to the private ``FLWR_HOME``.
"""

from __future__ import annotations

import datetime as _dt
import os
import shutil
import sys
import tempfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

#: Every process that runs Flower gets these (no telemetry, no update checks, no dependency
#: installs at run time, no Ray usage stats).
FLOWER_ENV = {
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
    "RAY_USAGE_STATS_ENABLED": "0",
    # Ray's driver otherwise replaces builtins.print with its own on the first worker log line;
    # numba then cannot compile any nopython function that prints (numba.get_num_threads does),
    # so a k-NN search with pynndescent later in the same process fails with a TypingError.
    "RAY_TQDM_PATCH_PRINT": "0",
}


def flower_environment(flwr_home: str | os.PathLike[str] | None = None) -> dict[str, str]:
    """``os.environ`` plus :data:`FLOWER_ENV`, a private ``FLWR_HOME``, and this Python's
    ``bin`` directory first on ``PATH`` (Flower starts ``flower-superexec``, ``flwr-serverapp``
    and ``flwr-clientapp`` by name)."""
    env = dict(os.environ)
    env.update(FLOWER_ENV)
    bindir = os.path.dirname(sys.executable)
    env["PATH"] = os.pathsep.join([bindir, env.get("PATH", "")])
    if flwr_home is not None:
        env["FLWR_HOME"] = str(flwr_home)
    return env


__all__ = [
    "FLOWER_ENV",
    "flower_environment",
    "write_superlink_tls",
    "write_node_auth_key",
    "superlink_command",
    "executor_command",
    "check_superlink_certificate",
    "check_superlink_reachable",
    "run_superlink",
    "SuperLinkStopped",
    "LOOPBACK_NAMES",
    "register_node_command",
    "supernode_command",
    "run_command",
    "app_pyproject",
]

_CONNECTION = "scarches-fl"


def _bin(name: str) -> str:
    """A Flower executable next to this Python (the venv's), else on PATH."""
    cand = Path(sys.executable).parent / name
    if cand.exists():
        return str(cand)
    found = shutil.which(name)
    if found is None:
        from protocols.errors import ConfigError

        raise ConfigError(f"{name} is not installed; install scarches-fl[flower]")
    return found


#: Names every SuperLink certificate is valid for, whatever else it names: the SuperLink's own
#: ServerApp executor (``flower-superexec``) dials the SuperLink at 127.0.0.1, and the operator's
#: ``register-node`` and ``run`` dial it on the same host.
LOOPBACK_NAMES = ("localhost", "127.0.0.1")


def write_superlink_tls(
    out: Path, *, names: Sequence[str] = (), days: int = 825
) -> dict[str, Path]:
    """A CA (``ca.crt``, ``ca.key``) and a SuperLink certificate signed by it (``server.pem``,
    ``server.key``) for ``names`` and :data:`LOOPBACK_NAMES`. Keys are written with mode
    0600."""
    names = list(dict.fromkeys([*names, *LOOPBACK_NAMES]))
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    from protocols.bundle import atomic_write

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    now = _dt.datetime.now(_dt.UTC)
    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "scarches-fl federation CA")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _dt.timedelta(minutes=5))
        .not_valid_after(now + _dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                key_cert_sign=True,
                crl_sign=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .sign(ca_key, hashes.SHA384())
    )
    key = ec.generate_private_key(ec.SECP384R1())
    from coordinator._tls import subject_alt_names

    sans = subject_alt_names(names)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _dt.timedelta(minutes=5))
        .not_valid_after(now + _dt.timedelta(days=days))
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False
        )
        .sign(ca_key, hashes.SHA384())
    )
    pem = serialization.Encoding.PEM
    pk = serialization.PrivateFormat.PKCS8
    none = serialization.NoEncryption()
    paths = {
        "ca_cert": out / "ca.crt",
        "ca_key": out / "ca.key",
        "server_cert": out / "server.pem",
        "server_key": out / "server.key",
    }
    atomic_write(paths["ca_cert"], ca.public_bytes(pem))
    atomic_write(paths["ca_key"], ca_key.private_bytes(pem, pk, none), mode=0o600)
    atomic_write(paths["server_cert"], cert.public_bytes(pem))
    atomic_write(paths["server_key"], key.private_bytes(pem, pk, none), mode=0o600)
    return paths


def write_node_auth_key(out: Path) -> tuple[Path, Path]:
    """A SuperNode authentication key pair (ECDSA P-384, OpenSSH format): ``node_auth.key``
    (mode 0600, stays at the site) and ``node_auth.pub`` (for the operator)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    from protocols.bundle import atomic_write

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP384R1())
    priv = out / "node_auth.key"
    pub = out / "node_auth.pub"
    atomic_write(
        priv,
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.OpenSSH,
            serialization.NoEncryption(),
        ),
        mode=0o600,
    )
    atomic_write(
        pub,
        key.public_key().public_bytes(
            serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
        ),
    )
    return priv, pub


def _host_port(address: str) -> tuple[str, str]:
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        from protocols.errors import ConfigError

        raise ConfigError(f"{address!r} is not HOST:PORT")
    return host, port


def superlink_command(
    state: Path, listen: str, *, tls_dir: Path | None, insecure: bool = False
) -> tuple[list[str], dict[str, str]]:
    """``flower-superlink`` with TLS and SuperNode authentication (or ``--insecure``), in
    Flower's ``process`` isolation: its ServerApp executor is started beside it
    (:func:`executor_command`, :func:`run_superlink`), not inside it, so that its death is
    seen."""
    from protocols.errors import ConfigError

    state = Path(state)
    state.mkdir(parents=True, exist_ok=True)
    host, port = _host_port(listen)
    cmd = [
        _bin("flower-superlink"),
        "--host",
        host,
        "--port",
        port,
        "--database",
        str(state / "superlink.db"),
        "--isolation",
        "process",
        "--disable-runtime-dependency-installation",
    ]
    if insecure:
        cmd.append("--insecure")
    else:
        if tls_dir is None:
            raise ConfigError(
                "the SuperLink needs --tls DIR (from 'scarches-fl federate tls') "
                "or --insecure for loopback development"
            )
        tls_dir = Path(tls_dir)
        check_superlink_certificate(tls_dir, _executor_host(host))
        cmd += [
            "--ssl-ca-certfile",
            str(tls_dir / "ca.crt"),
            "--ssl-certfile",
            str(tls_dir / "server.pem"),
            "--ssl-keyfile",
            str(tls_dir / "server.key"),
            "--enable-supernode-auth",
        ]
    return cmd, flower_environment(state / "flwr-home")


def _executor_host(listen_host: str) -> str:
    """Where the executor dials the SuperLink: a wildcard listen address means this host."""
    return {"0.0.0.0": "127.0.0.1", "[::]": "[::1]", "::": "::1"}.get(listen_host, listen_host)


def executor_command(
    listen: str, *, tls_dir: Path | None, insecure: bool, superlink_pid: int
) -> list[str]:
    """``flower-superexec``: the process that runs the ServerApp for the SuperLink; it dials the
    SuperLink's Runtime API (the listen port, on this host) and exits with the SuperLink."""
    host, port = _host_port(listen)
    tls = (
        ["--insecure"]
        if insecure or tls_dir is None
        else ["--root-certificates", str(Path(tls_dir) / "ca.crt")]
    )
    return [
        _bin("flower-superexec"),
        *tls,
        "--runtime-api-address",
        f"{_executor_host(host)}:{port}",
        "--parent-pid",
        str(superlink_pid),
    ]


def check_superlink_certificate(tls_dir: Path, host: str) -> None:
    """Refuse a SuperLink certificate that is not valid for ``host``, the address the
    SuperLink's own executor dials (it would die at once, leaving the SuperLink unable to run
    anything)."""
    import ipaddress

    from cryptography import x509

    from protocols.errors import ConfigError

    path = Path(tls_dir) / "server.pem"
    try:
        cert = x509.load_pem_x509_certificate(path.read_bytes())
        sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except (OSError, ValueError, x509.ExtensionNotFound) as exc:
        raise ConfigError(
            f"--tls {tls_dir}: cannot read {path} ({exc}); make the TLS files "
            "with `scarches-fl federate tls --out DIR`"
        ) from exc
    names = {str(n) for n in sans.get_values_for_type(x509.DNSName)}
    names |= {str(n) for n in sans.get_values_for_type(x509.IPAddress)}
    try:
        wanted = str(ipaddress.ip_address(host.strip("[]")))
    except ValueError:
        wanted = host
    if wanted not in names:
        raise ConfigError(
            f"--tls {tls_dir}: server.pem is valid for {', '.join(sorted(names))}, not for "
            f"{wanted}, which the SuperLink's own ServerApp executor dials; make the TLS files "
            "again with `scarches-fl federate tls --out DIR --name ...` (it always adds "
            "localhost and 127.0.0.1) and send the sites the new ca.crt"
        )


def check_superlink_reachable(address: str, *, tls_dir: Path | None, timeout: float = 5.0) -> None:
    """Before ``register-node`` or ``run`` hand the address to ``flwr`` (whose only message on
    any failure is "Connection to the SuperLink is unavailable"): something must listen there
    and, with TLS, present a certificate that the operator's CA signed for that host."""
    import socket
    import ssl

    from protocols.errors import ConfigError

    host, port = _host_port(address)
    try:
        sock = socket.create_connection((host.strip("[]"), int(port)), timeout=timeout)
    except OSError as exc:
        raise ConfigError(
            f"--superlink {address}: nothing answers there ({exc.strerror or exc}); start the "
            "SuperLink first (`scarches-fl federate superlink ...`) or check the address"
        ) from exc
    with sock:
        if tls_dir is None:
            return
        ctx = ssl.create_default_context(cafile=str(Path(tls_dir) / "ca.crt"))
        try:
            ctx.wrap_socket(sock, server_hostname=host.strip("[]")).close()
        except ssl.SSLCertVerificationError as exc:
            raise ConfigError(
                f"--superlink {address}: the SuperLink's certificate does not verify for "
                f"{host} under {Path(tls_dir) / 'ca.crt'} ({exc.verify_message}); dial a name "
                "the certificate holds, or make the TLS files again with `scarches-fl federate "
                "tls` and restart the SuperLink"
            ) from exc
        except (ssl.SSLError, OSError) as exc:
            raise ConfigError(
                f"--superlink {address}: no TLS handshake with the SuperLink ({exc}); is it "
                "started with --tls, and is this its address?"
            ) from exc


class SuperLinkStopped(Exception):  # noqa: N818 - an outcome, reported to the operator
    """The SuperLink or its executor exited on its own; the other one was stopped."""

    user_message = True
    exit_code = 1


def run_superlink(
    link_cmd: list[str],
    env: dict[str, str],
    *,
    listen: str,
    executor: Callable[[int], list[str]],
    stop: Any = None,
    ready_timeout: float = 60.0,
    poll_s: float = 0.3,
) -> int:
    """Run the SuperLink and, once it listens, its executor; stop both by PID on SIGINT /
    SIGTERM (or when ``stop``, a ``threading.Event``, is set) and return 0. When either exits
    on its own, stop the other and raise :class:`SuperLinkStopped` with the executor's last
    output lines, so a SuperLink never lingers without the process that runs its ServerApps."""
    import collections
    import signal
    import subprocess
    import threading
    import time

    stop = stop or threading.Event()
    previous = {}
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGINT, signal.SIGTERM):
            previous[sig] = signal.signal(sig, lambda *_: stop.set())
    host, port = _host_port(listen)
    procs: list[subprocess.Popen[bytes]] = []
    tail: collections.deque[str] = collections.deque(maxlen=12)

    def relay(stream: Any) -> None:
        for raw in stream:
            line = raw.decode("utf-8", "replace")
            sys.stderr.write(line)
            tail.append(line.rstrip())

    try:
        link = subprocess.Popen(link_cmd, env=env)
        procs.append(link)
        deadline = time.monotonic() + ready_timeout
        while not _listening(_executor_host(host).strip("[]"), int(port)):
            if link.poll() is not None:
                raise SuperLinkStopped(
                    f"the SuperLink exited with code {link.returncode} "
                    "before it listened (its log is above)"
                )
            if stop.wait(poll_s):
                return 0
            if time.monotonic() > deadline:
                raise SuperLinkStopped(
                    f"the SuperLink did not listen on {listen} within "
                    f"{ready_timeout:.0f} s; stopped it"
                )
        runner = subprocess.Popen(executor(link.pid), env=env, stderr=subprocess.PIPE)
        procs.append(runner)
        reader = threading.Thread(target=relay, args=(runner.stderr,), daemon=True)
        reader.start()
        while not stop.wait(poll_s):
            if runner.poll() is not None:
                reader.join(timeout=5)
                raise SuperLinkStopped(
                    f"the SuperLink's ServerApp executor (flower-superexec) exited with code "
                    f"{runner.returncode}, so the SuperLink could run no training; it was "
                    "stopped too. The executor's last lines:\n  " + "\n  ".join(tail)
                )
            if link.poll() is not None:
                raise SuperLinkStopped(
                    f"the SuperLink exited with code {link.returncode} "
                    "(its log is above); its executor was stopped"
                )
        return 0
    finally:
        _stop_all(procs)
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _listening(host: str, port: int) -> bool:
    import socket

    try:
        with socket.create_connection((host, port), timeout=1.0):
            return True
    except OSError:
        return False


def _stop_all(procs: list[Any], grace: float = 10.0) -> None:
    """SIGTERM every process still running (executor first), then SIGKILL what outlives
    ``grace``; each by its PID."""
    import subprocess
    import time

    for proc in reversed(procs):
        if proc.poll() is None:
            proc.terminate()
    deadline = time.monotonic() + grace
    for proc in reversed(procs):
        try:
            proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)


def _write_connection(
    flwr_home: Path, superlink: str, *, root_cert: Path | None, insecure: bool
) -> None:
    flwr_home.mkdir(parents=True, exist_ok=True)
    lines = [
        "[superlink]",
        f'default = "{_CONNECTION}"',
        "",
        f"[superlink.{_CONNECTION}]",
        f'address = "{superlink}"',
    ]
    if insecure:
        lines.append("insecure = true")
    elif root_cert is not None:
        lines.append(f'root-certificates = "{Path(root_cert).resolve()}"')
    (flwr_home / "config.toml").write_text("\n".join(lines) + "\n")


def register_node_command(
    superlink: str,
    public_key: Path,
    site_id: str,
    *,
    tls_dir: Path | None,
    insecure: bool = False,
    flwr_home: Path | None = None,
) -> tuple[list[str], dict[str, str]]:
    """``flwr supernode register`` of a site's ``node_auth.pub`` on the Control API."""
    home = Path(flwr_home or tempfile.mkdtemp(prefix="scarches-fl-flwr-"))
    _write_connection(
        home, superlink, root_cert=Path(tls_dir) / "ca.crt" if tls_dir else None, insecure=insecure
    )
    cmd = [_bin("flwr"), "supernode", "register", str(public_key), _CONNECTION, "--name", site_id]
    return cmd, flower_environment(home)


def supernode_command(
    superlink: str,
    *,
    site_id: str,
    site_key: Path,
    data: Path,
    batch_key: str,
    layer: str | None = None,
    root_cert: Path | None = None,
    auth_key: Path | None = None,
    insecure: bool = False,
    port: int = 0,
    flwr_home: Path | None = None,
    label_site_minimum: int = 5,
) -> tuple[list[str], dict[str, str]]:
    """``flower-supernode`` for one site, its node config naming its data and keys and the
    site's own per-site minimum for label sums (ADR 0038)."""
    from protocols.bundle import NAMESPACE_RE
    from protocols.errors import ConfigError

    if not NAMESPACE_RE.fullmatch(site_id):
        raise ConfigError(f"site id {site_id!r} must match {NAMESPACE_RE.pattern}")
    if int(label_site_minimum) < 1:
        raise ConfigError(
            f"--label-site-minimum {label_site_minimum} must be at least 1 (default 5)"
        )

    def q(v: str) -> str:
        if '"' in v or "\\" in v:
            raise ConfigError(f"{v!r}: quotes and backslashes are not allowed in node config")
        return f'"{v}"'

    node_config = " ".join(
        f"{k}={q(str(v))}"
        for k, v in {
            "site-id": site_id,
            "site-key": str(Path(site_key).resolve()),
            "data-path": str(Path(data).resolve()),
            "batch-key": batch_key,
            **({"layer": layer} if layer else {}),
            "label-site-minimum": str(int(label_site_minimum)),
        }.items()
    )
    if not port:
        port = _free_port()
    cmd = [
        _bin("flower-supernode"),
        "--superlink",
        superlink,
        "--node-config",
        node_config,
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
    ]
    if insecure:
        cmd.append("--insecure")
    else:
        if root_cert is None or auth_key is None:
            raise ConfigError(
                "a SuperNode needs --root-cert (the operator's ca.crt) and "
                "--auth-key (from 'federate node-keygen'), or --insecure"
            )
        cmd += [
            "--root-certificates",
            str(root_cert),
            "--auth-supernode-private-key",
            str(auth_key),
        ]
    home = Path(flwr_home or tempfile.mkdtemp(prefix=f"scarches-fl-{site_id}-flwr-"))
    return cmd, flower_environment(home)


def _free_port() -> int:
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    s = str(v)
    if '"' in s or "\\" in s or "\n" in s:
        from protocols.errors import ConfigError

        raise ConfigError(f"{s!r}: quotes, backslashes and newlines are not allowed here")
    return f'"{s}"'


def app_pyproject(run_config: Mapping[str, Any]) -> str:
    """The Flower app's ``pyproject.toml``: components from the installed scarches-fl, and the
    run config (every key with its value)."""
    import scarches_fl

    version = getattr(scarches_fl, "__version__", "0.1.0")
    lines = [
        "[build-system]",
        'requires = ["hatchling"]',
        'build-backend = "hatchling.build"',
        "",
        "[project]",
        'name = "scarches-fl-federated"',
        f'version = "{version}"',
        'description = "Federated reference training (scarches-fl)"',
        'license = "BSD-3-Clause"',
        "dependencies = []",
        "",
        "[tool.flwr.app]",
        'publisher = "scarches-fl"',
        "",
        "[tool.flwr.app.components]",
        'serverapp = "coordinator.federated_server:app"',
        'clientapp = "site_agent.federated_client:app"',
        "",
        "[tool.flwr.app.config]",
    ]
    lines += [f'"{k}" = {_toml_value(v)}' for k, v in run_config.items()]
    return "\n".join(lines) + "\n"


def run_command(
    superlink: str,
    *,
    tls_dir: Path | None,
    insecure: bool,
    run_config: Mapping[str, Any],
    flwr_home: Path | None = None,
) -> tuple[list[str], dict[str, str], Callable[[], None]]:
    """``flwr run APP scarches-fl --stream`` with a generated app directory; the third value
    removes the temporary directories."""
    tmp = Path(tempfile.mkdtemp(prefix="scarches-fl-run-"))
    app_dir = tmp / "app"
    app_dir.mkdir()
    (app_dir / "pyproject.toml").write_text(app_pyproject(run_config))
    home = Path(flwr_home or tmp / "flwr-home")
    _write_connection(
        home, superlink, root_cert=Path(tls_dir) / "ca.crt" if tls_dir else None, insecure=insecure
    )
    cmd = [_bin("flwr"), "run", str(app_dir), _CONNECTION, "--stream"]
    env = flower_environment(home)

    def cleanup() -> None:
        shutil.rmtree(tmp, ignore_errors=True)

    return cmd, env, cleanup
