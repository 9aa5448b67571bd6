"""``site status``: what a site trusts, what it last verified, and what it contributed."""

from __future__ import annotations

import hashlib
import time
from pathlib import Path
from typing import Any

from site_agent.outbox import Outbox
from site_agent.state import SiteState

__all__ = ["site_status", "render_status"]


def site_status(state_dir: str | Path) -> dict[str, Any]:
    """A summary of the state directory (no network)."""
    from site_agent.verify import load_trust

    state = SiteState(state_dir).require_existing()
    info: dict[str, Any] = {"state": str(state.path)}
    pinned = state.pinned_trust()
    if pinned is None:
        info["trust"] = None
    else:
        trust = load_trust(pinned, source=str(state.trust_path))
        info["trust"] = {
            "file": str(state.trust_path),
            "sha256": "sha256:" + hashlib.sha256(pinned).hexdigest(),
            "origin": trust.origin,
            "log_keys": ["+".join(trust.log_public_key.split("+")[:2])],  # name+key hash
            "operator_keys": sorted(trust.operator_key_ids()),
            "witnesses": [k.split("+", 1)[0] for k in trust.witness_keys],
            "witness_threshold": trust.witnesses_required,
        }
    cp = state.last_checkpoint()
    info["last_checkpoint"] = None if cp is None else {
        "tree_size": cp.size, "root": cp.root_hex, "origin": cp.origin,
        "verified_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(cp.verified_at)),
    }
    info["last_sequence"] = state.last_sequence()
    info["settings"] = state.remembered()
    info["contributions"] = state.contributions()
    outbox = Outbox(state.outbox_path)
    counts: dict[str, int] = {}
    for e in outbox.entries():
        counts[e.state] = counts.get(e.state, 0) + 1
    info["outbox"] = counts
    from site_agent.rotation import pending_rotation

    rotation = pending_rotation(state)
    info["key_rotation"] = None if rotation is None else {
        k: v for k, v in rotation.to_json_obj().items() if k not in ("format", "format_version")
    }
    return info


def render_status(info: dict[str, Any]) -> str:
    lines = [f"state directory: {info['state']}"]
    t = info.get("trust")
    if t is None:
        lines.append("trust: none pinned yet (the first `site map` pins --trust)")
    else:
        lines.append(f"trust pinned: {t['file']} ({t['sha256'][:23]}...)")
        lines.append(f"  log origin: {t['origin']}")
        lines.append(f"  log key(s): {', '.join(t['log_keys'])}")
        lines.append(f"  operator key(s): {', '.join(k[:16] + '...' for k in t['operator_keys'])}")
        if t["witness_threshold"]:
            lines.append(f"  witnesses: {t['witness_threshold']} of {', '.join(t['witnesses'])}")
        else:
            lines.append("  witnesses: none required")
    cp = info.get("last_checkpoint")
    if cp is None:
        lines.append("last verified checkpoint: none yet")
    else:
        lines.append(f"last verified checkpoint: tree size {cp['tree_size']}, root "
                     f"{cp['root'][:16]}..., verified {cp['verified_at']}")
    lines.append(f"last sequence number allocated: {info['last_sequence']}")
    contrib = info.get("contributions", [])
    lines.append(f"contributions accepted: {len(contrib)}")
    for c in contrib:
        if c.get("kind") == "label_contribution":
            what = "label prototypes: " + (", ".join(c.get("label_types", [])) or "-")
        else:
            what = "conditions: " + (", ".join(c.get("new_conditions", [])) or "-")
        lines.append(f"  {c.get('outbox_id')}: sequence {c.get('sequence')}, log index "
                     f"{c.get('leaf_index')} (tree size {c.get('tree_size')}), {what}")
    box = info.get("outbox", {})
    lines.append("outbox: " + (", ".join(f"{n} {k}" for k, n in sorted(box.items())) or "empty"))
    if box.get("pending"):
        lines.append("  pending updates wait for delivery: run `scarches-fl site retry --state "
                     f"{info['state']}`")
    rot = info.get("key_rotation")
    if rot:
        lines.append(f"key rotation pending since {rot['requested_at']}: new key "
                     f"{rot['new_key_id'][:16]}... ({rot['pending_key']}) replaces "
                     f"{rot['old_key_id'][:16]}...; once the operator appended the request, run "
                     f"`scarches-fl site rotate-key finish --state {info['state']}`")
    return "\n".join(lines)
