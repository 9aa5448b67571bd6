"""The privacy guard: the last check before anything leaves the site.

It looks at exactly the bytes that would be sent -- the update payload (JSON that will be signed)
and ``diff.safetensors`` -- and refuses unless they hold only:

* the condition slices the reference's manifest declares: one tensor per ``condition`` tensor of
  the base, named as in the base, float32, shaped like the base tensor with the condition axis
  replaced by the number of new conditions; nothing else (no ``frozen`` tensor, no extra
  tensors, no safetensors metadata);
* finite values no larger in magnitude than the site's threshold;
* a payload that is exactly a site update as the protocol defines it: it must pass the same
  strict parser the coordinator runs (:func:`protocols.update.parse_update_payload`), so the fields
  that may leave are the schema's (:data:`protocols.update.PAYLOAD_SCHEMA`), derived, not listed
  here; no list longer than a per-cell or per-gene array could be; no gene names;
* a diff hash and size that match the bytes, and a base (checkpoint and digest) that is the
  reference this site verified.

The guard is pure: bytes and verified facts in, a :class:`GuardReport` (the readable summary the
outbox stores) or a :class:`PrivacyGuardError` out.
"""

from __future__ import annotations

import hashlib
import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from protocols.errors import ScarchesFLError, UpdateRejectedError
from protocols.update import UpdatePayload, parse_update_payload, payload_field_paths

__all__ = [
    "PrivacyGuardError",
    "GuardPolicy",
    "GuardReport",
    "SentTensor",
    "check_outgoing",
    "PAYLOAD_FIELDS",
]

logger = logging.getLogger(__name__)

#: Every field an outgoing update payload may carry: derived from the update schema, so a field
#: the protocol gains is allowed here by the same change, and nothing else ever is.
PAYLOAD_FIELDS: frozenset[str] = frozenset(payload_field_paths())


class PrivacyGuardError(ScarchesFLError):
    """The outgoing update holds something that must not leave the site; nothing was signed."""

    exit_code = 5


@dataclass(frozen=True)
class GuardPolicy:
    """What may leave: from the site's thresholds and the consortium policy."""

    site_id: str
    max_value_abs: float = 1.0e4
    #: no list in the payload may be longer than this (rules out per-cell / per-gene arrays)
    max_list_length: int = 1024


@dataclass(frozen=True)
class SentTensor:
    """One tensor of the diff as it will leave the site, for the readable summary (the signed
    statistics of the same tensor are :class:`protocols.update.TensorSummary`)."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    nbytes: int
    sha256: str
    l2_norm: float
    max_abs: float


@dataclass(frozen=True)
class GuardReport:
    """What the guard saw and allowed, in a form a person can read."""

    site_id: str
    new_conditions: tuple[str, ...]
    diff_sha256: str
    diff_size: int
    payload_sha256: str
    payload_size: int
    tensors: tuple[SentTensor, ...]
    payload_fields: tuple[str, ...]
    base_size: int
    base_digest: str
    notes: tuple[str, ...] = field(default_factory=tuple)

    def to_dict(self) -> dict[str, Any]:
        return {
            "site_id": self.site_id,
            "new_conditions": list(self.new_conditions),
            "diff": {"sha256": self.diff_sha256, "bytes": self.diff_size},
            "payload": {"sha256": self.payload_sha256, "bytes": self.payload_size,
                        "fields": list(self.payload_fields)},
            "tensors": [
                {"name": t.name, "dtype": t.dtype, "shape": list(t.shape), "bytes": t.nbytes,
                 "sha256": t.sha256, "l2_norm": t.l2_norm, "max_abs": t.max_abs}
                for t in self.tensors
            ],
            "base": {"tree_size": self.base_size, "digest": self.base_digest},
            "notes": list(self.notes),
        }

    def render(self) -> str:
        """The readable summary (also ``outbox/<id>/summary.txt``)."""
        lines = [
            f"update from site {self.site_id!r} on reference version {self.base_size} "
            f"({self.base_digest})",
            f"new conditions ({len(self.new_conditions)}): {', '.join(self.new_conditions)}",
            "",
            "what leaves the site:",
            f"  payload.json (signed)  {self.payload_size:>9,} bytes  sha256:"
            f"{self.payload_sha256.removeprefix('sha256:')}",
            f"  diff.safetensors       {self.diff_size:>9,} bytes  {self.diff_sha256}",
            "",
            f"  {'tensor':<28} {'shape':<14} {'bytes':>9}  {'L2 norm':>10}  {'max |x|':>9}  sha256",
        ]
        for t in self.tensors:
            shape = "x".join(str(d) for d in t.shape)
            lines.append(
                f"  {t.name:<28} {shape:<14} {t.nbytes:>9,}  {t.l2_norm:>10.4g}  "
                f"{t.max_abs:>9.4g}  {t.sha256.removeprefix('sha256:')[:16]}..."
            )
        lines += ["", f"payload fields: {', '.join(self.payload_fields)}"]
        lines += [
            "not sent: cells, expression values, gene-level data of the query, labels, "
            "the embedding, the mapped .h5ad",
        ]
        lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines) + "\n"


def _sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def _fail(msg: str) -> PrivacyGuardError:
    return PrivacyGuardError(f"privacy guard: {msg}. Nothing was signed or sent")


def _check_values(obj: Any, path: str, policy: GuardPolicy, genes: set[str]) -> None:
    """No list as long as a per-cell or per-gene array, no gene names, no long strings, no
    non-finite numbers anywhere in the payload."""
    if isinstance(obj, Mapping):
        for k, v in obj.items():
            _check_values(v, f"{path}.{k}" if path else str(k), policy, genes)
    elif isinstance(obj, list):
        if len(obj) > policy.max_list_length:
            raise _fail(
                f"payload field {path!r} is a list of {len(obj)} values, longer than "
                f"{policy.max_list_length}: that looks like per-cell or per-gene data"
            )
        leaked = [v for v in obj if isinstance(v, str) and v in genes and "/" not in v]
        if len(leaked) >= 3:
            raise _fail(f"payload field {path!r} lists gene names ({leaked[:3]}...)")
        for i, v in enumerate(obj):
            _check_values(v, f"{path}[{i}]", policy, genes)
    elif isinstance(obj, float) and not math.isfinite(obj):
        raise _fail(f"payload field {path!r} is not finite")
    elif isinstance(obj, str) and len(obj) > 4096:
        raise _fail(f"payload field {path!r} is a string of {len(obj)} characters")


def _parse_payload(payload_bytes: bytes) -> tuple[UpdatePayload, Mapping[str, Any]]:
    try:
        parsed = parse_update_payload(payload_bytes)
    except UpdateRejectedError as exc:
        raise _fail(
            f"the payload is not a site update as the protocol defines it ({exc.message}); only "
            f"these fields may leave the site: {', '.join(payload_field_paths())}"
        ) from exc
    return parsed, parsed.to_json_obj()


def check_outgoing(
    *,
    payload_bytes: bytes,
    diff_bytes: bytes,
    diff_tensors: Mapping[str, np.ndarray],
    base_manifest: Mapping[str, Any],
    new_conditions: Sequence[str],
    base_size: int,
    base_digest: str,
    policy: GuardPolicy,
) -> GuardReport:
    """Check the outgoing update (see the module docstring). ``payload_bytes`` are exactly the
    bytes that will be signed; ``diff_tensors`` must be what a strict parser read back from
    ``diff_bytes`` (not the arrays the bytes were made from)."""
    new_conditions = list(new_conditions)
    m = len(new_conditions)
    if m == 0:
        raise _fail("the update adds no condition")
    prefix = policy.site_id + "/"
    outside = [c for c in new_conditions if not c.startswith(prefix)]
    if outside:
        raise _fail(f"conditions {outside} are not inside this site's namespace {prefix!r}")
    existing = set(base_manifest.get("conditions", []))
    clash = [c for c in new_conditions if c in existing]
    if clash or len(set(new_conditions)) != m:
        raise _fail(f"conditions {clash or new_conditions} already exist or repeat")

    # -- tensors: exactly the declared condition slices --
    specs = base_manifest.get("tensors", {})
    cond_specs = {n: s for n, s in specs.items() if s.get("role") == "condition"}
    if not cond_specs:
        raise _fail("the base manifest declares no condition tensor; there is nothing to send")
    names = set(diff_tensors)
    if names != set(cond_specs):
        extra = sorted(names - set(cond_specs))
        missing = sorted(set(cond_specs) - names)
        frozen = [n for n in extra if n in specs]
        what = []
        if frozen:
            what.append(f"frozen (shared) tensors {frozen}")
        if set(extra) - set(frozen):
            what.append(f"undeclared tensors {sorted(set(extra) - set(frozen))}")
        if missing:
            what.append(f"no slice for condition tensors {missing}")
        raise _fail("the diff holds " + "; ".join(what))
    summaries = []
    for name in sorted(names):
        spec = cond_specs[name]
        arr = diff_tensors[name]
        base_shape = [int(d) for d in spec["shape"]]
        axis = int(spec["axis"])
        want = list(base_shape)
        want[axis] = m
        if list(arr.shape) != want:
            raise _fail(
                f"tensor {name!r} has shape {list(arr.shape)}, but the declared condition slice "
                f"for {m} new condition(s) is {want}"
            )
        if arr.dtype != np.float32:
            raise _fail(f"tensor {name!r} is {arr.dtype}, condition slices are float32")
        if not np.isfinite(arr).all():
            raise _fail(f"tensor {name!r} holds NaN or Inf")
        max_abs = float(np.abs(arr).max()) if arr.size else 0.0
        if max_abs > policy.max_value_abs:
            raise _fail(
                f"tensor {name!r} holds a value of magnitude {max_abs:.4g}, above the site's "
                f"threshold {policy.max_value_abs:g} (thresholds.max_value_abs); the fine-tuning "
                "diverged"
            )
        raw = np.ascontiguousarray(arr, dtype="<f4").tobytes()
        summaries.append(
            SentTensor(
                name=name, dtype="float32", shape=tuple(int(d) for d in arr.shape),
                nbytes=len(raw), sha256=_sha256(raw),
                l2_norm=float(np.linalg.norm(arr.astype(np.float64).ravel())), max_abs=max_abs,
            )
        )
    tensor_bytes = sum(t.nbytes for t in summaries)
    header_allowance = 1024 + 256 * len(summaries)
    if len(diff_bytes) > tensor_bytes + header_allowance:
        raise _fail(
            f"diff.safetensors is {len(diff_bytes)} bytes for {tensor_bytes} bytes of tensors: "
            "it carries more than the condition slices"
        )

    # -- payload: the update schema and nothing else, matching the diff and the base --
    parsed, obj = _parse_payload(payload_bytes)
    _check_values(obj, "", policy, {str(g) for g in base_manifest.get("genes", [])})
    if parsed.site_id != policy.site_id:
        raise _fail(f"payload site_id {parsed.site_id!r} is not this site ({policy.site_id!r})")
    if list(parsed.new_conditions) != new_conditions:
        raise _fail(
            f"the payload declares conditions {list(parsed.new_conditions)}, the diff holds "
            f"{new_conditions}"
        )
    diff_sha = _sha256(diff_bytes)
    if "sha256:" + parsed.diff_sha256 != diff_sha:
        raise _fail(f"payload diff.sha256 = {parsed.diff_sha256} but the diff bytes hash to "
                    f"{diff_sha}")
    if parsed.diff_size != len(diff_bytes):
        raise _fail(f"payload diff.size = {parsed.diff_size} but the diff is {len(diff_bytes)} "
                    "bytes")
    if set(parsed.tensors) != names:
        raise _fail(f"the payload describes tensors {sorted(parsed.tensors)}, the diff holds "
                    f"{sorted(names)}")
    if parsed.base_digest != base_digest:
        raise _fail(
            f"the payload names base digest {parsed.base_digest} but the verified reference is "
            f"{base_digest}"
        )
    if parsed.base_size != base_size:
        raise _fail(
            f"the payload names base size {parsed.base_size} but the verified checkpoint is "
            f"{base_size}"
        )
    return GuardReport(
        site_id=policy.site_id,
        new_conditions=tuple(new_conditions),
        diff_sha256=diff_sha,
        diff_size=len(diff_bytes),
        payload_sha256=_sha256(payload_bytes),
        payload_size=len(payload_bytes),
        tensors=tuple(summaries),
        payload_fields=tuple(obj),
        base_size=int(base_size),
        base_digest=base_digest,
    )
