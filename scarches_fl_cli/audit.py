"""``scarches-fl audit`` and ``scarches-fl ledger``: the auditor's commands (no torch needed).

Only ``argparse`` at module level; the audit engine is imported inside the handlers.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

__all__ = ["register"]


def _add_source_args(p: argparse.ArgumentParser, *, required: bool) -> None:
    src = p.add_argument_group("where the ledger comes from (exactly one)")
    src.add_argument("--coordinator", metavar="HOST:PORT", help="a running coordinator (online)")
    src.add_argument(
        "--ledger",
        metavar="STATE_DIR",
        help="a copy of the coordinator's state directory (offline; read-only)",
    )
    p.add_argument(
        "--trust",
        metavar="TRUST_JSON",
        required=required,
        help="the trust.json the operator handed out (pins the log key, origin, operator keys)",
    )
    p.add_argument(
        "--insecure",
        action="store_true",
        help="plain-text gRPC to a loopback coordinator (development only)",
    )


def register(subparsers: Any) -> None:
    audit = subparsers.add_parser(
        "audit",
        help="verify the whole ledger and the served model (needs no torch)",
        description=(
            "Verify a coordinator's ledger without trusting it: the signed checkpoint, every "
            "entry and blob, consistency with the checkpoint this auditor stored before, every "
            "signature against the policy in force at its position, and the replay of every "
            "update from the genesis to the served model, bit for bit. Exit 0 only when all of "
            "it verifies; `scarches-fl audit exit-codes` lists the other codes."
        ),
    )
    _add_source_args(audit, required=False)
    audit.add_argument(
        "--state",
        metavar="DIR",
        help="this auditor's own state (default ~/.scarches-fl/auditor/<origin>)",
    )
    audit.add_argument("--json", action="store_true", help="print the result as JSON")
    audit.add_argument(
        "--report", metavar="FILE", help="write a report: .html, .md or .json by extension"
    )
    audit.add_argument(
        "--witness-key",
        metavar="KEY",
        help="cosign the verified checkpoint with this witness key (cosignature/v1) and submit it",
    )
    audit.add_argument(
        "--no-served",
        action="store_true",
        help="skip fetching the served reference (the replay is still checked against the "
        "digests the ledger states)",
    )
    audit.set_defaults(handler=_audit_handler, _audit_parser=audit)
    asub = audit.add_subparsers(dest="audit_command", metavar="SUBCOMMAND")
    kg = asub.add_parser(
        "witness-keygen",
        help="make a witness key (cosignature/v1) for --witness-key",
        description="Write witness.key (mode 0600) and witness.vkey (give this to the operator "
        "for trust.json) into DIR.",
    )
    kg.add_argument("--out", metavar="DIR", required=True, help="folder for the two files")
    kg.add_argument(
        "--name",
        required=True,
        help="the witness's key name, e.g. auditor.example.org (no spaces or '+')",
    )
    kg.set_defaults(handler=_keygen_handler)
    ec = asub.add_parser(
        "exit-codes",
        help="list the audit exit codes",
        description="List every exit code of `scarches-fl audit`: the failure class, its "
        "number and what it means (the order in which findings decide the code).",
    )
    ec.add_argument("--json", action="store_true", help="machine-readable output")
    ec.set_defaults(handler=_exit_codes_handler)

    ledger = subparsers.add_parser(
        "ledger", help="inspect ledger entries", description="Inspect the model-update ledger."
    )
    lsub = ledger.add_subparsers(dest="ledger_command", metavar="SUBCOMMAND")
    show = lsub.add_parser(
        "show",
        help="list entries: who, when, which conditions, diff sizes and hashes",
        description="List ledger entries after verifying their signatures against the policy "
        "in force at each position (the checkpoint and the Merkle root are verified too).",
    )
    _add_source_args(show, required=True)
    show.add_argument("--site", metavar="ID", help="only entries of this site")
    show.add_argument("--since", metavar="ISO", help="only entries at or after this time")
    show.add_argument("--until", metavar="ISO", help="only entries before this time")
    show.add_argument(
        "--kind",
        metavar="KIND",
        choices=["genesis", "site_update", "federated_round", "federated_labels", "policy"],
        help="only entries of this kind",
    )
    show.add_argument("--json", action="store_true", help="JSON lines, one entry per line")
    show.set_defaults(handler=_ledger_show_handler)
    ledger.set_defaults(handler=lambda args: (ledger.print_help(), 2)[1])


def _source(args: argparse.Namespace, trust: Any) -> Any:
    from protocols._audit_sources import open_source

    # the TLS root pinned in trust.json (None: the coordinator has no TLS; use --insecure)
    pem = trust.policy.tls_root_pem
    return open_source(
        coordinator=args.coordinator,
        ledger=args.ledger,
        trust=pem.encode("ascii") if pem else None,
        insecure=args.insecure,
    )


def _audit_handler(args: argparse.Namespace) -> int:
    from protocols.errors import ConfigError

    if not args.trust:
        raise ConfigError("audit needs --trust TRUST_JSON (the trust.json the operator handed out)")
    from protocols._audit_report import render_json, render_terminal, write_report
    from protocols.audit import load_trust_file, run_audit

    trust = load_trust_file(args.trust)
    witness = None
    if args.witness_key:
        from protocols.witness import load_witness_key

        witness = load_witness_key(args.witness_key)
    source = _source(args, trust)
    try:
        result = run_audit(
            source,
            trust,
            state_dir=args.state,
            witness=witness,
            check_served=not args.no_served,
            progress=sys.stderr.isatty() and not args.json,
        )
    finally:
        source.close()
    if args.report:
        path = write_report(result, args.report)
        if not getattr(args, "quiet", False):
            print(f"report: {path}", file=sys.stderr)
    if args.json:
        sys.stdout.write(render_json(result))
    else:
        sys.stdout.write(render_terminal(result))
    return result.exit_code


def _keygen_handler(args: argparse.Namespace) -> int:
    from protocols.witness import WITNESS_KEY_FILE, WITNESS_VKEY_FILE, generate_witness_key

    v = generate_witness_key(args.out, args.name)
    print(f"witness key: {args.out}/{WITNESS_KEY_FILE} (mode 0600, keep it secret)")
    print(f"public key:  {args.out}/{WITNESS_VKEY_FILE}")
    print(v.vkey)
    return 0


def _exit_codes_handler(args: argparse.Namespace) -> int:
    import json

    from protocols.audit import AUDIT_EXIT_CODES

    if args.json:
        print(json.dumps({c.name: {"code": c.code, "help": c.help} for c in AUDIT_EXIT_CODES.values()}, indent=2))
    else:
        for c in AUDIT_EXIT_CODES.values():
            print(f"{c.code:>3}  {c.name:<19} {c.help}")
    return 0


def _ledger_show_handler(args: argparse.Namespace) -> int:
    from protocols._audit_report import format_time
    from protocols.audit import load_trust_file, parse_iso_time, read_ledger

    trust = load_trust_file(args.trust)
    since = parse_iso_time(args.since, "--since") if args.since else None
    until = parse_iso_time(args.until, "--until") if args.until else None
    source = _source(args, trust)
    try:
        result = read_ledger(source, trust)
    finally:
        source.close()
    shown = 0
    import json

    for e in result.entries:
        if args.site and e.site_id != args.site:
            continue
        if args.kind and e.kind != args.kind:
            continue
        if since is not None and (e.timestamp is None or e.timestamp < since):
            continue
        if until is not None and (e.timestamp is None or e.timestamp >= until):
            continue
        shown += 1
        if args.json:
            print(json.dumps(e.to_json(), sort_keys=True))
            continue
        who = e.site_id or "operator"
        keys = ",".join(k[:16] for k in e.key_ids) or "-"
        line = f"#{e.index:<6} {format_time(e.timestamp):<20} {e.kind:<15} {who:<16} key {keys}"
        if e.sequence is not None:
            line += f"  seq {e.sequence}"
        if e.base_size is not None:
            line += f"  base {e.base_size}"
        print(line)
        if e.conditions:
            print(f"         conditions: {', '.join(e.conditions)}")
        if e.diff_sha256:
            print(f"         diff: {e.diff_sha256} ({e.diff_size} bytes)")
            if e.tensors:
                shapes = ", ".join(f"{n}{tuple(s)}" for n, s in sorted(e.tensors.items()))
                print(f"         tensors: {shapes}")
        for k, v in sorted(e.detail.items()):
            print(f"         {k}: {v}")
        if e.status != "ok":
            print(f"         STATUS: {e.status}")
    summary = (
        f"{shown} of {len(result.entries)} entries shown; checkpoint size {result.tree_size}, "
        f"root {result.root_hex[:16]}...; "
        + ("verified" if result.ok else f"NOT verified: {result.first_failure.message}")  # type: ignore[union-attr]
    )
    if not args.json:
        print(summary)
    elif not getattr(args, "quiet", False):
        # stdout stays one JSON object per line (none when nothing matched); the count goes to stderr
        print(summary, file=sys.stderr)
    return result.exit_code
