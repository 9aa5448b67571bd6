"""Condition diffs: the new condition slices a site contributes, and how to apply them.

A diff for ``m`` new conditions holds, for every tensor whose manifest role is ``condition``,
the slice of the new conditions along that tensor's ``axis`` (so its shape is the base shape with
``shape[axis] = m``), in the base tensor's dtype. Nothing else: no frozen tensor can be
expressed in a diff.

**Apply rule** (:func:`apply_condition_diff`): the result's manifest equals the base manifest
except that ``conditions`` has the new names appended in the given order, each condition
tensor's ``shape[axis]`` grows by ``m``, and ``digest`` is recomputed. Condition tensors are
``concatenate([base, diff], axis)``; every other tensor is the base tensor, bit for bit.

Serialized form: a safetensors file (:func:`diff_to_bytes`), read back only through the strict
reader (:func:`diff_from_bytes`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from collections.abc import Set as AbstractSet
from typing import Any

import numpy as np

from protocols.bundle import (
    BATCH_RE,
    CONDITION_NAME_RE,
    NAMESPACE_RE,
    ReferenceBundle,
    make_bundle,
    safetensors_from_bytes,
    safetensors_to_bytes,
)
from protocols.errors import BundleError, FormatError, UpdateRejectedError
from protocols.limits import DEFAULT_LIMITS, Limits

__all__ = [
    "condition_tensor_specs",
    "expected_diff_shapes",
    "check_diff_against_base",
    "check_new_conditions",
    "extract_condition_diff",
    "apply_condition_diff",
    "diff_to_bytes",
    "diff_from_bytes",
]

DIFF_WHAT = "diff.safetensors"


def condition_tensor_specs(base_manifest: Mapping[str, Any]) -> dict[str, Mapping[str, Any]]:
    """``{name: spec}`` of the base manifest's tensors whose role is ``condition``."""
    specs = base_manifest.get("tensors")
    if not isinstance(specs, Mapping):
        raise BundleError("base manifest has no tensors object")
    return {n: s for n, s in specs.items() if isinstance(s, Mapping) and s.get("role") == "condition"}


def expected_diff_shapes(base_manifest: Mapping[str, Any], m: int) -> dict[str, tuple[tuple[int, ...], str]]:
    """``{name: (shape, dtype)}`` that a diff for ``m`` new conditions must have exactly."""
    out: dict[str, tuple[tuple[int, ...], str]] = {}
    for name, spec in condition_tensor_specs(base_manifest).items():
        shape = list(spec["shape"])
        shape[int(spec["axis"])] = m
        out[name] = (tuple(int(d) for d in shape), str(spec["dtype"]))
    return out


def check_new_conditions(
    base_conditions: Sequence[str] | AbstractSet[str],
    new_conditions: Sequence[str],
    *,
    namespace: str | None = None,
) -> None:
    """New condition names: ASCII ``<namespace>/<batch>``, unique, not already in the base, and
    (if ``namespace`` is given) inside it. Raises :class:`UpdateRejectedError`."""
    if isinstance(new_conditions, str) or not isinstance(new_conditions, Sequence):
        raise UpdateRejectedError("E_CONDITION_NAME", "new conditions must be a list of names")
    if not new_conditions:
        raise UpdateRejectedError("E_CONDITION_NAME", "a diff must add at least one condition")
    existing = base_conditions if isinstance(base_conditions, AbstractSet) else set(base_conditions)
    seen: set[str] = set()
    for c in new_conditions:
        if not isinstance(c, str) or not CONDITION_NAME_RE.fullmatch(c):
            raise UpdateRejectedError(
                "E_CONDITION_NAME",
                f"condition name {str(c)[:160]!r} is not '<namespace>/<batch>' in ASCII "
                f"(namespace {NAMESPACE_RE.pattern}, batch {BATCH_RE.pattern}); rename the batch",
            )
        ns, batch = c.split("/", 1)
        if batch in (".", "..") or ns in (".", ".."):
            raise UpdateRejectedError(
                "E_CONDITION_NAME", f"condition name {c!r} uses a path component '.' or '..'"
            )
        if namespace is not None and ns != namespace:
            raise UpdateRejectedError(
                "E_CONDITION_NAMESPACE",
                f"condition {c!r} is outside this site's namespace {namespace!r}; name it "
                f"'{namespace}/<batch>'",
            )
        if c in existing or c in seen:
            raise UpdateRejectedError(
                "E_CONDITION_EXISTS",
                f"condition {c!r} already exists in the reference (or is listed twice); "
                "choose a new batch name",
            )
        seen.add(c)


def check_diff_against_base(
    base_manifest: Mapping[str, Any], diff: Mapping[str, np.ndarray], m: int
) -> None:
    """Tensor names, dtypes and shapes of ``diff`` are exactly those implied by the base and
    ``m`` new conditions; every value finite. Raises :class:`UpdateRejectedError`."""
    expected = expected_diff_shapes(base_manifest, m)
    specs = base_manifest.get("tensors", {})
    names = set(diff)
    frozen = sorted(n for n in names if n in specs and n not in expected)
    if frozen:
        raise UpdateRejectedError(
            "E_TENSOR_FROZEN",
            f"the diff carries frozen tensor(s) {frozen[:5]}; only condition tensors may change",
        )
    if names != set(expected):
        raise UpdateRejectedError(
            "E_TENSOR_SET",
            f"the diff's tensors differ from the base's condition tensors: missing "
            f"{sorted(set(expected) - names)[:5]}, unknown {sorted(names - set(expected))[:5]}",
        )
    for name in sorted(expected):
        shape, dtype = expected[name]
        arr = diff[name]
        if not isinstance(arr, np.ndarray):
            raise UpdateRejectedError("E_TENSOR_DTYPE", f"diff tensor {name!r} is not an array")
        if arr.dtype.name != dtype:
            raise UpdateRejectedError(
                "E_TENSOR_DTYPE",
                f"diff tensor {name!r} is {arr.dtype.name}, the base tensor is {dtype}",
            )
        if tuple(arr.shape) != shape:
            raise UpdateRejectedError(
                "E_TENSOR_SHAPE",
                f"diff tensor {name!r} has shape {tuple(arr.shape)}, expected {shape} for {m} "
                "new condition(s)",
            )
        if arr.dtype.kind == "f" and not bool(np.isfinite(arr).all()):
            raise UpdateRejectedError(
                "E_NONFINITE", f"diff tensor {name!r} holds NaN or Inf; retrain the site's columns"
            )


def extract_condition_diff(base_manifest: Mapping[str, Any], new: ReferenceBundle) -> dict[str, np.ndarray]:
    """The diff that turns the base into ``new``: for every condition tensor, the slice of the
    conditions ``new`` has beyond the base's. ``new.conditions`` must start with the base's."""
    base_conds = list(base_manifest.get("conditions", []))
    new_conds = new.conditions
    if new_conds[: len(base_conds)] != base_conds or len(new_conds) <= len(base_conds):
        raise BundleError(
            "the new bundle's conditions do not extend the base's conditions; build the new "
            "model by surgery on this base"
        )
    n0, n1 = len(base_conds), len(new_conds)
    out: dict[str, np.ndarray] = {}
    for name, spec in condition_tensor_specs(base_manifest).items():
        if name not in new.tensors:
            raise BundleError(f"the new bundle lacks condition tensor {name!r}")
        arr = new.tensors[name]
        axis = int(spec["axis"])
        if arr.ndim != len(spec["shape"]) or arr.shape[axis] != n1:
            raise BundleError(
                f"condition tensor {name!r} has shape {arr.shape} in the new bundle, "
                f"expected {n1} entries along axis {axis}"
            )
        index = [slice(None)] * arr.ndim
        index[axis] = slice(n0, n1)
        out[name] = np.ascontiguousarray(arr[tuple(index)])
    return out


def apply_condition_diff(
    base: ReferenceBundle, diff: Mapping[str, np.ndarray], new_conditions: Sequence[str]
) -> ReferenceBundle:
    """``base`` plus ``diff`` for ``new_conditions`` (apply rule in the module docstring).
    Checks conditions and the diff first (:class:`UpdateRejectedError`). numpy only."""
    new_conditions = list(new_conditions)
    check_new_conditions(base.conditions, new_conditions)
    m = len(new_conditions)
    check_diff_against_base(base.manifest, diff, m)
    manifest = {k: v for k, v in base.manifest.items() if k != "digest"}
    manifest["conditions"] = base.conditions + new_conditions
    specs = {name: dict(spec) for name, spec in base.manifest["tensors"].items()}
    tensors: dict[str, np.ndarray] = dict(base.tensors)
    for name, spec in specs.items():
        if spec["role"] != "condition":
            continue
        axis = int(spec["axis"])
        merged = np.concatenate([base.tensors[name], np.asarray(diff[name])], axis=axis)
        tensors[name] = merged
        spec["shape"] = list(merged.shape)
    manifest["tensors"] = specs
    return make_bundle(manifest, tensors)


def diff_to_bytes(diff: Mapping[str, np.ndarray]) -> bytes:
    """The diff as a safetensors file (tensor names sorted)."""
    return safetensors_to_bytes(diff)


def diff_from_bytes(
    data: bytes, *, max_bytes: int = DEFAULT_LIMITS.max_diff_bytes, limits: Limits = DEFAULT_LIMITS
) -> dict[str, np.ndarray]:
    """Strictly parse a diff file (size cap first, then the safetensors header rules of
    :func:`protocols.bundle.parse_safetensors_header`). Raises :class:`FormatError` subclasses."""
    try:
        return safetensors_from_bytes(data, max_bytes=max_bytes, limits=limits, what=DIFF_WHAT)
    except FormatError:
        raise
    except BundleError as exc:  # pragma: no cover - defensive
        raise FormatError(exc.message, reason_code=exc.reason_code) from exc
