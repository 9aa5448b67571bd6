"""The operator's commands through the real CLI: init, enroll, revoke, status, health, errors."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from protocols.bundle import write_bundle
from protocols.keys import generate_private_key, save_public_key
from protocols.policy import read_trust
from scarches_fl_cli.main import main
from tests.coordinator.synth import synthetic_reference

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def reference(tmp_path: Path) -> Path:
    write_bundle(tmp_path / "ref", synthetic_reference())
    return tmp_path / "ref"


def test_init_enroll_revoke_status(tmp_path: Path, reference: Path, capsys) -> None:
    state = tmp_path / "state"
    rc = main(
        [
            "coordinator",
            "init",
            "--dir",
            str(state),
            "--reference",
            str(reference),
            "--origin",
            "cli.example/ledger",
            "--tls-name",
            "coordinator.example",
            "--tls-name",
            "127.0.0.1",
        ]
    )
    assert rc == 0
    out = capsys.readouterr().out
    assert "trust.json" in out and "cli.example/ledger" in out
    trust = read_trust(state / "trust.json")
    assert trust.origin == "cli.example/ledger" and trust.tls_root_pem
    assert oct((state / "keys" / "log.key").stat().st_mode & 0o777) == "0o600"
    assert oct((state / "keys" / "operator.key").stat().st_mode & 0o777) == "0o600"
    assert oct((state / "tls" / "server.key").stat().st_mode & 0o777) == "0o600"
    assert not list(tmp_path.glob(".state.init-*"))

    key = generate_private_key()
    save_public_key(key, tmp_path / "site.pub")
    assert (
        main(
            [
                "coordinator",
                "enroll",
                "--dir",
                str(state),
                "--site-id",
                "hospital-a",
                "--public-key",
                str(tmp_path / "site.pub"),
            ]
        )
        == 0
    )
    # Enrolling the same site again is refused by the policy rules, with the reason.
    assert (
        main(
            [
                "coordinator",
                "enroll",
                "--dir",
                str(state),
                "--site-id",
                "hospital-a",
                "--public-key",
                str(tmp_path / "site.pub"),
            ]
        )
        != 0
    )
    err = capsys.readouterr().err
    assert err.startswith("error: ")
    assert main(["coordinator", "revoke", "--dir", str(state), "--site-id", "hospital-a"]) == 0
    capsys.readouterr()

    assert main(["coordinator", "status", "--dir", str(state), "--json", "--verify"]) == 0
    st = json.loads(capsys.readouterr().out)
    assert st["tree_size"] == 3 and st["verified"]
    assert st["sites"]["hospital-a"]["revoked"] is True
    assert st["blobs"]["count"] == 2 and st["blobs"]["orphans"] == 0
    assert main(["coordinator", "status", "--dir", str(state)]) == 0
    text = capsys.readouterr().out
    assert "tree size     3" in text and "hospital-a" in text and "revoked" in text


def test_init_refuses_existing_dir(tmp_path: Path, reference: Path, capsys) -> None:
    (tmp_path / "state").mkdir()
    (tmp_path / "state" / "something").write_text("x")
    assert (
        main(
            ["coordinator", "init", "--dir", str(tmp_path / "state"), "--reference", str(reference)]
        )
        == 2
    )
    assert "already exists" in capsys.readouterr().err


def test_init_with_a_broken_bundle_leaves_nothing(tmp_path: Path, reference: Path, capsys) -> None:
    (reference / "manifest.json").write_text("{}")
    assert (
        main(
            ["coordinator", "init", "--dir", str(tmp_path / "state"), "--reference", str(reference)]
        )
        != 0
    )
    assert "error:" in capsys.readouterr().err
    assert not (tmp_path / "state").exists()
    assert not list(tmp_path.glob(".state.init-*"))


def test_init_with_a_modified_bundle_tells_the_operator_what_to_do(
    tmp_path: Path, reference: Path, capsys
) -> None:
    """The operator publishes a bundle from their own disk: the advice is to restore or rewrite
    it, not to "fetch it again from the coordinator" (they are the coordinator)."""
    from protocols.canonical import canonical_json

    manifest = json.loads((reference / "manifest.json").read_bytes())
    manifest["hyperparameters"]["n_hidden"] += 1
    (reference / "manifest.json").write_bytes(canonical_json(manifest))
    state = str(tmp_path / "state")
    assert main(["coordinator", "init", "--dir", state, "--reference", str(reference)]) == 3
    err = capsys.readouterr().err
    assert "modified or corrupted after it was written" in err
    assert "restore an unmodified copy" in err and "reference train" in err
    assert "coordinator" not in err.split("digest mismatch", 1)[1]


def test_serve_refuses_bad_config_and_insecure_public(
    tmp_path: Path, reference: Path, capsys
) -> None:
    state = tmp_path / "state"
    assert main(["coordinator", "init", "--dir", str(state), "--reference", str(reference)]) == 0
    capsys.readouterr()
    assert (
        main(["coordinator", "serve", "--dir", str(state), "--listen", "0.0.0.0:0", "--insecure"])
        == 2
    )
    assert "non-loopback" in capsys.readouterr().err
    cfg = state / "coordinator.yaml"
    cfg.write_text(cfg.read_text().replace("max_workers: 16", "max_workers: many"))
    assert main(["coordinator", "serve", "--dir", str(state)]) == 2
    err = capsys.readouterr().err
    assert "coordinator.yaml" in err and "limits.max_workers" in err


def _health(state: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "scarches_fl_cli", "coordinator", "health", "--dir", str(state)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_health_of_a_running_server(tmp_path: Path, reference: Path) -> None:
    state = tmp_path / "state"
    assert main(["coordinator", "init", "--dir", str(state), "--reference", str(reference)]) == 0
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "scarches_fl_cli",
            "coordinator",
            "serve",
            "--dir",
            str(state),
            "--listen",
            "127.0.0.1:0",
        ],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        import time

        deadline = time.monotonic() + 60
        while not (state / "serve.json").exists():
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.05)
        res = _health(state, env)
        assert res.returncode == 0, res.stderr
        assert res.stdout.startswith("serving:")
        # A copy is not the live directory: no answer from the original's server for it, both
        # for a backup (no serve.json) and for a plain copy (serve.json names the original).
        backup, plain = tmp_path / "backup", tmp_path / "plain-copy"
        assert main(["coordinator", "backup", "--dir", str(state), "--out", str(backup)]) == 0
        shutil.copytree(state, plain)
        for copy in (backup, plain):
            res = _health(copy, env)
            assert res.returncode == 1, res.stdout
            assert res.stderr.startswith(f"not serving: no `coordinator serve` runs on {copy}")
    finally:
        proc.terminate()  # SIGTERM: graceful stop
        out = proc.communicate(timeout=30)[0].decode()
    assert proc.returncode == 0, out
    assert not (state / "serve.json").exists()
    assert "TLS" in out
    assert _health(state, env).returncode == 1


@pytest.mark.parametrize(
    ("listen", "port", "where", "dial"),
    [
        ("127.0.0.1:0", 7443, "127.0.0.1:7443", "127.0.0.1:7443"),
        ("0.0.0.0:7443", 7443, "0.0.0.0:7443", "127.0.0.1:7443"),
        ("[::]:7443", 7443, "[::]:7443", "[::1]:7443"),
        ("registry.example:7443", 7443, "registry.example:7443", "registry.example:7443"),
    ],
)
def test_serve_says_where_it_really_listens(listen: str, port: int, where: str, dial: str) -> None:
    from coordinator.admin import listen_addresses

    assert listen_addresses(listen, port) == (where, dial)


def test_enroll_prints_the_fingerprint_keygen_printed(
    tmp_path: Path, reference: Path, capsys
) -> None:
    state = tmp_path / "state"
    assert main(["coordinator", "init", "--dir", str(state), "--reference", str(reference)]) == 0
    assert main(["site", "keygen", "--out", str(tmp_path / "keys")]) == 0
    out = capsys.readouterr().out
    fingerprint = next(ln for ln in out.splitlines() if ln.startswith("fingerprint (key id): "))
    pub = str(tmp_path / "keys" / "site.pub")
    argv = ["coordinator", "enroll", "--dir", str(state), "--site-id", "hospital-a"]
    assert main([*argv, "--public-key", pub]) == 0
    out = capsys.readouterr().out
    assert fingerprint in out.splitlines() and "second channel" in out


#: What the coordinator's image does not install: the science stack and the site agent.
_NOT_IN_THE_IMAGE = ("torch", "anndata", "flwr", "site_agent")
_BLOCKER = f"""
import sys

class _Blocker:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {_NOT_IN_THE_IMAGE!r}:
            raise ModuleNotFoundError(f"No module named {{name!r}} (not in the image)", name=name)
        return None

sys.meta_path.insert(0, _Blocker())
"""


def test_coordinator_commands_need_no_torch_and_no_site_agent(
    tmp_path: Path, reference: Path
) -> None:
    """The coordinator's image (docker/coordinator.Dockerfile) installs neither torch nor
    site_agent: its commands run in a process where they cannot be imported."""
    block = tmp_path / "blocker"
    block.mkdir()
    (block / "sitecustomize.py").write_text(_BLOCKER)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(block), str(ROOT)])}
    state = tmp_path / "state"
    pub = tmp_path / "site.pub"
    save_public_key(generate_private_key().public_key(), pub)
    code = (
        "import sys\n"
        "from scarches_fl_cli.main import main\n"
        "for argv in (['coordinator', 'init', '--dir', sys.argv[1], '--reference', sys.argv[2]],\n"
        "             ['coordinator', 'enroll', '--dir', sys.argv[1], '--site-id', 'hosp-a',\n"
        "              '--public-key', sys.argv[3]],\n"
        "             ['coordinator', 'status', '--dir', sys.argv[1], '--verify']):\n"
        "    assert main(argv) == 0, argv\n"
        "import coordinator.admin, coordinator.service, coordinator.server\n"
        f"assert not set({_NOT_IN_THE_IMAGE!r}) & set(sys.modules), sorted(sys.modules)\n"
        "assert main(['site', 'status', '--state', sys.argv[1]]) == 2\n"  # named, below
    )
    proc = subprocess.run(
        [sys.executable, "-c", code, str(state), str(reference), str(pub)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "hosp-a" in proc.stdout
    assert "Traceback" not in proc.stderr
    assert "`scarches-fl site status` needs the package 'site_agent'" in proc.stderr


def test_backup_while_serving(consortium, server, tmp_path: Path, capsys) -> None:
    from tests.coordinator.conftest import fetch_base, make_site_update

    with server.client(consortium) as c:
        base = fetch_base(c, consortium)
        u = make_site_update(consortium.sites["site-a"], base)
        c.submit_update(u.envelope, u.diff_bytes).raise_for_rejection()
        size = c.get_checkpoint().size
    out = tmp_path / "backup"
    assert main(["coordinator", "backup", "--dir", str(consortium.state), "--out", str(out)]) == 0
    assert f"tree size {size}" in capsys.readouterr().out
    assert main(["coordinator", "status", "--dir", str(out), "--json", "--verify"]) == 0
    st = json.loads(capsys.readouterr().out)
    assert st["tree_size"] == size and st["blobs"]["orphans"] == 0
    assert (out / "keys" / "log.key").exists() and not (out / "serve.json").exists()
    assert main(["coordinator", "backup", "--dir", str(consortium.state), "--out", str(out)]) == 2


def test_one_server_per_state_directory(consortium, server, capsys) -> None:
    assert (
        main(["coordinator", "serve", "--dir", str(consortium.state), "--listen", "127.0.0.1:0"])
        == 2
    )
    assert "already running" in capsys.readouterr().err


def test_key_rotation(consortium, server, tmp_path: Path, capsys) -> None:
    """The site signs a rotation request with its old and new key; the operator countersigns
    it with `coordinator rotate`; the old key is refused afterwards, the new one accepted."""
    from protocols.canonical import canonical_json
    from protocols.dsse import sign_envelope
    from protocols.keys import key_id, public_key_text
    from protocols.ledger import POLICY_TYPE
    from protocols.policy import PolicyChange
    from tests.coordinator.conftest import ORIGIN, fetch_base, make_site_update

    site = consortium.sites["site-a"]
    new_key = generate_private_key()
    change = PolicyChange("rotate", ORIGIN, "site-a", public_key_text(new_key), key_id(site.key))
    payload = canonical_json(change.to_json_obj())
    # Signed by the new key only: refused by the ledger rules, nothing appended.
    half = tmp_path / "half.dsse"
    half.write_bytes(sign_envelope(POLICY_TYPE, payload, [new_key]))
    assert (
        main(["coordinator", "rotate", "--dir", str(consortium.state), "--request", str(half)]) == 3
    )
    assert "old and the new site key" in capsys.readouterr().err
    request = tmp_path / "rotation.dsse"
    request.write_bytes(sign_envelope(POLICY_TYPE, payload, [site.key, new_key]))
    assert (
        main(["coordinator", "rotate", "--dir", str(consortium.state), "--request", str(request)])
        == 0
    )
    out = capsys.readouterr().out
    assert "rotated the key of site-a" in out
    # the fingerprints `site rotate-key` printed at the site, for the out-of-band check
    assert f"new key fingerprint (key id): {key_id(new_key)}" in out
    assert f"replaced key id:              {key_id(site.key)}" in out
    with server.client(consortium) as c:
        base = fetch_base(c, consortium)
        old = make_site_update(site, base)
        res = c.submit_update(old.envelope, old.diff_bytes)
        assert res.rejection is not None and res.rejection.reason_code == "E_KEY_ROTATED"
        site.key = new_key
        site.sequence -= 1
        c.submit_update(*_pair(make_site_update(site, base))).raise_for_rejection()
    # An enrolment is not a rotation.
    enrol = tmp_path / "enrol.dsse"
    enrol.write_bytes(
        sign_envelope(
            POLICY_TYPE,
            canonical_json(
                PolicyChange(
                    "enrol", ORIGIN, "site-z", public_key_text(generate_private_key())
                ).to_json_obj()
            ),
            [new_key],
        )
    )
    assert (
        main(["coordinator", "rotate", "--dir", str(consortium.state), "--request", str(enrol)])
        == 3
    )
    assert "not to rotate" in capsys.readouterr().err


def _pair(u):
    return u.envelope, u.diff_bytes


def test_default_origins_differ_so_one_auditor_audits_both(
    tmp_path: Path, reference: Path, capsys, monkeypatch
) -> None:
    """Two state directories with the same name and no --origin: each log gets its own name, so
    the auditor's default state (one per origin, under ~/.scarches-fl/auditor) keeps them apart
    and both audits pass (with the directory's name alone, the second one exited 19)."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    origins = []
    for parent in ("a", "b"):
        state = tmp_path / parent / "coord-state"
        argv = ["coordinator", "init", "--dir", str(state), "--reference", str(reference)]
        assert main(argv) == 0
        origins.append(read_trust(state / "trust.json").origin)
        capsys.readouterr()
        trust = str(state / "trust.json")
        assert main(["audit", "--ledger", str(state), "--trust", trust, "--no-served"]) == 0
    assert origins[0] != origins[1]
    assert all(o.startswith("scarches-fl.local/coord-state-") for o in origins)
    assert len(list((tmp_path / "home" / ".scarches-fl" / "auditor").iterdir())) == 2
