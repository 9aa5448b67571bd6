"""The docs cannot drift from the CLI: every ``scarches-fl`` command in a fenced shell block of
README.md or docs/*.md must parse with the real argument parser, and every guide must exist.

A line continued with a backslash is joined; shell variables and placeholders are fine (they are
arguments); comments and prompts (``$ ``) are stripped.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from scarches_fl_cli.main import build_parser

ROOT = Path(__file__).resolve().parents[2]
GUIDES = ["architecture.md", "operator.md", "site-admin.md", "auditor.md", "protocol.md", "benchmarks.md"]
# Every fence, whatever its language (a ```yaml block must not pair its closing fence with the
# next block's opening one); only the shell languages and unlabelled fences are read.
_FENCE = re.compile(r"^```([\w-]*)\n(.*?)^```", re.S | re.M)
_SHELL = ("bash", "sh", "shell", "console", "")


def _commands(text: str) -> list[str]:
    cmds: list[str] = []
    for lang, block in _FENCE.findall(text):
        if lang not in _SHELL:
            continue
        joined = re.sub(r"\\\n\s*", " ", block)
        if not lang and re.search(r"\[--|\bCOMMAND\b|\.\.\.", joined):
            continue  # an unlabelled fence holding a usage synopsis, not a command to run
        for raw in joined.splitlines():
            line = raw.strip()
            if line.startswith("$ "):
                line = line[2:]
            if not line or line.startswith("#"):
                continue
            for part in re.split(r"\s*(?:&&|\|\||;|\|)\s*", line):
                try:
                    words = shlex.split(part, comments=True) if part else []
                except ValueError:
                    if lang:
                        raise
                    continue  # prose or output in an unlabelled fence
                # skip env assignments and wrappers such as `.venv/bin/`
                while words and re.match(r"^[A-Z_][A-Z0-9_]*=", words[0]):
                    words = words[1:]
                if words and (words[0] == "scarches-fl" or words[0].endswith("/scarches-fl")):
                    cmds.append(shlex.join(words))
    return cmds


def _doc_files() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


@pytest.mark.parametrize("name", GUIDES)
def test_guide_exists(name: str) -> None:
    path = ROOT / "docs" / name
    assert path.is_file(), f"docs/{name} is missing"
    assert len(path.read_text()) > 500, f"docs/{name} is too short to be a guide"


def test_every_documented_command_parses() -> None:
    parser = build_parser()
    checked = 0
    failures = []
    for path in _doc_files():
        for cmd in _commands(path.read_text()):
            argv = shlex.split(cmd)[1:]
            if {"--help", "-h", "--version"} & set(argv):
                continue
            try:
                parser.parse_args(argv)
            except SystemExit:
                failures.append(f"{path.relative_to(ROOT)}: {cmd}")
            checked += 1
    assert not failures, "documented commands the CLI rejects:\n" + "\n".join(failures)
    assert checked >= 10, f"only {checked} documented commands found; the guides lost their examples"
