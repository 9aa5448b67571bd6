"""The privacy guard: the last check before anything leaves the site.

It looks at exactly the bytes that would be sent -- the update payload (JSON that will be signed)
and ``diff.safetensors`` -- and refuses unless they hold only:

* the condition slices the reference's manifest declares: one tensor per ``condition`` tensor of
  the base, named as in the base, float32, shaped like the base tensor with the condition axis
  replaced by the number of new conditions; nothing else (no ``frozen`` tensor, no extra
  tensors, no safetensors metadata);
* finite values no larger in magnitude than the site's threshold;
* payload fields from a fixed whitelist, whose values are scalars, condition names inside this
  site's namespace, tensor shapes, or summary statistics; no list long enough to be a per-cell
  or per-gene array; no gene names; cell counts only where the policy allows them and never
  finer than its granularity;
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

from protocols.errors import ScarchesFLError

__all__ = [
    "PrivacyGuardError",
    "GuardPolicy",
    "GuardReport",
    "TensorSummary",
    "check_outgoing",
    "PAYLOAD_FIELDS",
]

logger = logging.getLogger(__name__)

#: Every field an outgoing update payload may carry (nested mappings by dotted prefix). A field
#: not listed here is refused: new fields need a deliberate change to this list.
PAYLOAD_FIELDS: frozenset[str] = frozenset(
    {
        "kind", "type", "format", "format_version", "version", "origin", "site_id", "key_id",
        "sequence", "created", "created_at", "timestamp", "issued_at", "note", "comment",
        "base", "base.size", "base.tree_size", "base.root", "base.root_hash", "base.digest",
        "base.model_digest", "base_checkpoint", "base_checkpoint.size",
        "base_checkpoint.tree_size", "base_checkpoint.root", "base_checkpoint.root_hash",
        "base_digest", "base_model_digest", "base_size", "base_root",
        "new_conditions", "conditions",
        "diff", "diff.sha256", "diff.size", "diff.bytes", "diff.tensors", "diff.format",
        "diff_sha256", "diff_size", "tensors",
        "stats", "statistics", "summary", "n_cells", "cells",
        "model_class", "mode",
    }
)
#: Fields whose value may be a count of cells (checked against the policy granularity).
_CELL_COUNT_FIELDS = ("n_cells", "cells", "n_obs", "cell_count", "cells_per_condition")
#: Within these subtrees (tensor descriptions and statistics) any key is fine, values are
#: checked by shape: scalars and short lists only.
_FREE_SUBTREES = ("diff.tensors", "tensors", "stats", "statistics", "summary")


class PrivacyGuardError(ScarchesFLError):
    """The outgoing update holds something that must not leave the site; nothing was signed."""

    exit_code = 5


@dataclass(frozen=True)
class GuardPolicy:
    """What may leave: from the site's thresholds and the consortium policy."""

    site_id: str
    max_value_abs: float = 1.0e4
    #: cell counts in the payload: None = none allowed; else every count must be a multiple of
    #: this granularity (e.g. 10 or 100).
    cell_count_granularity: int | None = None
    min_cells_per_batch: int = 10
    #: no list in the payload may be longer than this (rules out per-cell / per-gene arrays)
    max_list_length: int = 1024


@dataclass(frozen=True)
class TensorSummary:
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
    tensors: tuple[TensorSummary, ...]
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


def _walk(obj: Any, prefix: str, out: list[tuple[str, Any]]) -> None:
    if isinstance(obj, Mapping):
        for k, v in obj.items():
            if not isinstance(k, str):
                raise _fail(f"payload key {k!r} under {prefix or 'the top level'} is not a string")
            path = f"{prefix}.{k}" if prefix else k
            out.append((path, v))
            if not any(path == s or path.startswith(s + ".") for s in _FREE_SUBTREES):
                _walk(v, path, out)
            else:
                _walk_free(v, path, out)


def _walk_free(obj: Any, prefix: str, out: list[tuple[str, Any]]) -> None:
    if isinstance(obj, Mapping):
        for k, v in obj.items():
            path = f"{prefix}.{k}"
            out.append((path, v))
            _walk_free(v, path, out)


def _check_value_shape(path: str, value: Any, policy: GuardPolicy, genes: set[str]) -> None:
    if isinstance(value, list):
        if len(value) > policy.max_list_length:
            raise _fail(
                f"payload field {path!r} is a list of {len(value)} values, longer than "
                f"{policy.max_list_length}: that looks like per-cell or per-gene data"
            )
        strings = [v for v in value if isinstance(v, str)]
        leaked = [s for s in strings if s in genes and "/" not in s]
        if len(leaked) >= 3:
            raise _fail(f"payload field {path!r} lists gene names ({leaked[:3]}...)")
        for i, v in enumerate(value):
            if isinstance(v, Mapping | list):
                if isinstance(v, list):
                    _check_value_shape(f"{path}[{i}]", v, policy, genes)
            elif not isinstance(v, str | int | float | bool) and v is not None:
                raise _fail(f"payload field {path}[{i}] has a value of type {type(v).__name__}")
    elif isinstance(value, float) and not math.isfinite(value):
        raise _fail(f"payload field {path!r} is not finite")
    elif isinstance(value, str) and len(value) > 4096:
        raise _fail(f"payload field {path!r} is a string of {len(value)} characters")


def _cell_counts(items: Sequence[tuple[str, Any]]) -> list[tuple[str, int]]:
    found = []
    for path, v in items:
        last = path.rsplit(".", 1)[-1]
        if last in _CELL_COUNT_FIELDS:
            if isinstance(v, Mapping):
                found += [(f"{path}.{k}", x) for k, x in v.items()]
            elif isinstance(v, list):
                found += [(f"{path}[{i}]", x) for i, x in enumerate(v)]
            else:
                found.append((path, v))
    return found


def check_outgoing(
    *,
    payload: Mapping[str, Any],
    payload_bytes: bytes,
    diff_bytes: bytes,
    diff_tensors: Mapping[str, np.ndarray],
    base_manifest: Mapping[str, Any],
    new_conditions: Sequence[str],
    base_size: int,
    base_digest: str,
    policy: GuardPolicy,
) -> GuardReport:
    """Check the outgoing update (see the module docstring). ``diff_tensors`` must be what a
    strict parser read back from ``diff_bytes`` (not the arrays the bytes were made from)."""
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
            TensorSummary(
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

    # -- payload: whitelisted fields, no per-cell arrays, matches the diff and the base --
    items: list[tuple[str, Any]] = []
    _walk(payload, "", items)
    genes = {str(g) for g in base_manifest.get("genes", [])}
    for path, value in items:
        free = any(path.startswith(s + ".") for s in _FREE_SUBTREES)
        if not free and path not in PAYLOAD_FIELDS:
            raise _fail(
                f"payload field {path!r} is not on the whitelist of fields that may leave the "
                "site (site_agent.guard.PAYLOAD_FIELDS)"
            )
        _check_value_shape(path, value, policy, genes)
    for path, count in _cell_counts(items):
        if policy.cell_count_granularity is None:
            raise _fail(
                f"payload field {path!r} carries a cell count, and the policy allows none"
            )
        if isinstance(count, bool) or not isinstance(count, int) or count < 0:
            raise _fail(f"payload field {path!r} is not a whole number of cells")
        if count % policy.cell_count_granularity:
            raise _fail(
                f"payload field {path!r} = {count} is finer than the policy's granularity of "
                f"{policy.cell_count_granularity} cells"
            )
    flat = dict(items)
    sent_conditions = flat.get("new_conditions", flat.get("conditions"))
    if sent_conditions is not None and list(sent_conditions) != new_conditions:
        raise _fail(
            f"the payload declares conditions {sent_conditions}, the diff holds {new_conditions}"
        )
    diff_sha = _sha256(diff_bytes)
    for path in ("diff.sha256", "diff_sha256"):
        if path in flat and "sha256:" + str(flat[path]).removeprefix("sha256:") != diff_sha:
            raise _fail(f"payload {path} = {flat[path]} but the diff bytes hash to {diff_sha}")
    for path in ("diff.size", "diff.bytes", "diff_size"):
        if path in flat and flat[path] != len(diff_bytes):
            raise _fail(f"payload {path} = {flat[path]} but the diff is {len(diff_bytes)} bytes")
    for path in ("site_id",):
        if path in flat and flat[path] != policy.site_id:
            raise _fail(f"payload site_id {flat[path]!r} is not this site ({policy.site_id!r})")
    digests = [v for p, v in items if p in ("base.digest", "base.model_digest", "base_digest",
                                            "base_model_digest")]
    if any(d != base_digest for d in digests):
        raise _fail(
            f"the payload names base digest {digests} but the verified reference is {base_digest}"
        )
    sizes = [v for p, v in items if p in ("base.size", "base.tree_size", "base_checkpoint.size",
                                          "base_checkpoint.tree_size", "base_size")]
    if any(s != base_size for s in sizes):
        raise _fail(
            f"the payload names base size {sizes} but the verified checkpoint is {base_size}"
        )
    return GuardReport(
        site_id=policy.site_id,
        new_conditions=tuple(new_conditions),
        diff_sha256=diff_sha,
        diff_size=len(diff_bytes),
        payload_sha256=_sha256(payload_bytes),
        payload_size=len(payload_bytes),
        tensors=tuple(summaries),
        payload_fields=tuple(sorted(p for p, _ in items if "." not in p)),
        base_size=int(base_size),
        base_digest=base_digest,
    )
