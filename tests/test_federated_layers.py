"""The packages depend one way (docs/architecture.md): protocols <- scarches_fl <-
{coordinator, site_agent} <- scarches_fl_cli, and coordinator and site_agent never import each
other. Every import statement counts, including those inside functions."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

#: package -> the first-party packages it must never import
FORBIDDEN = {
    "protocols": {"scarches_fl", "coordinator", "site_agent", "scarches_fl_cli", "torch", "flwr"},
    "scarches_fl": {"coordinator", "site_agent", "scarches_fl_cli", "flwr", "grpc"},
    "coordinator": {"site_agent", "scarches_fl_cli"},
    "site_agent": {"coordinator", "scarches_fl_cli"},
}


def imported_packages(source: str) -> set[tuple[int, str]]:
    """(line, top-level package) of every absolute import in ``source``."""
    out: set[tuple[int, str]] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            out.update((node.lineno, a.name.split(".")[0]) for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            out.add((node.lineno, node.module.split(".")[0]))
    return out


def violations(package: str, root: Path = ROOT) -> list[str]:
    found = []
    for path in sorted((root / package).rglob("*.py")):
        if "proto" in path.relative_to(root / package).parts[:1]:
            continue  # generated gRPC stubs
        for line, top in imported_packages(path.read_text()):
            if top in FORBIDDEN[package]:
                found.append(f"{path.relative_to(root)}:{line} imports {top}")
    return sorted(found)


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_package_imports_only_layers_below(package: str) -> None:
    assert violations(package) == []


def test_scan_catches_an_import_inside_a_function(tmp_path: Path) -> None:
    (tmp_path / "coordinator").mkdir()
    (tmp_path / "coordinator" / "bad.py").write_text(
        "def handler():\n    from site_agent.federated_client import SiteConfig\n"
    )
    assert violations("coordinator", tmp_path) == ["coordinator/bad.py:2 imports site_agent"]
