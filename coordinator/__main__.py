"""``python -m coordinator ...``: the coordinator commands without the rest of the CLI.

Same commands as ``scarches-fl coordinator ...``, but only the coordinator's command module is
loaded (no science stack, no torch), which is what the coordinator container and the crash tests
run.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence


def main(argv: Sequence[str] | None = None) -> int:
    from coordinator import _cli
    from scarches_fl._errors import user_facing
    from scarches_fl.cli import _configure_logging

    # prog "python -m" + the "coordinator" group = usage lines that read "python -m coordinator ..."
    parser = argparse.ArgumentParser(prog="python -m")
    parser.add_argument("-v", "--verbose", action="count", default=0)
    parser.add_argument("-q", "--quiet", action="store_true")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    _cli.register(sub)
    rest = list(argv if argv is not None else sys.argv[1:])
    lead = []
    while rest and rest[0] in ("-q", "--quiet", "-v", "-vv", "--verbose"):
        lead.append(rest.pop(0))
    args = parser.parse_args([*lead, "coordinator", *rest])
    _configure_logging(args.verbose, args.quiet)
    try:
        return int(args.handler(args) or 0)
    except KeyboardInterrupt:
        return 130
    except Exception as exc:  # noqa: BLE001 - same last line of defence as scarches-fl
        message = user_facing(exc)
        if message is None:
            raise
        print(f"error: {message}", file=sys.stderr)
        return int(getattr(exc, "exit_code", 1))


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
