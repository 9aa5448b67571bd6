"""Configuration files: one reader and one validator for every YAML file the tools read.

The coordinator's ``coordinator.yaml``, a site's ``site.yaml`` and the auditor's reading of a
coordinator state directory all go through this module, so a file is read and checked the same
way everywhere:

1. :func:`read_yaml_mapping`: at most ``max_bytes``, UTF-8, parsed with ``yaml.safe_load`` (never
   a full loader), the top level a mapping (an empty file is an empty mapping). A YAML error
   names its line and column.
2. :func:`build`: a mapping becomes a frozen dataclass. A field the dataclass lacks is refused,
   naming the known fields; a field without a default is required; every value passes its
   field's check before anything is built.
3. A field's check is ``dataclasses.field(metadata={"check": fn})`` when given, otherwise it
   follows the annotation: ``bool`` true/false, ``int`` a positive whole number, ``float`` a
   positive number, ``str`` a non-empty string, a dataclass a nested mapping (rules 2-3
   recursively). A null value means "not set": the field's default (None for ``X | None``).
4. Every error is a :class:`~protocols.errors.ConfigError` that says
   ``<file>: <dotted.field>: <what is expected>, got <value>``.

Also here, because the coordinator writes it and the auditor reads it: the layout of a
coordinator state directory (:class:`StatePaths`).

I/O is limited to reading the one file named; nothing is written.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from protocols.errors import ConfigError

__all__ = [
    "Check",
    "StatePaths",
    "build",
    "read_yaml_mapping",
    "check_number",
    "check_integer",
    "check_text",
    "check_address",
    "check_path",
]

T = TypeVar("T")

#: ``check(value, where, base)``: the value to keep, or ConfigError. ``where`` is
#: ``"<file>: <dotted.field>"``; ``base`` is the folder relative paths in the file are read from.
Check = Callable[[Any, str, "Path | None"], Any]

#: Largest configuration file read (a configuration is a few hundred bytes).
MAX_CONFIG_BYTES = 256 * 1024


def _bad(where: str, what: str, value: Any) -> ConfigError:
    return ConfigError(f"{where}: {what}, got {value!r}")


def read_yaml_mapping(path: Path, *, max_bytes: int = MAX_CONFIG_BYTES) -> dict[str, Any]:
    """The file's top-level mapping (rule 1). A missing or unreadable file raises
    :class:`ConfigError` naming it; callers add how to create one."""
    import yaml

    try:
        with open(path, "rb") as fh:
            data = fh.read(max_bytes + 1)
    except FileNotFoundError as exc:
        raise ConfigError(f"{path}: not found") from exc
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror or exc}") from exc
    if len(data) > max_bytes:
        raise ConfigError(f"{path}: the file is larger than {max_bytes} bytes")
    try:
        doc = yaml.safe_load(data.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text; save the file as UTF-8") from exc
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        raise ConfigError(f"{path}: not valid YAML{at}: {getattr(exc, 'problem', exc)}") from exc
    if doc is None:
        return {}
    if not isinstance(doc, dict):
        raise ConfigError(
            f"{path}: top level: expected a mapping of fields (name: value), got "
            f"{type(doc).__name__}"
        )
    return doc


# -- checks -------------------------------------------------------------------------------------


def check_number(lo: float, hi: float) -> Check:
    """A number in ``[lo, hi]`` (not a boolean)."""

    def check(value: Any, where: str, base: Path | None) -> float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise _bad(where, f"must be a number in [{lo:g}, {hi:g}]", value)
        if not lo <= float(value) <= hi:
            raise _bad(where, f"must be a number in [{lo:g}, {hi:g}]", value)
        return float(value)

    return check


def check_integer(lo: int, hi: int) -> Check:
    """A whole number in ``[lo, hi]`` (not a boolean)."""

    def check(value: Any, where: str, base: Path | None) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
            raise _bad(where, f"must be a whole number in [{lo}, {hi}]", value)
        return int(value)

    return check


def check_text(value: Any, where: str, base: Path | None) -> str:
    """A non-empty string, surrounding whitespace removed."""
    if not isinstance(value, str) or not value.strip():
        raise _bad(where, "must be a non-empty string", value)
    return value.strip()


def check_address(value: Any, where: str, base: Path | None) -> str:
    """``HOST:PORT`` with a port in 1-65535 (``[::1]:PORT`` for IPv6)."""
    text = check_text(value, where, base)
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise _bad(where, "must be HOST:PORT (e.g. coordinator.example.org:7443)", value)
    return text


def check_path(value: Any, where: str, base: Path | None) -> Path:
    """A path; a relative one in a file is relative to the file's folder."""
    p = Path(check_text(value, where, base)).expanduser()
    if base is not None and not p.is_absolute():
        p = base / p
    return p


def _check_bool(value: Any, where: str, base: Path | None) -> bool:
    if not isinstance(value, bool):
        raise _bad(where, "must be true or false", value)
    return value


def _check_positive_int(value: Any, where: str, base: Path | None) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise _bad(where, "must be a positive integer", value)
    return value


def _check_positive_float(value: Any, where: str, base: Path | None) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
        raise _bad(where, "must be a positive number", value)
    return float(value)


def _check_nonempty_str(value: Any, where: str, base: Path | None) -> str:
    if not isinstance(value, str) or not value.strip():
        raise _bad(where, "must be a non-empty string", value)
    return value


_BY_TYPE: dict[Any, Check] = {
    bool: _check_bool,
    int: _check_positive_int,
    float: _check_positive_float,
    str: _check_nonempty_str,
}


def _unwrap_optional(tp: Any) -> tuple[Any, bool]:
    if isinstance(tp, types.UnionType) or typing.get_origin(tp) is typing.Union:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1 and len(typing.get_args(tp)) == 2:
            return args[0], True
    return tp, False


def build(
    cls: type[T],
    data: Any,
    *,
    source: str,
    prefix: str = "",
    base: Path | None = None,
    skip: frozenset[str] = frozenset(),
) -> T:
    """``cls`` from the mapping ``data`` (rules 2-4). ``source`` names the file in errors,
    ``prefix`` the dotted path of ``data`` inside it; fields in ``skip`` are never read from the
    file (they are set by the caller)."""
    where_top = f"{source}: {prefix.rstrip('.') or 'top level'}"
    if not isinstance(data, Mapping):
        raise ConfigError(f"{where_top}: expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.name not in skip}  # type: ignore[arg-type]
    unknown = sorted(str(k) for k in data if k not in fields)
    if unknown:
        raise ConfigError(
            f"{source}: {prefix}{unknown[0]}: unknown field (known: {', '.join(sorted(fields))})"
        )
    kwargs: dict[str, Any] = {}
    for name, f in fields.items():
        where = f"{source}: {prefix}{name}"
        if name not in data:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise ConfigError(f"{where}: required field is missing")
            continue
        value = data[name]
        tp, optional = _unwrap_optional(hints[name])
        if value is None:
            if not optional and f.default is dataclasses.MISSING and (
                f.default_factory is dataclasses.MISSING
            ):
                raise ConfigError(f"{where}: required field is missing (null)")
            continue
        check = f.metadata.get("check")
        if check is not None:
            kwargs[name] = check(value, where, base)
        elif dataclasses.is_dataclass(tp) and isinstance(tp, type):
            kwargs[name] = build(tp, value, source=source, prefix=f"{prefix}{name}.", base=base)
        elif tp in _BY_TYPE:
            kwargs[name] = _BY_TYPE[tp](value, where, base)
        else:
            raise TypeError(f"{cls.__name__}.{name}: no check for {tp!r}; give metadata['check']")
    return cls(**kwargs)


@dataclass(frozen=True)
class StatePaths:
    """Where a coordinator keeps its files, relative to its state directory unless absolute
    (``paths:`` in ``coordinator.yaml``). The auditor's offline source reads the same layout."""

    database: str = "ledger.sqlite"
    blobs: str = "blobs"
    cache: str = "cache"
    log_key: str = "keys/log.key"
    operator_key: str = "keys/operator.key"
    trust: str = "trust.json"
    #: the replayed ledger state, so that a restart replays only the entries since
    snapshot: str = "snapshot"

    def resolve(self, state_dir: Path) -> dict[str, Path]:
        """Every path, made absolute against ``state_dir``."""
        out: dict[str, Path] = {}
        for f in dataclasses.fields(self):
            p = Path(getattr(self, f.name))
            out[f.name] = p if p.is_absolute() else state_dir / p
        return out
