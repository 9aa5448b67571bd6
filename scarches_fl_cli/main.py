"""The ``scarches-fl`` command line: one entry point, subcommands by role.

Every command lives in this package, one module per command group, each exposing
``register(subparsers)``. Those modules import only the standard library at module level and
import heavy code (torch, grpc, flwr) inside their handlers, so ``scarches-fl audit`` starts
without torch (the auditor's base install). A command whose optional
dependencies are not installed stops with a message naming the extra to install (no traceback).

Shared by every command: the help shows each option's default (:class:`HelpFormatter`), a reader
that goes away (``scarches-fl audit exit-codes | head``) ends the command quietly with exit 141,
as it ends any shell tool, and ``--version`` prints the installed version.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence
from types import ModuleType

from scarches_fl_cli import audit, coordinator, demo, evaluate, federate, reference, site
from scarches_fl_cli import map as map_command

__all__ = ["main", "build_parser", "HelpFormatter", "EXIT_BROKEN_PIPE"]

#: Exit code when stdout's reader went away (128 + SIGPIPE, what a shell reports for a tool
#: killed by SIGPIPE).
EXIT_BROKEN_PIPE = 141

# (command module, extra that provides its dependencies). Order is the order of ``--help``.
_COMMAND_MODULES: tuple[tuple[ModuleType, str], ...] = (
    (demo, "all"),
    (reference, "model"),
    (map_command, "model"),
    (evaluate, "model"),
    (coordinator, ""),
    (site, "model"),
    (audit, ""),
    (federate, "flower"),
)


class HelpFormatter(argparse.HelpFormatter):
    """Appends an option's default to its help, unless the help already states one, and lists
    the allowed values of an option whose metavar would hide them."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        if action.choices is not None and action.metavar is not None:
            text += f" (one of: {', '.join(map(str, action.choices))})"
        shown = "default" in text or action.default in (None, False, [], argparse.SUPPRESS)
        if not shown and (action.option_strings or action.nargs in ("?", "*")):
            text += " (default: %(default)s)"
        return text


class _Parser(argparse.ArgumentParser):
    """Every parser of the CLI, subcommands included (``add_subparsers`` makes its parsers of
    the parent's class), formats its help with :class:`HelpFormatter`."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]


def build_parser() -> argparse.ArgumentParser:
    from scarches_fl import __version__

    parser = _Parser(
        prog="scarches-fl",
        description=(
            "Grow a shared single-cell reference atlas across sites by architecture surgery; "
            "every change is a signed entry in a verifiable ledger."
        ),
    )
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more log output")
    parser.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors")
    parser.add_argument("--version", action="version", version=f"scarches-fl {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module, extra in _COMMAND_MODULES:
        before = set(sub.choices)
        module.register(sub)
        for name in set(sub.choices) - before:
            sub.choices[name].set_defaults(_extra=extra)
    return parser


def _configure_logging(verbose: int, quiet: bool) -> None:
    level = logging.WARNING if quiet else (logging.DEBUG if verbose > 1 else logging.INFO)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    for name in ("scarches_fl", "protocols", "coordinator", "site_agent", "scarches_fl_cli"):
        logger = logging.getLogger(name)
        logger.handlers[:] = [handler]
        logger.setLevel(level)
        logger.propagate = False


def _command_name(args: argparse.Namespace) -> str:
    words = [args.command] + [
        v for k, v in sorted(vars(args).items()) if k.endswith("_command") and isinstance(v, str)
    ]
    return " ".join(w for w in words if w)


def _stdout_reader_gone() -> int:
    """stdout's reader closed the pipe: point stdout at /dev/null so that the interpreter's
    final flush cannot raise again, and stop quietly."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):
        pass  # stdout has no file descriptor (captured, replaced)
    return EXIT_BROKEN_PIPE


def main(argv: Sequence[str] | None = None) -> int:
    try:
        parser = build_parser()
        args = parser.parse_args(argv)
        _configure_logging(args.verbose, args.quiet)
        handler = getattr(args, "handler", None)
        if handler is None:
            parser.print_help()
            rc = 2
        else:
            rc = _run(handler, args)
        sys.stdout.flush()
    except BrokenPipeError:
        return _stdout_reader_gone()
    return rc


def _run(handler: object, args: argparse.Namespace) -> int:
    from scarches_fl._errors import user_facing

    try:
        rc = handler(args)  # type: ignore[operator]
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        raise
    except ModuleNotFoundError as exc:
        from scarches_fl._extras import missing_extra

        message = missing_extra(
            exc, command=_command_name(args), fallback_extra=getattr(args, "_extra", "")
        )
        if message is None:
            raise
        print(f"error: {message}", file=sys.stderr)
        return 2
    except Exception as exc:  # noqa: BLE001 - the CLI's last line of defence
        message = user_facing(exc)
        if message is None:
            raise
        print(f"error: {message}", file=sys.stderr)
        return getattr(exc, "exit_code", 1)
    return int(rc or 0)
