"""The site agent's configuration: a YAML file as an alternative to command-line flags.

A flag given on the command line wins over the same field in the file. Every field is checked
when the agent starts, and every error names the file and the field, e.g.::

    error: site.yaml: field 'thresholds.min_gene_coverage' must be a number in [0, 1], got 'high'

Fields (all optional in the file; the required ones must come from the file or a flag)::

    coordinator: 127.0.0.1:7443        # HOST:PORT of the registry (required)
    trust: /etc/site/trust.json        # the trust.json the operator handed out (required)
    key: /etc/site/site.key            # this site's private key (required)
    site_id: hospital-a                # this site's id, as enrolled (required)
    state: /var/lib/site               # state directory (required)
    insecure: false                    # plain-text gRPC, loopback development only
    data: /data/query.h5ad             # the query dataset
    batch_key: batch                   # obs column with the study / batch
    label_key: cell_type               # obs column name for predicted labels (optional)
    layer: counts                      # read counts from this layer instead of X
    batches: [celseq2, smartseq2]      # map only these batches
    out: /data/query_mapped.h5ad       # where the mapped dataset goes (stays at the site)
    timeout_s: 30                      # deadline of each registry call
    max_epochs: 100                    # ceiling on fine-tuning epochs (stops once converged)
    seed: 0
    thresholds:
      min_gene_coverage: 0.5           # refuse a query covering less of the reference genes
      label_uncertainty: 0.5           # cells above this are called "Unknown"
      min_cells_per_batch: 10          # refuse to contribute a batch with fewer cells
      max_value_abs: 1.0e4             # refuse an update holding larger weights
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from protocols.bundle import NAMESPACE_RE
from protocols.errors import ConfigError

__all__ = ["SiteConfig", "Thresholds", "load_config", "merge_flags"]

logger = logging.getLogger(__name__)

_BATCH_RE = re.compile(r"^[^,\s][^,]*$")
_MAX_CONFIG_BYTES = 256 * 1024


@dataclass(frozen=True)
class Thresholds:
    """Numbers a site admin may tune; the defaults fit small studies."""

    min_gene_coverage: float = 0.5
    label_uncertainty: float = 0.5
    min_cells_per_batch: int = 10
    max_value_abs: float = 1.0e4


@dataclass(frozen=True)
class SiteConfig:
    """Everything ``site map`` / ``site retry`` need, from a YAML file and flags."""

    coordinator: str | None = None
    trust: Path | None = None
    key: Path | None = None
    site_id: str | None = None
    state: Path | None = None
    insecure: bool = False
    data: Path | None = None
    batch_key: str | None = None
    label_key: str | None = None
    layer: str | None = None
    batches: tuple[str, ...] | None = None
    out: Path | None = None
    timeout_s: float = 30.0
    max_epochs: int | None = None
    seed: int = 0
    thresholds: Thresholds = field(default_factory=Thresholds)
    source: str = "command line"

    def require(self, *names: str) -> None:
        """Raise :class:`ConfigError` naming each required field that is still unset."""
        missing = [n for n in names if getattr(self, n) in (None, "")]
        if missing:
            flags = ", ".join("--" + n.replace("_", "-") for n in missing)
            raise ConfigError(
                f"missing {', '.join(missing)}: give {flags} on the command line or set "
                f"{'them' if len(missing) > 1 else 'it'} in the YAML file passed with --config"
            )


def _err(source: str, name: str, what: str, value: Any) -> ConfigError:
    return ConfigError(f"{source}: field {name!r} {what}, got {value!r}")


def _as_str(source: str, name: str, value: Any) -> str:
    if not isinstance(value, str) or not value.strip():
        raise _err(source, name, "must be a non-empty string", value)
    return value.strip()


def _as_path(source: str, name: str, value: Any, base: Path | None) -> Path:
    p = Path(_as_str(source, name, value)).expanduser()
    if base is not None and not p.is_absolute():
        p = base / p  # relative paths in a file are relative to the file
    return p


def _as_number(source: str, name: str, value: Any, lo: float, hi: float) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise _err(source, name, f"must be a number in [{lo:g}, {hi:g}]", value)
    if not lo <= float(value) <= hi:
        raise _err(source, name, f"must be a number in [{lo:g}, {hi:g}]", value)
    return float(value)


def _as_int(source: str, name: str, value: Any, lo: int, hi: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise _err(source, name, f"must be a whole number in [{lo}, {hi}]", value)
    return int(value)


def _as_address(source: str, name: str, value: Any) -> str:
    text = _as_str(source, name, value)
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise _err(source, name, "must be HOST:PORT (e.g. coordinator.example.org:7443)", value)
    return text


def _as_site_id(source: str, name: str, value: Any) -> str:
    text = _as_str(source, name, value)
    if not NAMESPACE_RE.fullmatch(text):  # a site id is its condition namespace
        raise _err(
            source, name,
            "must be 1-64 characters of a-z, 0-9, '.', '_', '-' starting with a letter or digit "
            "(the id the operator enrolled)", value,
        )
    return text


def _as_batches(source: str, name: str, value: Any) -> tuple[str, ...]:
    if isinstance(value, str):
        items = [v.strip() for v in value.split(",")]
    elif isinstance(value, list):
        items = [v if isinstance(v, str) else None for v in value]  # type: ignore[misc]
    else:
        raise _err(source, name, "must be a list of batch names (or a,b,c)", value)
    if not items or any(not isinstance(v, str) or not v or not _BATCH_RE.match(v) for v in items):
        raise _err(source, name, "must be a non-empty list of non-empty batch names", value)
    return tuple(dict.fromkeys(items))  # type: ignore[arg-type]


def _parse_thresholds(source: str, value: Any) -> Thresholds:
    if not isinstance(value, Mapping):
        raise _err(source, "thresholds", "must be a mapping", value)
    allowed = {f.name for f in fields(Thresholds)}
    unknown = sorted(set(value) - allowed)
    if unknown:
        raise ConfigError(
            f"{source}: unknown field 'thresholds.{unknown[0]}'; known fields: "
            f"{', '.join(sorted(allowed))}"
        )
    kw: dict[str, Any] = {}
    for k, v in value.items():
        name = f"thresholds.{k}"
        if k in ("min_gene_coverage", "label_uncertainty"):
            kw[k] = _as_number(source, name, v, 0.0, 1.0)
        elif k == "min_cells_per_batch":
            kw[k] = _as_int(source, name, v, 1, 10**9)
        elif k == "max_value_abs":
            kw[k] = _as_number(source, name, v, 1e-6, 1e30)
    return Thresholds(**kw)


def _parse_mapping(doc: Mapping[str, Any], source: str, base: Path | None) -> SiteConfig:
    allowed = {f.name for f in fields(SiteConfig)} - {"source"}
    kw: dict[str, Any] = {"source": source}
    for key, value in doc.items():
        if not isinstance(key, str) or key not in allowed:
            raise ConfigError(
                f"{source}: unknown field {key!r}; known fields: {', '.join(sorted(allowed))}"
            )
        if value is None:
            continue
        if key == "coordinator":
            kw[key] = _as_address(source, key, value)
        elif key in ("trust", "key", "state", "data", "out"):
            kw[key] = _as_path(source, key, value, base)
        elif key == "site_id":
            kw[key] = _as_site_id(source, key, value)
        elif key in ("batch_key", "label_key", "layer"):
            kw[key] = _as_str(source, key, value)
        elif key == "insecure":
            if not isinstance(value, bool):
                raise _err(source, key, "must be true or false", value)
            kw[key] = value
        elif key == "batches":
            kw[key] = _as_batches(source, key, value)
        elif key == "timeout_s":
            kw[key] = _as_number(source, key, value, 0.1, 3600.0)
        elif key == "max_epochs":
            kw[key] = _as_int(source, key, value, 1, 100_000)
        elif key == "seed":
            kw[key] = _as_int(source, key, value, 0, 2**32 - 1)
        elif key == "thresholds":
            kw[key] = _parse_thresholds(source, value)
    return SiteConfig(**kw)


def load_config(path: str | Path) -> SiteConfig:
    """Read and validate a site YAML file (``yaml.safe_load``; never a full loader)."""
    import yaml

    path = Path(path)
    source = str(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ConfigError(
            f"cannot read the configuration file {path}: {exc.strerror or exc}; check --config"
        ) from exc
    if len(data) > _MAX_CONFIG_BYTES:
        raise ConfigError(f"{source}: the file is larger than {_MAX_CONFIG_BYTES} bytes")
    try:
        doc = yaml.safe_load(data.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{source}: not UTF-8 text; save the file as UTF-8") from exc
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError(
            f"{source}: not valid YAML{where}: {getattr(exc, 'problem', exc)}"
        ) from exc
    if doc is None:
        doc = {}
    if not isinstance(doc, Mapping):
        raise ConfigError(
            f"{source}: the top level must be a mapping of fields (coordinator: ..., trust: ...), "
            f"got a {type(doc).__name__}"
        )
    return _parse_mapping(doc, source, path.parent)


def merge_flags(config: SiteConfig, flags: Mapping[str, Any]) -> SiteConfig:
    """Overlay command-line values (``None`` = not given) on ``config``, validating them."""
    src = "command line"
    updates: dict[str, Any] = {}
    for key, value in flags.items():
        if value is None or value is False:
            continue
        if key == "coordinator":
            updates[key] = _as_address(src, "--coordinator", value)
        elif key in ("trust", "key", "state", "data", "out"):
            updates[key] = Path(value).expanduser()
        elif key == "site_id":
            updates[key] = _as_site_id(src, "--site-id", value)
        elif key in ("batch_key", "label_key", "layer"):
            updates[key] = _as_str(src, "--" + key.replace("_", "-"), value)
        elif key == "insecure":
            updates[key] = True
        elif key == "batches":
            updates[key] = _as_batches(src, "--batches", value)
        elif key == "timeout_s":
            updates[key] = _as_number(src, "--timeout", value, 0.1, 3600.0)
        elif key == "max_epochs":
            updates[key] = _as_int(src, "--max-epochs", value, 1, 100_000)
        elif key == "seed":
            updates[key] = _as_int(src, "--seed", value, 0, 2**32 - 1)
        elif key in ("min_gene_coverage", "label_uncertainty"):
            updates.setdefault("_thresholds", {})[key] = _as_number(
                src, "--" + key.replace("_", "-"), value, 0.0, 1.0
            )
        else:  # pragma: no cover - a programming error in the CLI
            raise KeyError(key)
    th = updates.pop("_thresholds", None)
    if th:
        updates["thresholds"] = replace(config.thresholds, **th)
    return replace(config, **updates)
