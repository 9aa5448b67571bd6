"""Flower's Deployment Engine for federated reference training: the commands behind
``scarches-fl federate tls | node-keygen | superlink | register-node | supernode | run``.

Every Flower process gets :data:`~coordinator.federated_simulation.FLOWER_ENV` (telemetry, update
checks, run-time dependency installs and Ray usage stats off) and a private ``FLWR_HOME``.

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
import shutil
import sys
import tempfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from coordinator.federated_simulation import flower_environment

__all__ = [
    "write_superlink_tls",
    "write_node_auth_key",
    "superlink_command",
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


def write_superlink_tls(out: Path, *, names: Sequence[str] = ("localhost", "127.0.0.1"),
                        days: int = 825) -> dict[str, Path]:
    """A CA (``ca.crt``, ``ca.key``) and a SuperLink certificate for ``names`` signed by it
    (``server.pem``, ``server.key``). Keys are written with mode 0600."""
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
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
          .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
          .not_valid_before(now - _dt.timedelta(minutes=5))
          .not_valid_after(now + _dt.timedelta(days=days))
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
          .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                       content_commitment=False, key_encipherment=False,
                                       data_encipherment=False, key_agreement=False,
                                       encipher_only=False, decipher_only=False), critical=True)
          .sign(ca_key, hashes.SHA384()))
    key = ec.generate_private_key(ec.SECP384R1())
    from coordinator._tls import subject_alt_names

    sans = subject_alt_names(names)
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])]))
            .issuer_name(ca_name).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - _dt.timedelta(minutes=5))
            .not_valid_after(now + _dt.timedelta(days=days))
            .add_extension(x509.SubjectAlternativeName(sans), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]),
                           critical=False)
            .sign(ca_key, hashes.SHA384()))
    pem = serialization.Encoding.PEM
    pk = serialization.PrivateFormat.PKCS8
    none = serialization.NoEncryption()
    paths = {"ca_cert": out / "ca.crt", "ca_key": out / "ca.key",
             "server_cert": out / "server.pem", "server_key": out / "server.key"}
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
    atomic_write(priv, key.private_bytes(serialization.Encoding.PEM,
                                         serialization.PrivateFormat.OpenSSH,
                                         serialization.NoEncryption()), mode=0o600)
    atomic_write(pub, key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                                    serialization.PublicFormat.OpenSSH))
    return priv, pub


def _host_port(address: str) -> tuple[str, str]:
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        from protocols.errors import ConfigError

        raise ConfigError(f"{address!r} is not HOST:PORT")
    return host, port


def superlink_command(state: Path, listen: str, *, tls_dir: Path | None,
                      insecure: bool = False) -> tuple[list[str], dict[str, str]]:
    """``flower-superlink`` with TLS and SuperNode authentication (or ``--insecure``)."""
    from protocols.errors import ConfigError

    state = Path(state)
    state.mkdir(parents=True, exist_ok=True)
    host, port = _host_port(listen)
    cmd = [_bin("flower-superlink"), "--host", host, "--port", port,
           "--database", str(state / "superlink.db"),
           "--disable-runtime-dependency-installation"]
    if insecure:
        cmd.append("--insecure")
    else:
        if tls_dir is None:
            raise ConfigError("the SuperLink needs --tls DIR (from 'scarches-fl federate tls') "
                              "or --insecure for loopback development")
        tls_dir = Path(tls_dir)
        cmd += ["--ssl-ca-certfile", str(tls_dir / "ca.crt"),
                "--ssl-certfile", str(tls_dir / "server.pem"),
                "--ssl-keyfile", str(tls_dir / "server.key"), "--enable-supernode-auth"]
    return cmd, flower_environment(state / "flwr-home")


def _write_connection(flwr_home: Path, superlink: str, *, root_cert: Path | None,
                      insecure: bool) -> None:
    flwr_home.mkdir(parents=True, exist_ok=True)
    lines = ["[superlink]", f'default = "{_CONNECTION}"', "",
             f"[superlink.{_CONNECTION}]", f'address = "{superlink}"']
    if insecure:
        lines.append("insecure = true")
    elif root_cert is not None:
        lines.append(f'root-certificates = "{Path(root_cert).resolve()}"')
    (flwr_home / "config.toml").write_text("\n".join(lines) + "\n")


def register_node_command(superlink: str, public_key: Path, site_id: str, *,
                          tls_dir: Path | None, insecure: bool = False,
                          flwr_home: Path | None = None) -> tuple[list[str], dict[str, str]]:
    """``flwr supernode register`` of a site's ``node_auth.pub`` on the Control API."""
    home = Path(flwr_home or tempfile.mkdtemp(prefix="scarches-fl-flwr-"))
    _write_connection(home, superlink, root_cert=Path(tls_dir) / "ca.crt" if tls_dir else None,
                      insecure=insecure)
    cmd = [_bin("flwr"), "supernode", "register", str(public_key), _CONNECTION,
           "--name", site_id]
    return cmd, flower_environment(home)


def supernode_command(
    superlink: str, *, site_id: str, site_key: Path, data: Path, batch_key: str,
    layer: str | None = None, root_cert: Path | None = None, auth_key: Path | None = None,
    insecure: bool = False, port: int = 0, flwr_home: Path | None = None,
) -> tuple[list[str], dict[str, str]]:
    """``flower-supernode`` for one site, its node config naming its data and keys."""
    from coordinator.federated_keys import SITE_ID_RE
    from protocols.errors import ConfigError

    if not SITE_ID_RE.fullmatch(site_id):
        raise ConfigError(f"site id {site_id!r} must match {SITE_ID_RE.pattern}")

    def q(v: str) -> str:
        if '"' in v or "\\" in v:
            raise ConfigError(f"{v!r}: quotes and backslashes are not allowed in node config")
        return f'"{v}"'

    node_config = " ".join(f"{k}={q(str(v))}" for k, v in {
        "site-id": site_id, "site-key": str(Path(site_key).resolve()),
        "data-path": str(Path(data).resolve()), "batch-key": batch_key,
        **({"layer": layer} if layer else {}),
    }.items())
    if not port:
        port = _free_port()
    cmd = [_bin("flower-supernode"), "--superlink", superlink, "--node-config", node_config,
           "--host", "127.0.0.1", "--port", str(port)]
    if insecure:
        cmd.append("--insecure")
    else:
        if root_cert is None or auth_key is None:
            raise ConfigError("a SuperNode needs --root-cert (the operator's ca.crt) and "
                              "--auth-key (from 'federate node-keygen'), or --insecure")
        cmd += ["--root-certificates", str(root_cert),
                "--auth-supernode-private-key", str(auth_key)]
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
        "[build-system]", 'requires = ["hatchling"]', 'build-backend = "hatchling.build"', "",
        "[project]", 'name = "scarches-fl-federated"', f'version = "{version}"',
        'description = "Federated reference training (scarches-fl)"',
        'license = "BSD-3-Clause"', "dependencies = []", "",
        "[tool.flwr.app]", 'publisher = "scarches-fl"', "",
        "[tool.flwr.app.components]",
        'serverapp = "coordinator.federated_server:app"',
        'clientapp = "site_agent.federated_client:app"', "",
        "[tool.flwr.app.config]",
    ]
    lines += [f'"{k}" = {_toml_value(v)}' for k, v in run_config.items()]
    return "\n".join(lines) + "\n"


def run_command(
    superlink: str, *, tls_dir: Path | None, insecure: bool, run_config: Mapping[str, Any],
    flwr_home: Path | None = None,
) -> tuple[list[str], dict[str, str], Callable[[], None]]:
    """``flwr run APP scarches-fl --stream`` with a generated app directory; the third value
    removes the temporary directories."""
    tmp = Path(tempfile.mkdtemp(prefix="scarches-fl-run-"))
    app_dir = tmp / "app"
    app_dir.mkdir()
    (app_dir / "pyproject.toml").write_text(app_pyproject(run_config))
    home = Path(flwr_home or tmp / "flwr-home")
    _write_connection(home, superlink, root_cert=Path(tls_dir) / "ca.crt" if tls_dir else None,
                      insecure=insecure)
    cmd = [_bin("flwr"), "run", str(app_dir), _CONNECTION, "--stream"]
    env = flower_environment(home)

    def cleanup() -> None:
        shutil.rmtree(tmp, ignore_errors=True)

    return cmd, env, cleanup
