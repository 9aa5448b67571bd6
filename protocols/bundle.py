"""Model bundles: a manifest plus tensors, their content digest, and a strict safetensors reader.

A bundle on disk is a directory holding ``manifest.json`` (canonical JSON) and
``model.safetensors``. Its identity is the **content digest** (``docs/adr/0002-digest.md``)::

    tensor leaf  = b"scarches-fl.tensor.v1\\x00" || uint64_be(len(H)) || H || raw
                   H   = canonical_json({"dtype": <numpy dtype name>, "name": <name>, "shape": [...]})
                   raw = the tensor's elements, C order, little-endian
    manifest leaf = b"scarches-fl.manifest.v1\\x00" || canonical_json(manifest without "digest")
    digest = "sha256:" || hex( MTH( [tensor leaves sorted by name (UTF-8 bytes)] + [manifest leaf] ) )

with MTH the RFC 6962 Merkle tree hash (leaf = SHA-256(0x00||d), node = SHA-256(0x01||l||r)).
The safetensors file bytes are never the identity: their header order is not stable.

Rules enforced by :func:`validate_manifest` (and so by :func:`make_bundle`, :func:`read_bundle`,
:func:`bundle_from_bytes`):

* ``format == BUNDLE_FORMAT``, ``format_version == BUNDLE_FORMAT_VERSION``; ``model_class`` a
  non-empty string; ``hyperparameters``, ``registration``, ``labels`` objects; ``genes`` a list of
  unique non-empty strings; ``conditions`` a list of unique condition names
  (:data:`CONDITION_NAME_RE`).
* ``tensors`` names exactly the tensors present (names match :data:`TENSOR_NAME_RE`), each with
  ``role`` ``frozen`` or ``condition``, ``dtype`` in :data:`ALLOWED_DTYPES` and ``shape`` equal to
  the array's; a ``condition`` tensor has an integer ``axis`` in range with
  ``shape[axis] == len(conditions)``.
* ``digest``, when present and ``verify`` is on, equals :func:`content_digest`.

:func:`parse_safetensors_header` checks a safetensors file before the ``safetensors`` library sees
it: header length at most the limit and inside the file, strict JSON object, every entry's dtype
allowed, shape a list of at most ``max_ndim`` non-negative ints, offsets whose length equals
``prod(shape) * itemsize``, entries contiguous from 0 to the end of the file with no gap or overlap,
at most ``max_tensors`` entries, ``__metadata__`` (if any) a string-to-string object.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import struct
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from protocols.canonical import canonical_json, parse_json_strict
from protocols.errors import (
    BundleError,
    CanonicalJSONError,
    DigestMismatchError,
    FormatError,
    OversizeError,
    SafetensorsFormatError,
)
from protocols.limits import DEFAULT_LIMITS, Limits

__all__ = [
    "BUNDLE_FORMAT",
    "BUNDLE_FORMAT_VERSION",
    "MANIFEST_FILE",
    "MODEL_FILE",
    "ALLOWED_DTYPES",
    "TENSOR_NAME_RE",
    "CONDITION_NAME_RE",
    "NAMESPACE_RE",
    "BATCH_RE",
    "ReferenceBundle",
    "SafetensorsEntry",
    "content_digest",
    "tensor_leaf",
    "tensor_leaf_hash",
    "tensor_leaf_header",
    "manifest_leaf",
    "make_bundle",
    "validate_manifest",
    "write_bundle",
    "read_bundle",
    "bundle_from_bytes",
    "bundle_to_bytes",
    "parse_safetensors_header",
    "safetensors_to_bytes",
    "safetensors_from_bytes",
    "sha256_hex",
    "atomic_write",
]

logger = logging.getLogger(__name__)

BUNDLE_FORMAT = "scarches-fl.bundle"
BUNDLE_FORMAT_VERSION = 1
MANIFEST_FILE = "manifest.json"
MODEL_FILE = "model.safetensors"

#: safetensors dtype code -> numpy dtype name (the manifest uses the numpy name)
_ST_TO_NP: dict[str, str] = {
    "F16": "float16",
    "F32": "float32",
    "F64": "float64",
    "I8": "int8",
    "I16": "int16",
    "I32": "int32",
    "I64": "int64",
    "U8": "uint8",
    "BOOL": "bool",
}
ALLOWED_DTYPES: frozenset[str] = frozenset(_ST_TO_NP.values())

TENSOR_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:/-]{0,255}")
NAMESPACE_RE = re.compile(r"[a-z0-9][a-z0-9._-]{0,63}")
BATCH_RE = re.compile(r"[A-Za-z0-9._+-]{1,128}")
CONDITION_NAME_RE = re.compile(f"({NAMESPACE_RE.pattern})/({BATCH_RE.pattern})")

_TENSOR_LEAF_TAG = b"scarches-fl.tensor.v1\x00"
_MANIFEST_LEAF_TAG = b"scarches-fl.manifest.v1\x00"
_REQUIRED_FIELDS = (
    "format",
    "format_version",
    "model_class",
    "hyperparameters",
    "genes",
    "conditions",
    "tensors",
    "registration",
    "labels",
)
_OPTIONAL_FIELDS = ("digest",)


def sha256_hex(data: bytes) -> str:
    """Lowercase hex SHA-256 of ``data``."""
    return hashlib.sha256(data).hexdigest()


# --------------------------------------------------------------------------------------------
# Merkle hashing: protocols.merkle (RFC 6962)


def _mth(leaf_data: list[bytes]) -> bytes:
    from protocols import merkle

    return merkle.root([merkle.leaf_hash(d) for d in leaf_data])


# --------------------------------------------------------------------------------------------
# Tensors


def _normalize_array(name: str, arr: Any) -> np.ndarray:
    if not isinstance(arr, np.ndarray):
        raise BundleError(
            f"tensor {name!r} is a {type(arr).__name__}, not a numpy array; convert it with "
            "numpy.asarray (torch: tensor.detach().cpu().numpy())"
        )
    dt = arr.dtype
    if dt.name not in ALLOWED_DTYPES:
        raise BundleError(
            f"tensor {name!r} has dtype {dt}; allowed: {sorted(ALLOWED_DTYPES)}",
            reason_code="E_DTYPE_NOT_ALLOWED",
        )
    le = dt.newbyteorder("<") if dt.byteorder not in ("|", "<") else dt
    out = np.ascontiguousarray(arr, dtype=le)
    if out is arr:
        out = arr.copy()
    out.flags.writeable = False
    return out


def tensor_leaf(name: str, arr: np.ndarray) -> bytes:
    """The digest leaf data of one tensor (module docstring)."""
    header = canonical_json({"dtype": arr.dtype.name, "name": name, "shape": list(arr.shape)})
    le = arr.dtype.newbyteorder("<") if arr.dtype.byteorder not in ("|", "<") else arr.dtype
    raw = np.ascontiguousarray(arr, dtype=le).tobytes(order="C")
    return _TENSOR_LEAF_TAG + struct.pack(">Q", len(header)) + header + raw


def tensor_leaf_header(header: bytes) -> bytes:
    """The bytes of a tensor leaf before the tensor's data, for its canonical JSON ``header``."""
    return _TENSOR_LEAF_TAG + struct.pack(">Q", len(header)) + header


def tensor_leaf_hash(name: str, arr: np.ndarray) -> bytes:
    """``merkle.leaf_hash(tensor_leaf(name, arr))``, with the tensor's bytes streamed into the
    hash instead of copied into one leaf (a version's digest hashes every condition tensor)."""
    header = canonical_json({"dtype": arr.dtype.name, "name": name, "shape": list(arr.shape)})
    le = arr.dtype.newbyteorder("<") if arr.dtype.byteorder not in ("|", "<") else arr.dtype
    raw = np.ascontiguousarray(arr, dtype=le).reshape(-1).view(np.uint8)
    h = hashlib.sha256(b"\x00" + tensor_leaf_header(header))
    h.update(raw.data)
    return h.digest()


def manifest_leaf(manifest: Mapping[str, Any]) -> bytes:
    """The digest leaf data of a manifest (``digest`` field excluded)."""
    body = {k: v for k, v in manifest.items() if k != "digest"}
    return _MANIFEST_LEAF_TAG + canonical_json(body)


def content_digest(manifest: Mapping[str, Any], tensors: Mapping[str, np.ndarray]) -> str:
    """``"sha256:<hex>"``: the RFC 6962 root over tensor leaves (sorted by name) and the manifest
    leaf. Ignores ``manifest["digest"]``; does not validate (see :func:`make_bundle`)."""
    try:
        leaves = [
            tensor_leaf(name, np.asarray(tensors[name]))
            for name in sorted(tensors, key=lambda n: n.encode("utf-8"))
        ]
        leaves.append(manifest_leaf(manifest))
    except CanonicalJSONError as exc:
        raise BundleError(f"manifest cannot be canonically encoded: {exc.message}") from exc
    return "sha256:" + _mth(leaves).hex()


# --------------------------------------------------------------------------------------------
# Manifest


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def validate_manifest(manifest: Mapping[str, Any], tensors: Mapping[str, np.ndarray]) -> None:
    """Check ``manifest`` against the rules of the module docstring and against ``tensors``
    (names, dtypes, shapes). Raises :class:`BundleError` naming the field and the fix."""
    if not isinstance(manifest, Mapping):
        raise BundleError("manifest is not a JSON object")
    missing = [f for f in _REQUIRED_FIELDS if f not in manifest]
    if missing:
        raise BundleError(f"manifest lacks the field(s) {missing}; rebuild the bundle")
    extra = sorted(set(manifest) - set(_REQUIRED_FIELDS) - set(_OPTIONAL_FIELDS))
    if extra:
        raise BundleError(f"manifest has unknown field(s) {extra}; remove them")
    if manifest["format"] != BUNDLE_FORMAT:
        raise BundleError(
            f"manifest format is {manifest['format']!r}, expected {BUNDLE_FORMAT!r}"
        )
    if manifest["format_version"] != BUNDLE_FORMAT_VERSION or not _is_int(
        manifest["format_version"]
    ):
        raise BundleError(
            f"bundle format_version {manifest['format_version']!r} is not supported (this "
            f"library reads version {BUNDLE_FORMAT_VERSION}); upgrade scarches-fl"
        )
    if not isinstance(manifest["model_class"], str) or not manifest["model_class"]:
        raise BundleError("manifest model_class must be a non-empty string")
    for f in ("hyperparameters", "registration", "labels"):
        if not isinstance(manifest[f], Mapping):
            raise BundleError(f"manifest field {f!r} must be a JSON object")
    genes = manifest["genes"]
    if not isinstance(genes, list | tuple) or not all(isinstance(g, str) and g for g in genes):
        raise BundleError("manifest genes must be a list of non-empty strings")
    if len(set(genes)) != len(genes):
        raise BundleError("manifest genes has duplicates; make gene names unique")
    conditions = manifest["conditions"]
    if not isinstance(conditions, list | tuple):
        raise BundleError("manifest conditions must be a list of strings")
    for c in conditions:
        if not isinstance(c, str) or not CONDITION_NAME_RE.fullmatch(c):
            raise BundleError(
                f"condition name {c!r} is not '<namespace>/<batch>' (namespace "
                f"{NAMESPACE_RE.pattern}, batch {BATCH_RE.pattern})",
                reason_code="E_CONDITION_NAME",
            )
    if len(set(conditions)) != len(conditions):
        raise BundleError("manifest conditions has duplicates", reason_code="E_CONDITION_EXISTS")
    specs = manifest["tensors"]
    if not isinstance(specs, Mapping):
        raise BundleError("manifest tensors must be an object {name: spec}")
    if set(specs) != set(tensors):
        only_m = sorted(set(specs) - set(tensors))
        only_t = sorted(set(tensors) - set(specs))
        raise BundleError(
            f"manifest and tensors disagree: in manifest only {only_m[:5]}, in the safetensors "
            f"file only {only_t[:5]}; the bundle is corrupt or mixed from two models"
        )
    for name in sorted(specs):
        spec = specs[name]
        if not isinstance(name, str) or not TENSOR_NAME_RE.fullmatch(name):
            raise BundleError(f"tensor name {name!r} is not allowed ({TENSOR_NAME_RE.pattern})")
        if not isinstance(spec, Mapping):
            raise BundleError(f"manifest tensors[{name!r}] must be an object")
        role = spec.get("role")
        allowed_keys = {"role", "dtype", "shape"} | ({"axis"} if role == "condition" else set())
        if set(spec) != allowed_keys:
            raise BundleError(
                f"manifest tensors[{name!r}] has fields {sorted(spec)}, expected "
                f"{sorted(allowed_keys)}"
            )
        if role not in ("frozen", "condition"):
            raise BundleError(f"tensor {name!r} role {role!r} must be 'frozen' or 'condition'")
        arr = tensors[name]
        dtype = spec.get("dtype")
        if dtype not in ALLOWED_DTYPES:
            raise BundleError(
                f"tensor {name!r} dtype {dtype!r} is not allowed ({sorted(ALLOWED_DTYPES)})",
                reason_code="E_DTYPE_NOT_ALLOWED",
            )
        if np.asarray(arr).dtype.name != dtype:
            raise BundleError(
                f"tensor {name!r} is {np.asarray(arr).dtype.name} but the manifest says {dtype}"
            )
        shape = spec.get("shape")
        if not isinstance(shape, list | tuple) or not all(_is_int(d) and d >= 0 for d in shape):
            raise BundleError(f"tensor {name!r} shape {shape!r} must be a list of ints >= 0")
        if tuple(shape) != tuple(np.asarray(arr).shape):
            raise BundleError(
                f"tensor {name!r} has shape {tuple(np.asarray(arr).shape)} but the manifest "
                f"says {tuple(shape)}"
            )
        if role == "condition":
            axis = spec.get("axis")
            if not isinstance(axis, int) or isinstance(axis, bool) or not 0 <= axis < len(shape):
                raise BundleError(f"condition tensor {name!r} axis {axis!r} is out of range")
            if shape[axis] != len(conditions):
                raise BundleError(
                    f"condition tensor {name!r} has {shape[axis]} entries along axis {axis} but "
                    f"the manifest lists {len(conditions)} conditions"
                )


# --------------------------------------------------------------------------------------------
# Bundles


@dataclass(frozen=True)
class ReferenceBundle:
    """A validated model: ``manifest`` (including ``digest``) and read-only ``tensors``.

    Build one with :func:`make_bundle`, :func:`read_bundle` or :func:`bundle_from_bytes`; the
    constructor itself does not validate."""

    manifest: dict[str, Any]
    tensors: dict[str, np.ndarray] = field(repr=False)

    @property
    def digest(self) -> str:
        return str(self.manifest["digest"])

    @property
    def conditions(self) -> list[str]:
        return list(self.manifest["conditions"])

    @property
    def genes(self) -> list[str]:
        return list(self.manifest["genes"])

    def __repr__(self) -> str:
        return (
            f"ReferenceBundle(digest={self.manifest.get('digest')!r}, "
            f"genes={len(self.manifest.get('genes', []))}, "
            f"conditions={len(self.manifest.get('conditions', []))}, tensors={len(self.tensors)})"
        )


def _normalize_manifest(manifest: Mapping[str, Any]) -> dict[str, Any]:
    """A deep, JSON-normalized copy (tuples -> lists, numpy scalars -> numbers, 1.0 -> 1)."""
    try:
        data = canonical_json(manifest)
        out = parse_json_strict(data, max_bytes=max(len(data), 1), what="manifest")
    except CanonicalJSONError as exc:
        raise BundleError(f"manifest is not encodable as canonical JSON: {exc.message}") from exc
    if not isinstance(out, dict):
        raise BundleError("manifest is not a JSON object")
    return out


def _build(
    manifest: Mapping[str, Any], tensors: Mapping[str, Any], *, verify_digest: bool
) -> ReferenceBundle:
    if not isinstance(tensors, Mapping):
        raise BundleError("tensors must be a mapping {name: numpy array}")
    arrays = {str(k): _normalize_array(str(k), v) for k, v in tensors.items()}
    norm = _normalize_manifest(manifest)
    validate_manifest(norm, arrays)
    digest = content_digest(norm, arrays)
    if verify_digest:
        claimed = norm.get("digest")
        if claimed != digest:
            raise DigestMismatchError(
                f"bundle digest mismatch: the manifest says {claimed!r}, the contents hash to "
                f"{digest}; the bundle was modified or corrupted after it was written"
            )
    norm["digest"] = digest
    return ReferenceBundle(manifest=norm, tensors=arrays)


def make_bundle(manifest: Mapping[str, Any], tensors: Mapping[str, np.ndarray]) -> ReferenceBundle:
    """Validate ``manifest`` against ``tensors`` and fill in ``digest`` (any given one is
    replaced). Arrays are copied to read-only little-endian C-contiguous arrays."""
    return _build(manifest, tensors, verify_digest=False)


# --------------------------------------------------------------------------------------------
# safetensors, strictly


@dataclass(frozen=True)
class SafetensorsEntry:
    name: str
    dtype: str  # numpy dtype name
    shape: tuple[int, ...]
    begin: int
    end: int


def parse_safetensors_header(
    data: bytes, *, limits: Limits = DEFAULT_LIMITS, what: str = "safetensors file"
) -> tuple[dict[str, SafetensorsEntry], dict[str, str]]:
    """Check a safetensors file's header and layout (module docstring) without touching tensor
    data. Returns ``(entries by name, metadata)``; raises :class:`SafetensorsFormatError`."""
    if len(data) < 8:
        raise SafetensorsFormatError(f"{what} is {len(data)} bytes, too short for a header")
    (n,) = struct.unpack("<Q", bytes(data[:8]))
    if n > limits.max_safetensors_header_bytes:
        raise SafetensorsFormatError(
            f"{what} header length {n} exceeds the limit {limits.max_safetensors_header_bytes}",
            reason_code="E_SAFETENSORS_HEADER_OVERSIZE",
        )
    if 8 + n > len(data):
        raise SafetensorsFormatError(
            f"{what} header length {n} runs past the end of the file ({len(data)} bytes); the "
            "file is truncated"
        )
    try:
        header = parse_json_strict(
            bytes(data[8 : 8 + n]),
            max_bytes=limits.max_safetensors_header_bytes,
            max_depth=4,
            what=f"{what} header",
        )
    except CanonicalJSONError as exc:
        raise SafetensorsFormatError(exc.message) from exc
    if not isinstance(header, dict):
        raise SafetensorsFormatError(f"{what} header is not a JSON object")
    metadata: dict[str, str] = {}
    if "__metadata__" in header:
        meta = header.pop("__metadata__")
        if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
            raise SafetensorsFormatError(f"{what} __metadata__ must map strings to strings")
        metadata = dict(meta)
    if len(header) > limits.max_tensors:
        raise SafetensorsFormatError(
            f"{what} holds {len(header)} tensors, over the limit {limits.max_tensors}"
        )
    data_len = len(data) - 8 - n
    entries: dict[str, SafetensorsEntry] = {}
    for name, info in header.items():
        if not TENSOR_NAME_RE.fullmatch(name):
            raise SafetensorsFormatError(
                f"{what}: tensor name {name[:80]!r} is not allowed ({TENSOR_NAME_RE.pattern})"
            )
        if not isinstance(info, dict) or set(info) != {"dtype", "shape", "data_offsets"}:
            raise SafetensorsFormatError(
                f"{what}: tensor {name!r} must have exactly dtype, shape, data_offsets"
            )
        st_dtype = info["dtype"]
        if not isinstance(st_dtype, str) or st_dtype not in _ST_TO_NP:
            raise SafetensorsFormatError(
                f"{what}: tensor {name!r} dtype {st_dtype!r} is not allowed "
                f"({sorted(_ST_TO_NP)})",
                reason_code="E_DTYPE_NOT_ALLOWED",
            )
        shape = info["shape"]
        if (
            not isinstance(shape, list)
            or len(shape) > limits.max_ndim
            or not all(_is_int(d) and 0 <= d <= limits.max_dim for d in shape)
        ):
            raise SafetensorsFormatError(
                f"{what}: tensor {name!r} shape {str(shape)[:80]} must be at most "
                f"{limits.max_ndim} ints in [0, {limits.max_dim}]"
            )
        offs = info["data_offsets"]
        if (
            not isinstance(offs, list)
            or len(offs) != 2
            or not all(_is_int(o) for o in offs)
            or not 0 <= offs[0] <= offs[1] <= data_len
        ):
            raise SafetensorsFormatError(
                f"{what}: tensor {name!r} data_offsets {str(offs)[:80]} are not within the "
                f"{data_len} data bytes"
            )
        np_name = _ST_TO_NP[st_dtype]
        count = 1
        for d in shape:
            count *= d
        if count * np.dtype(np_name).itemsize != offs[1] - offs[0]:
            raise SafetensorsFormatError(
                f"{what}: tensor {name!r} shape {shape} x {np_name} does not match its "
                f"{offs[1] - offs[0]} data bytes"
            )
        entries[name] = SafetensorsEntry(name, np_name, tuple(shape), offs[0], offs[1])
    pos = 0
    for e in sorted(entries.values(), key=lambda e: (e.begin, e.end)):
        if e.begin != pos:
            raise SafetensorsFormatError(
                f"{what}: tensor data is not contiguous at byte {pos} (gap or overlap)"
            )
        pos = e.end
    if pos != data_len:
        raise SafetensorsFormatError(
            f"{what}: {data_len - pos} trailing bytes after the last tensor"
        )
    return entries, metadata


def safetensors_from_bytes(
    data: bytes, *, max_bytes: int, limits: Limits = DEFAULT_LIMITS, what: str = "safetensors file"
) -> dict[str, np.ndarray]:
    """Strictly check, then load, a safetensors file into read-only numpy arrays."""
    if not isinstance(data, bytes | bytearray | memoryview):
        raise SafetensorsFormatError(f"{what}: expected bytes, got {type(data).__name__}")
    if len(data) > max_bytes:
        raise OversizeError(f"{what} is {len(data)} bytes, over the limit of {max_bytes}")
    data = bytes(data)
    entries, _ = parse_safetensors_header(data, limits=limits, what=what)
    # The header check proved every tensor's bytes lie inside the data section, in order, with no
    # gap, overlap or trailing byte, and hold exactly shape x itemsize bytes: each tensor is a
    # read-only little-endian view of ``data`` (no second parse, no copy).
    start = 8 + struct.unpack("<Q", data[:8])[0]
    out: dict[str, np.ndarray] = {}
    for name, e in entries.items():
        dt = np.dtype(e.dtype)
        dt = dt.newbyteorder("<") if dt.byteorder not in ("|", "<") else dt
        if e.end == e.begin:
            arr = np.empty(e.shape, dtype=dt)
            arr.flags.writeable = False
        else:
            count = (e.end - e.begin) // dt.itemsize
            arr = np.frombuffer(data, dtype=dt, count=count, offset=start + e.begin)
            arr = arr.reshape(e.shape)
        out[name] = arr
    return out


def safetensors_to_bytes(tensors: Mapping[str, np.ndarray]) -> bytes:
    """Serialize tensors (names sorted) with ``safetensors.numpy.save``."""
    from safetensors.numpy import save

    arrays: dict[str, np.ndarray] = {}
    for name in sorted(tensors):
        if not isinstance(name, str) or not TENSOR_NAME_RE.fullmatch(name):
            raise BundleError(f"tensor name {name!r} is not allowed ({TENSOR_NAME_RE.pattern})")
        arrays[name] = np.array(_normalize_array(name, tensors[name]), copy=True)
    try:
        return bytes(save(arrays))
    except Exception as exc:  # pragma: no cover - inputs are normalized above
        raise BundleError(f"could not serialize tensors: {exc}") from exc


def bundle_from_bytes(
    manifest_bytes: bytes,
    safetensors_bytes: bytes,
    *,
    verify: bool = True,
    limits: Limits = DEFAULT_LIMITS,
) -> ReferenceBundle:
    """A bundle from its two files' bytes. With ``verify`` the manifest's digest must match the
    contents (:class:`DigestMismatchError` otherwise). Without it, the claimed digest is ignored
    and the returned bundle carries the digest its contents hash to (compare it yourself). Every
    other check (strict parsing, manifest vs tensors) always runs. Pure: no I/O."""
    try:
        manifest = parse_json_strict(
            manifest_bytes,
            max_bytes=limits.max_manifest_bytes,
            max_depth=limits.max_json_depth,
            what=MANIFEST_FILE,
        )
    except FormatError as exc:
        raise BundleError(
            f"{exc.message}; the bundle is corrupt -- fetch or export it again",
            reason_code=exc.reason_code,
        ) from exc
    if not isinstance(manifest, dict):
        raise BundleError(f"{MANIFEST_FILE} is not a JSON object")
    try:
        tensors = safetensors_from_bytes(
            safetensors_bytes, max_bytes=limits.max_model_bytes, limits=limits, what=MODEL_FILE
        )
    except FormatError as exc:
        raise BundleError(
            f"{exc.message}; the bundle is corrupt -- fetch or export it again",
            reason_code=exc.reason_code,
        ) from exc
    if verify and "digest" not in manifest:
        raise DigestMismatchError(
            f"{MANIFEST_FILE} has no digest; a bundle must carry its content digest (re-export "
            "it with scarches-fl)"
        )
    return _build(manifest, tensors, verify_digest=verify)


def bundle_to_bytes(bundle: ReferenceBundle) -> tuple[bytes, bytes]:
    """``(manifest.json bytes, model.safetensors bytes)`` of a bundle."""
    return canonical_json(bundle.manifest), safetensors_to_bytes(bundle.tensors)


# --------------------------------------------------------------------------------------------
# Files


def atomic_write(
    path: str | os.PathLike[str], data: bytes, *, mode: int = 0o644, durable: bool = True
) -> None:
    """Write ``data`` to ``path`` atomically: temp file in the same directory, fsync, rename,
    fsync the directory. A crash leaves either the old file or the new one, never half.
    ``durable=False`` skips the fsyncs (still atomic, not crash-safe: caches and run records).
    The one implementation every package uses for files that must never be half-written."""
    path = Path(path)
    directory = path.parent
    directory.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=directory)
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            if durable:
                os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    if durable:
        fsync_dir(directory)


def fsync_dir(directory: str | os.PathLike[str]) -> None:
    """fsync a directory so that a rename inside it survives power loss."""
    try:
        dfd = os.open(directory, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(dfd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(dfd)



def write_bundle(path: str | os.PathLike[str], bundle: ReferenceBundle) -> None:
    """Write ``bundle`` as a directory (``model.safetensors`` then ``manifest.json``), each file
    atomically. The manifest is written last, so a reader never sees a manifest whose tensors
    are not there yet; :func:`read_bundle` verifies the digest anyway."""
    if not isinstance(bundle, ReferenceBundle):
        raise BundleError(f"write_bundle needs a ReferenceBundle, got {type(bundle).__name__}")
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise BundleError(f"cannot create bundle directory {path}: {exc.strerror}") from exc
    manifest_bytes, model_bytes = bundle_to_bytes(bundle)
    try:
        atomic_write(path / MODEL_FILE, model_bytes)
        atomic_write(path / MANIFEST_FILE, manifest_bytes)
    except OSError as exc:
        raise BundleError(f"cannot write bundle to {path}: {exc}") from exc
    logger.info("wrote bundle %s to %s", bundle.digest, path)


def _read_capped(file: Path, cap: int) -> bytes:
    try:
        with open(file, "rb") as fh:
            size = os.fstat(fh.fileno()).st_size
            if size > cap:
                raise BundleError(
                    f"{file} is {size} bytes, over the limit of {cap}", reason_code="E_OVERSIZE"
                )
            return fh.read(cap + 1)
    except FileNotFoundError as exc:
        raise BundleError(
            f"{file} does not exist; a bundle directory holds {MANIFEST_FILE} and {MODEL_FILE} "
            "(check the path, or export the model with `scarches-fl reference train --out DIR`)"
        ) from exc
    except IsADirectoryError as exc:
        raise BundleError(f"{file} is a directory, expected a file") from exc
    except OSError as exc:
        raise BundleError(f"cannot read {file}: {exc.strerror}") from exc


def read_bundle(
    path: str | os.PathLike[str], *, verify: bool = True, limits: Limits = DEFAULT_LIMITS
) -> ReferenceBundle:
    """Read a bundle directory; with ``verify`` (default) the digest must match the contents.
    Raises :class:`BundleError` (or :class:`DigestMismatchError`) with a fix hint."""
    path = Path(path)
    if not path.is_dir():
        raise BundleError(
            f"bundle path {path} is not a directory; pass the directory that holds "
            f"{MANIFEST_FILE} and {MODEL_FILE}"
        )
    manifest_bytes = _read_capped(path / MANIFEST_FILE, limits.max_manifest_bytes)
    model_bytes = _read_capped(path / MODEL_FILE, limits.max_model_bytes)
    try:
        return bundle_from_bytes(manifest_bytes, model_bytes, verify=verify, limits=limits)
    except DigestMismatchError as exc:
        raise DigestMismatchError(
            f"{path}: {exc.message}. Do not use or publish it: restore an unmodified copy, or "
            "write the bundle again where it was made (`scarches-fl reference train ... --out "
            "DIR`, `reference import-scvi`)",
            reason_code=exc.reason_code,
        ) from exc
    except BundleError as exc:
        raise type(exc)(f"{path}: {exc.message}", reason_code=exc.reason_code) from exc
