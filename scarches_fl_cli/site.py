"""``scarches-fl site ...``: the site admin's commands (keygen, map, status, outbox, retry,
rotate-key).

Only ``argparse`` is imported at module level; every handler imports what it needs.
"""

from __future__ import annotations

import argparse
from typing import Any

__all__ = ["register"]


def _add_connection(p: argparse.ArgumentParser, *, required_hint: bool = True) -> None:
    p.add_argument(
        "--config",
        metavar="SITE_YAML",
        help="YAML file with any of the settings below (flags win over the file)",
    )
    p.add_argument("--coordinator", metavar="HOST:PORT", help="the coordinator's registry address")
    p.add_argument(
        "--trust",
        metavar="TRUST_JSON",
        help="trust.json from the operator (pinned in the state dir on first use)",
    )
    p.add_argument(
        "--insecure",
        action="store_true",
        default=None,
        help="plain-text gRPC without TLS: loopback development only",
    )
    p.add_argument(
        "--timeout",
        dest="timeout_s",
        type=float,
        metavar="SECONDS",
        help="deadline of each registry call (default 30)",
    )


def register(subparsers: Any) -> None:
    site = subparsers.add_parser(
        "site",
        help="site admin: keys, map private data, contribute condition weights",
        description=(
            "The site agent: pull and verify the reference, map a private dataset locally, and "
            "contribute only the new condition weights, signed with this site's key."
        ),
    )
    sub = site.add_subparsers(dest="site_command", metavar="SUBCOMMAND")

    p = sub.add_parser(
        "keygen",
        help="create this site's signing key (site.key, site.pub)",
        description="Make this site's Ed25519 signing key: site.key (mode 0600; it never "
        "leaves the site) and site.pub for the operator. Prints the key's "
        "fingerprint, which the operator's `coordinator enroll` prints too: read it "
        "to them over a second channel.",
    )
    p.add_argument(
        "--out",
        required=True,
        metavar="DIR",
        help="directory for site.key (mode 0600, never leaves the site) and site.pub",
    )
    p.add_argument("--force", action="store_true", help="overwrite an existing site.key")
    p.set_defaults(handler=_keygen)

    p = sub.add_parser(
        "map",
        help="pull + verify the reference, map a dataset, contribute the condition weights",
        description="Fetch and verify the coordinator's checkpoint and reference, map the "
        "site's dataset onto it by surgery (the embedding and predicted labels stay "
        "in --out at the site), pass the outgoing update through the privacy guard, "
        "sign it, submit it and verify the receipt. --dry-run stops before signing.",
    )
    _add_connection(p)
    p.add_argument("--key", metavar="KEY", help="this site's private key (site.key)")
    p.add_argument("--site-id", metavar="ID", help="this site's id, as the operator enrolled it")
    p.add_argument("--state", metavar="DIR", help="the site's state directory")
    p.add_argument("--data", metavar="H5AD", help="the query dataset (.h5ad, may be gzip'd)")
    p.add_argument("--batch-key", metavar="K", help="obs column naming the study / batch")
    p.add_argument(
        "--label-key",
        metavar="L",
        help="predict this label: writes obs['L_pred'] and obs['L_uncertainty']",
    )
    p.add_argument("--out", metavar="OUT_H5AD", help="the mapped dataset (stays at the site)")
    p.add_argument(
        "--contribute-labels",
        action="store_true",
        help="also contribute, per cell type of obs[L] with at least k cells, a prototype "
        "(latent mean, spread, bucketed count; DP as the label policy says); opt-in",
    )
    p.add_argument(
        "--label-epsilon-budget",
        type=float,
        metavar="EPS",
        help="refuse DP label contributions that take a study past this epsilon",
    )
    p.add_argument(
        "--genesis-labels-only",
        action="store_true",
        help="predict with the reference's own label knowledge, without any site's contribution",
    )
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="stop after the privacy guard: show what would be sent, sign nothing",
    )
    p.add_argument("--batches", metavar="a,b", help="map only these values of the batch key")
    p.add_argument("--layer", metavar="NAME", help="read raw counts from this layer, not X")
    p.add_argument(
        "--var-names-column",
        metavar="COL",
        help="use this var column as gene names (e.g. symbols next to Ensembl ids)",
    )
    p.add_argument("--max-epochs", type=int, metavar="N", help="fine-tuning epochs")
    p.add_argument("--seed", type=int, metavar="S", help="random seed (default 0)")
    p.add_argument(
        "--min-gene-coverage",
        type=float,
        metavar="F",
        help="refuse a dataset covering less of the reference genes (default 0.5)",
    )
    p.add_argument(
        "--label-method",
        choices=("auto", "expression", "prototype", "knn"),
        help="how labels are read (default auto: the reference's expression prototypes with a "
        "per-batch offset; prototype or knn read the latent only and flag types the reference "
        "lacks better; ADR 0070)",
    )
    p.add_argument(
        "--label-uncertainty",
        type=float,
        metavar="F",
        help="cells with uncertainty above this are 'Unknown' (default 0.5)",
    )
    from scarches_fl_cli.reference import add_memory_arguments

    add_memory_arguments(p)
    p.add_argument("--force", action="store_true", help="replace an existing --out file")
    p.set_defaults(handler=_map)

    p = sub.add_parser(
        "status",
        help="pinned trust, last verified checkpoint, contributions",
        description="Show what the site's state directory holds: the pinned trust, the last "
        "verified checkpoint, keys, and every contribution with its state.",
    )
    p.add_argument("--state", required=True, metavar="DIR", help="the site's state directory")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(handler=_status)

    p = sub.add_parser(
        "outbox",
        help="list (or show one of) the updates sent or waiting",
        description="List the updates in the site's outbox, or show one: exactly what was (or "
        "will be) sent, its signature, delivery attempts and receipt.",
    )
    p.add_argument("--state", required=True, metavar="DIR", help="the site's state directory")
    p.add_argument(
        "action",
        nargs="?",
        choices=["list", "show"],
        default="list",
        help="list the entries, or show one (the newest without ID)",
    )
    p.add_argument("id", nargs="?", metavar="ID", help="outbox entry (with show)")
    p.set_defaults(handler=_outbox)

    p = sub.add_parser(
        "retry",
        help="deliver signed updates still waiting in the outbox",
        description="Submit again the signed updates the coordinator has not acknowledged "
        "(same envelope, so a delivered one is answered with its original receipt).",
    )
    p.add_argument("--state", metavar="DIR", help="the site's state directory")
    _add_connection(p)
    p.add_argument("ids", nargs="*", metavar="ID", help="only these outbox entries")
    p.set_defaults(handler=_retry)

    p = sub.add_parser(
        "rotate-key",
        help="replace this site's key: signed request, then finish once the operator appended it",
        description=(
            "Rotate this site's signing key in two steps. `request` (the default) makes a new "
            "key, kept as KEY.pending beside the site key (mode 0600), and writes --out: a "
            "rotation request signed by the current AND the new key, for the operator's "
            "`scarches-fl coordinator rotate --request FILE`. The current key stays the site's "
            "key. `finish` verifies the ledger and, once it shows the new key as the site's "
            "active key, renames KEY.pending over KEY (the old key is kept as "
            "KEY.rotated-<key id>). `cancel` abandons a pending rotation (moves KEY.pending "
            "aside)."
        ),
    )
    p.add_argument(
        "action",
        nargs="?",
        choices=["request", "finish", "cancel"],
        default="request",
        help="request (default), finish or cancel",
    )
    _add_connection(p)
    p.add_argument("--state", metavar="DIR", help="the site's state directory")
    p.add_argument(
        "--key", metavar="KEY", help="this site's current private key (site.key); request only"
    )
    p.add_argument(
        "--site-id",
        metavar="ID",
        help="this site's id (default: the one the state directory remembers)",
    )
    p.add_argument(
        "--out",
        dest="request_out",
        metavar="FILE",
        help="request: where to write the rotation request (a new file)",
    )
    p.add_argument(
        "--note",
        default="",
        metavar="TEXT",
        help="request: a short note signed into the request (e.g. the reason)",
    )
    p.set_defaults(handler=_rotate_key)

    site.set_defaults(handler=lambda args: (site.print_help(), 2)[1])


def _config(args: argparse.Namespace) -> Any:
    from site_agent.config import SiteConfig, load_config, merge_flags

    base = load_config(args.config) if getattr(args, "config", None) else SiteConfig()
    names = (
        "coordinator",
        "trust",
        "key",
        "site_id",
        "state",
        "data",
        "batch_key",
        "label_key",
        "label_method",
        "layer",
        "out",
        "insecure",
        "batches",
        "timeout_s",
        "max_epochs",
        "seed",
        "min_gene_coverage",
        "label_uncertainty",
        "contribute_labels",
        "label_epsilon_budget",
        "genesis_labels_only",
    )
    flags = {n: getattr(args, n) for n in names if hasattr(args, n)}
    return merge_flags(base, flags)


def _keygen(args: argparse.Namespace) -> int:
    from pathlib import Path

    from protocols.keys import (
        generate_private_key,
        key_id,
        public_key_text,
        save_private_key,
        save_public_key,
    )

    out = Path(args.out).expanduser()
    out.mkdir(parents=True, exist_ok=True, mode=0o700)
    key = generate_private_key()
    save_private_key(key, out / "site.key", overwrite=bool(args.force))
    save_public_key(key, out / "site.pub")
    print(f"private key: {out / 'site.key'} (mode 0600; it never leaves this site; back it up)")
    print(f"public key:  {out / 'site.pub'} (send this file to the operator to be enrolled)")
    print(f"public key text: {public_key_text(key)}")
    print(f"fingerprint (key id): {key_id(key)}")
    print(
        "Read the fingerprint to the operator over a second channel (phone) so they can check "
        "that the site.pub they enrol is yours."
    )
    return 0


def _map(args: argparse.Namespace) -> int:
    from scarches_fl._extras import require_extra

    require_extra("model", command="site map")
    from site_agent.agent import run_map

    config = _config(args)
    report = run_map(config, dry_run=bool(args.dry_run), var_names_column=args.var_names_column,
                     force=bool(args.force), backed=args.backed)
    if report.dry_run or not (report.new_conditions or report.label_receipt):
        return 0
    if not report.new_conditions:
        print(f"done: {report.n_cells} cells mapped onto reference version "
              f"{report.verified.tree_size}; contributed label prototypes only")
        return 0
    print(
        f"done: {report.n_cells} cells mapped onto reference version "
        f"{report.verified.tree_size}; contributed {', '.join(report.new_conditions)}"
    )
    return 0


def _status(args: argparse.Namespace) -> int:
    import json

    from site_agent.status import site_status

    info = site_status(args.state)
    if args.json:
        print(json.dumps(info, indent=2, sort_keys=True))
    else:
        from site_agent.status import render_status

        print(render_status(info))
    return 0


def _outbox(args: argparse.Namespace) -> int:
    from site_agent.outbox import Outbox
    from site_agent.state import SiteState

    state = SiteState(args.state).require_existing()
    outbox = Outbox(state.outbox_path)
    if args.action == "show" or args.id:
        if not args.id:
            entries = outbox.entries()
            if not entries:
                print("the outbox is empty")
                return 0
            entry = entries[-1]
        else:
            entry = outbox.get(args.id)
        print(f"outbox entry {entry.id} ({entry.path})")
        print(f"state: {entry.state}")
        print(entry.summary_text.rstrip("\n"))
        env = entry.envelope_bytes
        print(
            f"envelope.json: {len(env):,} bytes (signed)"
            if env is not None
            else "envelope.json: none (not signed)"
        )
        for att in entry.status().get("attempts", []):
            print(f"  attempt {att['at']}: {att['outcome']} {att.get('detail', '')}")
        rec = entry.receipt()
        if rec:
            print(
                f"receipt: log index {rec['leaf_index']} in tree size {rec['tree_size']} "
                f"(root {rec['root'][:16]}...), verified"
            )
        print("payload.json (signed):")
        print(entry.payload_bytes.decode("utf-8"))
        return 0
    entries = outbox.entries()
    if not entries:
        print("the outbox is empty")
        return 0
    print(f"{'id':<28} {'state':<10} {'bytes sent':>11}  conditions")
    for e in entries:
        print(e.describe())
    return 0


def _retry(args: argparse.Namespace) -> int:
    from site_agent.agent import retry_pending

    config = _config(args)
    retry_pending(config, ids=list(args.ids))
    return 0


def _rotate_key(args: argparse.Namespace) -> int:
    from site_agent.rotation import cancel_rotation, finish_rotation, request_rotation

    config = _config(args)
    if args.action == "finish":
        finish_rotation(config)
    elif args.action == "cancel":
        cancel_rotation(config)
    else:
        if not args.request_out:
            from protocols.errors import ConfigError

            raise ConfigError(
                "missing --out: name the file to write the rotation request to (e.g. "
                "--out hospital-a-rotation.dsse)"
            )
        request_rotation(config, out=args.request_out, note=args.note)
    return 0
