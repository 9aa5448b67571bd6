"""Keys and the site policy of federated training.

The policy is a JSON file the operator keeps next to the coordinator::

    {"format": "scarches-fl.federation-policy", "format_version": 1,
     "sites": {"hosp-a": "ed25519:<base64 raw public key>", ...}}

Only a site listed here can contribute; its contributions must verify under the listed key.
Keys are Ed25519 keys (:mod:`protocols.keys`): the same ``site.key`` a site uses to sign
its surgery updates signs its federated contributions.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from protocols.canonical import canonical_json, parse_json_strict
from protocols.errors import ConfigError, ScarchesFLError

__all__ = [
    "POLICY_FORMAT",
    "load_policy",
    "load_policy_coordinator",
    "write_policy",
    "load_signing_key",
    "SITE_ID_RE",
]

POLICY_FORMAT = "scarches-fl.federation-policy"
SITE_ID_RE = re.compile(r"[a-z0-9][a-z0-9._-]{0,63}")
_MAX_POLICY_BYTES = 4 * 1024 * 1024


def write_policy(path: Path, site_keys: Mapping[str, Any], *, coordinator: Any = None) -> None:
    """Write a policy naming ``site_keys`` (site id -> Ed25519 public or private key) and,
    optionally, the coordinator's record-signing key (what an auditor pins)."""
    from protocols.bundle import atomic_write
    from protocols.keys import public_key_text

    for site in site_keys:
        if not SITE_ID_RE.fullmatch(site):
            raise ConfigError(f"site id {site!r} must match {SITE_ID_RE.pattern}")
    doc = {
        "format": POLICY_FORMAT,
        "format_version": 1,
        "sites": {s: public_key_text(k) for s, k in sorted(site_keys.items())},
    }
    if coordinator is not None:
        doc["coordinator"] = public_key_text(coordinator)
    atomic_write(Path(path), canonical_json(doc))


def load_policy(path: Path) -> dict[str, Any]:
    """Site id -> Ed25519 public key, from a policy file. Raises :class:`ConfigError` naming
    the file and the field."""
    from protocols.keys import public_key_from_text

    path = Path(path)
    try:
        doc = parse_json_strict(path.read_bytes(), max_bytes=_MAX_POLICY_BYTES, what=str(path))
    except OSError as exc:
        raise ConfigError(
            f"cannot read the federation policy {path}: {exc}; pass the file "
            "written by 'scarches-fl federate policy'"
        ) from exc
    except ScarchesFLError as exc:
        raise ConfigError(f"{path}: {exc}") from exc
    if not isinstance(doc, dict) or doc.get("format") != POLICY_FORMAT:
        raise ConfigError(f"{path}: field 'format' must be {POLICY_FORMAT!r}")
    sites = doc.get("sites")
    if not isinstance(sites, dict) or not sites:
        raise ConfigError(f"{path}: field 'sites' must name at least one site")
    out: dict[str, Any] = {}
    for site, text in sites.items():
        if not SITE_ID_RE.fullmatch(site):
            raise ConfigError(f"{path}: site id {site!r} must match {SITE_ID_RE.pattern}")
        try:
            out[site] = public_key_from_text(str(text))
        except ScarchesFLError as exc:
            raise ConfigError(f"{path}: sites.{site}: {exc}") from exc
    return out


def load_policy_coordinator(path: Path) -> Any:
    """The coordinator's record-signing public key named in a policy file."""
    from protocols.keys import public_key_from_text

    doc = parse_json_strict(Path(path).read_bytes(), max_bytes=_MAX_POLICY_BYTES, what=str(path))
    text = doc.get("coordinator") if isinstance(doc, dict) else None
    if not isinstance(text, str):
        raise ConfigError(
            f"{path}: field 'coordinator' (the record-signing public key) is "
            "missing; write it with 'scarches-fl federate policy --coordinator-key'"
        )
    try:
        return public_key_from_text(text)
    except ScarchesFLError as exc:
        raise ConfigError(f"{path}: coordinator: {exc}") from exc


def load_signing_key(path: Path) -> Any:
    """An Ed25519 private key file (PEM PKCS#8, as ``scarches-fl site keygen`` writes)."""
    from protocols.keys import load_private_key

    return load_private_key(path)
