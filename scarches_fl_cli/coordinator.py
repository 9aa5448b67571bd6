"""``scarches-fl coordinator ...``: the consortium operator's commands.

Only ``argparse`` at module level; grpc, numpy and the protocols core are imported inside the
handlers (see ``scarches_fl_cli/main.py``).
"""

from __future__ import annotations

import argparse

__all__ = ["register"]

_DIR_HELP = "the coordinator's state directory (made by `coordinator init`)"


def _add_dir(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dir", required=True, metavar="STATE", help=_DIR_HELP)


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "coordinator",
        help="run the consortium's coordinator (registry + ledger)",
        description=(
            "The consortium operator's service: publishes a reference model, enrols and "
            "revokes site keys, accepts signed site updates into an append-only ledger, and "
            "serves every reference version over gRPC with TLS."
        ),
    )
    sub = p.add_subparsers(dest="coordinator_command", metavar="SUBCOMMAND")
    p.set_defaults(handler=lambda args: (p.print_help(), 2)[1])

    init = sub.add_parser(
        "init",
        help="create a state directory from a reference bundle",
        description=(
            "Create STATE: the log signing key, an operator key, TLS material (a self-signed "
            "certificate for --tls-name names, default localhost and 127.0.0.1), "
            "coordinator.yaml, the genesis entry publishing the reference, and trust.json for "
            "the sites."
        ),
    )
    init.add_argument("--dir", required=True, metavar="STATE", help="state directory to create")
    init.add_argument(
        "--reference", required=True, metavar="BUNDLE_DIR", help="reference model bundle"
    )
    init.add_argument(
        "--origin",
        default=None,
        metavar="NAME",
        help="log origin (checkpoint first line), e.g. consortium.example/ledger "
        "(default: scarches-fl.local/<state dir name>-<8 random hex digits>, so that no two "
        "ledgers share a name)",
    )
    init.add_argument(
        "--tls-name",
        action="append",
        default=None,
        metavar="NAME",
        help="DNS name or IP address the TLS certificate is valid for (repeat; default "
        "localhost and 127.0.0.1)",
    )
    init.add_argument(
        "--listen",
        default="127.0.0.1:7443",
        metavar="HOST:PORT",
        help="default listen address written to coordinator.yaml (default 127.0.0.1:7443)",
    )
    init.add_argument(
        "--witness",
        action="append",
        default=None,
        metavar="VKEY",
        help="a witness's verifier key (name+id+base64, from `scarches-fl audit "
        "witness-keygen`) to pin in trust.json (repeat)",
    )
    init.add_argument(
        "--witnesses-required",
        type=int,
        default=0,
        metavar="K",
        help="cosignatures of distinct pinned witnesses a site requires on a checkpoint "
        "(default 0: none)",
    )
    init.add_argument(
        "--trust-out",
        default=None,
        metavar="FILE",
        help="also write the trust.json for the sites here (e.g. a folder you hand out), so "
        "nobody needs read access to the state directory, which holds the private keys",
    )
    init.set_defaults(handler=_init)

    enroll = sub.add_parser(
        "enroll",
        help="enrol a site's public key (operator-signed policy entry)",
        description=(
            "Append an operator-signed policy entry enrolling SITE_ID with its key, and print "
            "the key's fingerprint: compare it with the one `scarches-fl site keygen` printed at "
            "the site, over a second channel, before anything else."
        ),
    )
    _add_dir(enroll)
    enroll.add_argument(
        "--site-id", required=True, metavar="ID", help="site id = its condition namespace"
    )
    enroll.add_argument("--public-key", required=True, metavar="FILE", help="the site's site.pub")
    enroll.set_defaults(handler=_enroll)

    revoke = sub.add_parser(
        "revoke",
        help="revoke a site (operator-signed policy entry)",
        description="Append an operator-signed policy entry revoking SITE_ID's keys.",
    )
    _add_dir(revoke)
    revoke.add_argument("--site-id", required=True, metavar="ID", help="the site to revoke")
    revoke.set_defaults(handler=_revoke)

    lp = sub.add_parser(
        "label-policy",
        help="label contributions: k, count bucket, DP requirement; accept or map type names",
        description=(
            "Append an operator-signed label_policy entry. `settings` changes the rules for "
            "label contributions (what is not given stays as in force); `accept` makes a "
            "site's new type (SITE:NAME) a shared vocabulary name; `map` maps it onto an "
            "existing type. `show` prints the policy and vocabulary in force."
        ),
    )
    lp_sub = lp.add_subparsers(dest="action", required=True, metavar="ACTION")
    lp_set = lp_sub.add_parser(
        "settings", help="k, count bucket, max types, DP requirement",
        description="Append a label_policy settings entry: the fields given replace those in "
        "force, the others stay.",
    )
    _add_dir(lp_set)
    lp_set.add_argument("--k", type=int, help="fewest cells a prototype may come from (default 20)")
    lp_set.add_argument("--count-bucket", type=int, help="counts are rounded down to a multiple (10)")
    lp_set.add_argument("--max-types", type=int, help="prototypes per contribution (64)")
    lp_set.add_argument("--dp-epsilon", type=float, help="require the Gaussian mechanism at this epsilon or less")
    lp_set.add_argument("--dp-delta", type=float, help="... and this delta or less (e.g. 1e-5)")
    lp_set.add_argument("--dp-clip-norm", type=float, help="... with latents clipped to this L2 norm or less")
    lp_set.add_argument("--no-dp", action="store_true", help="drop the DP requirement")
    lp_acc = lp_sub.add_parser(
        "accept", help="make SITE:NAME a shared type name",
        description="Append a label_policy accept entry: the site's new type SITE:NAME joins the "
        "shared vocabulary of the level as SHARED_NAME (refused if that name is taken).",
    )
    _add_dir(lp_acc)
    lp_acc.add_argument("--label-key", required=True, metavar="L", help="the label level")
    lp_acc.add_argument("--name", required=True, metavar="SITE:NAME", help="the site's type")
    lp_acc.add_argument("--as", dest="target", required=True, metavar="SHARED_NAME",
                        help="its name in the shared vocabulary")
    lp_map = lp_sub.add_parser(
        "map", help="map SITE:NAME onto an existing type",
        description="Append a label_policy map entry: the site's type SITE:NAME is the existing "
        "vocabulary type TYPE from now on.",
    )
    _add_dir(lp_map)
    lp_map.add_argument("--label-key", required=True, metavar="L", help="the label level")
    lp_map.add_argument("--name", required=True, metavar="SITE:NAME", help="the site's type")
    lp_map.add_argument("--to", dest="target", required=True, metavar="TYPE",
                        help="a type already in the vocabulary")
    lp_show = lp_sub.add_parser(
        "show", help="the label policy, vocabulary decisions and contributions in force",
        description="Print the label policy, every accepted or mapped name and every label "
        "contribution in force (JSON).",
    )
    _add_dir(lp_show)
    lp.set_defaults(handler=_label_policy)

    rotate = sub.add_parser(
        "rotate",
        help="replace a site's key: countersign its rotation request (policy entry)",
        description=(
            "Append a key rotation for a site. The site sends a rotation request: a DSSE "
            "envelope (payloadType application/vnd.scarches-fl.policy.v1+json) of a 'rotate' "
            "policy change naming its new public key and the key id it replaces, signed by its "
            "old AND its new key. This command checks it, adds the operator signature and "
            "appends it; from then on only the new key is accepted. It prints both keys' "
            "fingerprints, to compare with the ones `site rotate-key` printed at the site."
        ),
    )
    _add_dir(rotate)
    rotate.add_argument(
        "--request", required=True, metavar="FILE", help="the site's signed rotation request"
    )
    rotate.set_defaults(handler=_rotate)

    serve = sub.add_parser(
        "serve",
        help="serve the registry over gRPC (TLS)",
        description=(
            "Serve the registry. TLS with the certificate made by init; --insecure serves "
            "plain text and is refused on any non-loopback address."
        ),
    )
    _add_dir(serve)
    serve.add_argument(
        "--listen",
        default=None,
        metavar="HOST:PORT",
        help="address to listen on (default: `listen` in coordinator.yaml)",
    )
    serve.add_argument(
        "--insecure",
        action="store_true",
        help="NO TLS: loopback development only (refused on other addresses)",
    )
    serve.set_defaults(handler=_serve)

    status = sub.add_parser(
        "status",
        help="tree size, last checkpoint, sites and contributions, blobs, disk use",
        description=(
            "Print the ledger's state from STATE (no server needed): tree size, the last "
            "checkpoint, every site with its contributions, blobs and disk use."
        ),
    )
    _add_dir(status)
    status.add_argument("--json", action="store_true", help="machine-readable output")
    status.add_argument(
        "--verify",
        action="store_true",
        help="also recompute every leaf hash and the root and check the checkpoint signature",
    )
    status.set_defaults(handler=_status)

    backup = sub.add_parser(
        "backup",
        help="consistent copy of the state directory (safe while serving)",
        description=(
            "Copy STATE to a new directory OUT: the ledger database through SQLite's online "
            "backup (consistent while the server runs), blobs, keys, TLS material, config and "
            "trust.json. The copy is a complete state directory: serve it, audit it, or keep it."
        ),
    )
    _add_dir(backup)
    backup.add_argument("--out", required=True, metavar="OUT", help="new directory to create")
    backup.set_defaults(handler=_backup)

    health = sub.add_parser(
        "health",
        help="ask the running server whether it is serving (exit 0 if so)",
        description=(
            "Ask the server that `coordinator serve` runs on STATE whether it is serving (exit "
            "0 if so, 1 if not). It finds the server through STATE/serve.json; a state "
            "directory that no server runs on (a backup, a copy) is reported as not served, "
            "never answered for by another server. --address asks a server at that address."
        ),
    )
    _add_dir(health)
    health.add_argument(
        "--address",
        default=None,
        metavar="HOST:PORT",
        help="ask the server at this address instead (default: the one `serve` on STATE "
        "recorded in STATE/serve.json)",
    )
    health.add_argument(
        "--timeout", type=float, default=3.0, metavar="S", help="seconds to wait for the answer"
    )
    health.set_defaults(handler=_health)


def _init(args: argparse.Namespace) -> int:
    from coordinator.admin import init_state

    result = init_state(
        args.dir,
        reference=args.reference,
        origin=args.origin,
        tls_names=tuple(args.tls_name) if args.tls_name else None,
        listen=args.listen,
        witness_keys=tuple(args.witness or ()),
        witnesses_required=args.witnesses_required,
    )
    print(f"initialised {result.state_dir}")
    print(f"  origin      {result.origin}")
    print(
        f"  reference   {result.digest}  ({result.n_genes} genes, {result.n_conditions} conditions)"
    )
    print(f"  log key     {result.log_key_id}")
    print(f"  TLS names   {', '.join(result.tls_names)}")
    print(f"  trust.json  {result.trust_path}  (hand this file to every site)")
    if args.trust_out:
        from pathlib import Path

        from protocols.bundle import atomic_write

        out = Path(args.trust_out)
        atomic_write(out, result.trust_path.read_bytes())
        print(f"  copied to   {out}")
    return 0


_CHECK_FINGERPRINT = (
    "Check this fingerprint with the site over a second channel (phone): it must be the one "
    "their `scarches-fl site keygen` (or `site rotate-key`) printed; if not, revoke the key."
)


def _enroll(args: argparse.Namespace) -> int:
    from coordinator.admin import enroll_site
    from protocols.keys import key_id, load_public_key

    entry = enroll_site(args.dir, site_id=args.site_id, public_key=args.public_key)
    print(f"enrolled {args.site_id} (ledger entry {entry.index})")
    print(f"fingerprint (key id): {key_id(load_public_key(args.public_key))}")
    print(_CHECK_FINGERPRINT)
    return 0


def _revoke(args: argparse.Namespace) -> int:
    from coordinator.admin import revoke_site

    entry = revoke_site(args.dir, site_id=args.site_id)
    print(f"revoked {args.site_id} (ledger entry {entry.index})")
    return 0


def _label_policy(args: argparse.Namespace) -> int:
    import json

    from coordinator.admin import label_policy, label_state

    if args.action == "show":
        print(json.dumps(label_state(args.dir), indent=2, sort_keys=True))
        return 0
    if args.action == "settings":
        entry, policy = label_policy(
            args.dir, action="settings", k=args.k, count_bucket=args.count_bucket,
            max_types=args.max_types, dp_epsilon=args.dp_epsilon, dp_delta=args.dp_delta,
            dp_clip_norm=args.dp_clip_norm, no_dp=args.no_dp,
        )
        print(f"label policy (ledger entry {entry.index}): {json.dumps(policy.to_json_obj(), sort_keys=True)}")
        return 0
    entry, _policy = label_policy(
        args.dir, action=args.action, label_key=args.label_key, name=args.name, target=args.target
    )
    verb = "accepted" if args.action == "accept" else "mapped"
    print(f"{verb} {args.name} as {args.target!r} at level {args.label_key!r} (ledger entry {entry.index})")
    return 0


def _rotate(args: argparse.Namespace) -> int:
    from coordinator.admin import rotate_site_key
    from protocols.keys import key_id, public_key_from_text
    from protocols.ledger import entry_payload
    from protocols.policy import parse_policy_change

    entry, site_id = rotate_site_key(args.dir, request=args.request)
    change = parse_policy_change(entry_payload(entry.envelope)[1])
    assert change.public_key is not None, "a rotation entry names the new key"
    print(f"rotated the key of {site_id} (ledger entry {entry.index})")
    print(f"new key fingerprint (key id): {key_id(public_key_from_text(change.public_key))}")
    print(f"replaced key id:              {change.previous_key_id}")
    print(_CHECK_FINGERPRINT)
    return 0


def _serve(args: argparse.Namespace) -> int:
    from coordinator.admin import serve

    return serve(args.dir, listen=args.listen, insecure=args.insecure)


def _status(args: argparse.Namespace) -> int:
    from coordinator.admin import print_status

    return print_status(args.dir, as_json=args.json, verify=args.verify)


def _backup(args: argparse.Namespace) -> int:
    from coordinator.admin import backup_state

    size, n_blobs = backup_state(args.dir, out=args.out)
    print(f"backed up {args.dir} to {args.out}: tree size {size}, {n_blobs} blobs")
    return 0


def _health(args: argparse.Namespace) -> int:
    from coordinator.admin import check_health

    return check_health(args.dir, address=args.address, timeout=args.timeout)
