"""The ``scarches-fl`` command line: one entry point, subcommands by role.

Each role's commands live in their own module, which exposes ``register(subparsers)``. Those
modules import only ``argparse`` at module level and import heavy code (torch, grpc, flwr) inside
their handlers, so ``scarches-fl audit`` starts without torch. A command module whose optional
dependencies are not installed is skipped, and ``scarches-fl`` says which extra provides it.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Sequence

__all__ = ["main", "build_parser"]

# (module, extra that provides its dependencies). Order is the order of ``--help``.
_COMMAND_MODULES: tuple[tuple[str, str], ...] = (
    ("scarches_fl._cli_demo", "all"),
    ("scarches_fl._cli_reference", "model"),
    ("scarches_fl._cli_map", "model"),
    ("scarches_fl._cli_evaluate", "model"),
    ("coordinator._cli", ""),
    ("site_agent._cli", "model"),
    ("protocols._cli_audit", ""),
    ("coordinator._cli_federate", "flower"),
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="scarches-fl",
        description=(
            "Grow a shared single-cell reference atlas across sites by architecture surgery; "
            "every change is a signed entry in a verifiable ledger."
        ),
    )
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more log output")
    parser.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module_name, _extra in _COMMAND_MODULES:
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            # A command module not written yet, or one whose optional extra is missing.
            logging.getLogger(__name__).debug("command module %s unavailable: %s", module_name, exc)
            continue
        module.register(sub)
    return parser


def _configure_logging(verbose: int, quiet: bool) -> None:
    level = logging.WARNING if quiet else (logging.DEBUG if verbose > 1 else logging.INFO)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    for name in ("scarches_fl", "protocols", "coordinator", "site_agent"):
        logger = logging.getLogger(name)
        logger.handlers[:] = [handler]
        logger.setLevel(level)
        logger.propagate = False


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _configure_logging(args.verbose, args.quiet)
    handler = getattr(args, "handler", None)
    if handler is None:
        parser.print_help()
        return 2
    try:
        rc = handler(args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 - the CLI's last line of defence
        from scarches_fl._errors import user_facing

        message = user_facing(exc)
        if message is None:
            raise
        print(f"error: {message}", file=sys.stderr)
        return getattr(exc, "exit_code", 1)
    return int(rc or 0)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
