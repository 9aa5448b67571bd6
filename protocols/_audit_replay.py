"""Replaying condition diffs onto a reference in linear time, with content digests on demand.

Applying ``N`` diffs one after another with :func:`protocols.diff.apply_condition_diff` copies
every condition tensor on every step: quadratic in the number of updates. An audit instead keeps
each condition tensor in a growable buffer laid out condition-major (the condition axis moved to
the front), so an append copies only the new slice, and it materialises a tensor in its declared
layout only when a version's digest must be checked.

The digest is content digest (:func:`protocols.bundle.content_digest`) computed from the
same leaves (:func:`protocols.bundle.tensor_leaf`, :func:`protocols.bundle.manifest_leaf`), with
the leaf hash of every frozen tensor computed once: between versions only the condition tensors
and the manifest change. :meth:`ModelReplay.bundle` rebuilds the full bundle with
:func:`protocols.bundle.make_bundle` for the versions that are checked in full (the served one).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from protocols import merkle
from protocols.bundle import ReferenceBundle, make_bundle, manifest_leaf, tensor_leaf
from protocols.canonical import canonical_json

_MARK = "\u0001scarches-fl-audit:{}\u0001"

__all__ = ["ModelReplay"]


class _GrowBuffer:
    """Condition-major storage of one condition tensor: ``data[:n]`` has shape
    ``(n, *other_dims)``; appending is amortised O(slice)."""

    def __init__(self, arr: np.ndarray, axis: int) -> None:
        self.axis = axis
        front = np.moveaxis(arr, axis, 0)
        self.n = front.shape[0]
        cap = max(16, 2 * self.n)
        self.data = np.empty((cap, *front.shape[1:]), dtype=arr.dtype)
        self.data[: self.n] = front

    def append(self, piece: np.ndarray) -> None:
        front = np.moveaxis(piece, self.axis, 0)
        m = front.shape[0]
        if self.n + m > self.data.shape[0]:
            cap = max(2 * self.data.shape[0], self.n + m)
            grown = np.empty((cap, *self.data.shape[1:]), dtype=self.data.dtype)
            grown[: self.n] = self.data[: self.n]
            self.data = grown
        self.data[self.n : self.n + m] = front
        self.n += m

    def tensor(self) -> np.ndarray:
        """The tensor in its declared layout (a C-contiguous copy)."""
        return np.ascontiguousarray(np.moveaxis(self.data[: self.n], 0, self.axis))


def _sorted_names(names: Any) -> list[str]:
    return sorted(names, key=lambda n: n.encode("utf-8"))


class ModelReplay:
    """The reference model as the ledger builds it, version by version."""

    def __init__(self, genesis: ReferenceBundle) -> None:
        self.reset(genesis)

    def reset(self, bundle: ReferenceBundle) -> None:
        """Start over from ``bundle`` (the genesis, or a federated round's aggregate)."""
        manifest = {k: v for k, v in bundle.manifest.items() if k != "digest"}
        self._manifest = manifest
        self._specs = {n: dict(s) for n, s in manifest["tensors"].items()}
        self.conditions: list[str] = list(manifest["conditions"])
        self.condition_set = set(self.conditions)
        self._frozen: dict[str, np.ndarray] = {}
        self._frozen_leaf: dict[str, bytes] = {}
        self._cond: dict[str, _GrowBuffer] = {}
        for name, spec in self._specs.items():
            arr = bundle.tensors[name]
            if spec.get("role") == "condition":
                self._cond[name] = _GrowBuffer(arr, int(spec["axis"]))
            else:
                self._frozen[name] = arr
                self._frozen_leaf[name] = merkle.leaf_hash(tensor_leaf(name, arr))
        self._names = _sorted_names(self._specs)
        self._cond_json = [canonical_json(c) for c in self.conditions]
        self._skeleton = self._manifest_skeleton()
        self._digest_cache: tuple[int, str] | None = (len(self.conditions), bundle.digest)

    def _manifest_skeleton(self) -> tuple[bytes, bytes, dict[str, bytes]] | None:
        """(tag + encoded manifest with markers, encoded condition-list marker, encoded shape
        markers) or None when a marker would be ambiguous (then the whole manifest is encoded)."""
        skel = dict(self._manifest)
        skel["conditions"] = [_MARK.format("conditions")]
        specs = {}
        shape_marks: dict[str, bytes] = {}
        for name, spec in self._specs.items():
            s = dict(spec)
            if name in self._cond:
                shape = list(s["shape"])
                mark = _MARK.format("shape:" + name)
                shape[int(s["axis"])] = mark
                s["shape"] = shape
                shape_marks[name] = canonical_json(mark)
            specs[name] = s
        skel["tensors"] = specs
        tag = manifest_leaf({})[: -len(b"{}")]
        body = manifest_leaf(skel)[len(tag) :]
        cond_mark = b"[" + canonical_json(_MARK.format("conditions")) + b"]"
        for m in (cond_mark, *shape_marks.values()):
            if body.count(m) != 1:
                return None
        return tag + body, cond_mark, shape_marks

    def manifest_leaf(self) -> bytes:
        """:func:`protocols.bundle.manifest_leaf` of the current version."""
        if self._skeleton is None:
            return manifest_leaf(self.manifest())
        leaf, cond_mark, shape_marks = self._skeleton
        leaf = leaf.replace(cond_mark, b"[" + b",".join(self._cond_json) + b"]")
        for name, mark in shape_marks.items():
            leaf = leaf.replace(mark, str(self._cond[name].n).encode("ascii"))
        return leaf

    @property
    def base_manifest(self) -> Mapping[str, Any]:
        """The manifest of the bundle this replay started from (no copy): its tensor roles,
        axes, dtypes and dimensions other than the condition axis are those of every version
        (what :func:`protocols.update.validate_update` reads besides the condition names)."""
        return self._manifest

    def manifest(self) -> dict[str, Any]:
        """The current version's manifest, without ``digest``."""
        specs = {}
        for name, spec in self._specs.items():
            s = dict(spec)
            if name in self._cond:
                shape = list(s["shape"])
                shape[int(s["axis"])] = self._cond[name].n
                s["shape"] = shape
            specs[name] = s
        out = dict(self._manifest)
        out["conditions"] = list(self.conditions)
        out["tensors"] = specs
        return out

    def apply(self, diff: Mapping[str, np.ndarray], new_conditions: Sequence[str]) -> None:
        """Append one site's condition slices (already checked against the base)."""
        for name, buf in self._cond.items():
            buf.append(np.asarray(diff[name]))
        self.conditions.extend(new_conditions)
        self.condition_set.update(new_conditions)
        self._cond_json.extend(canonical_json(c) for c in new_conditions)
        self._digest_cache = None

    def digest(self) -> str:
        """The content digest of the current version (same definition as
        :func:`protocols.bundle.content_digest`)."""
        key = len(self.conditions)
        if self._digest_cache is not None and self._digest_cache[0] == key:
            return self._digest_cache[1]
        leaves: list[bytes] = []
        for name in self._names:
            if name in self._cond:
                leaves.append(merkle.leaf_hash(tensor_leaf(name, self._cond[name].tensor())))
            else:
                leaves.append(self._frozen_leaf[name])
        leaves.append(merkle.leaf_hash(self.manifest_leaf()))
        digest = "sha256:" + merkle.root(leaves).hex()
        self._digest_cache = (key, digest)
        return digest

    def tensors(self) -> dict[str, np.ndarray]:
        out = dict(self._frozen)
        for name, buf in self._cond.items():
            out[name] = buf.tensor()
        return out

    def bundle(self) -> ReferenceBundle:
        """The current version as a validated bundle (full check of the fast digest)."""
        return make_bundle(self.manifest(), self.tensors())
