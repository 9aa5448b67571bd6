"""The site agent's configuration: a YAML file as an alternative to command-line flags.

A flag given on the command line wins over the same field in the file. Every field is checked
when the agent starts, and every error names the file and the field, e.g.::

    error: site.yaml: thresholds.min_gene_coverage: must be a number in [0, 1], got 'high'

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
    label_method: auto                 # auto | expression | prototype | knn (ADR 0070)
    layer: counts                      # read counts from this layer instead of X
    batches: [celseq2, smartseq2]      # map only these batches
    out: /data/query_mapped.h5ad       # where the mapped dataset goes (stays at the site)
    contribute_labels: false           # also contribute per-type prototypes of label_key
                                       # (needs the site's own annotation in obs[label_key])
    label_epsilon_budget: 8.0          # refuse DP label contributions beyond this epsilon per
                                       # study (STATE/epsilon.json); unset: no budget
    label_dp_epsilon: 1.0              # use the Gaussian mechanism at this epsilon even where the
    label_dp_delta: 1.0e-5             # label policy does not require it (with delta and the
    label_dp_clip_norm: 10.0           # clip norm); a policy's requirement always applies
    genesis_labels_only: false         # predict with the reference's own labels, no contributions
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
from protocols.settings import (
    build,
    check_address,
    check_integer,
    check_number,
    check_path,
    check_text,
    read_yaml_mapping,
)

__all__ = ["SiteConfig", "Thresholds", "load_config", "merge_flags"]

logger = logging.getLogger(__name__)

_BATCH_RE = re.compile(r"^[^,\s][^,]*$")


def _check_site_id(value: Any, where: str, base: Path | None) -> str:
    text = check_text(value, where, base)
    if not NAMESPACE_RE.fullmatch(text):  # a site id is its condition namespace
        raise ConfigError(
            f"{where}: must be 1-64 characters of a-z, 0-9, '.', '_', '-' starting with a letter "
            f"or digit (the id the operator enrolled), got {value!r}"
        )
    return text


#: how labels are read (``scarches_fl.refine.LABEL_METHODS``; this module imports no numpy)
LABEL_METHODS = ("auto", "expression", "prototype", "knn")


def _check_label_method(value: Any, where: str, base: Path | None) -> str:
    if value not in LABEL_METHODS:
        raise ConfigError(f"{where}: must be one of {', '.join(LABEL_METHODS)}, got {value!r}")
    return str(value)


def _check_batches(value: Any, where: str, base: Path | None) -> tuple[str, ...]:
    if isinstance(value, str):
        items: list[Any] = [v.strip() for v in value.split(",")]
    elif isinstance(value, list):
        items = list(value)
    else:
        raise ConfigError(f"{where}: must be a list of batch names (or a,b,c), got {value!r}")
    if not items or any(not isinstance(v, str) or not v or not _BATCH_RE.match(v) for v in items):
        raise ConfigError(f"{where}: must be a non-empty list of non-empty batch names, got "
                          f"{value!r}")
    return tuple(dict.fromkeys(items))


def _checked(default: Any, check: Any, **meta: Any) -> Any:
    return field(default=default, metadata={"check": check, **meta})


@dataclass(frozen=True)
class Thresholds:
    """Numbers a site admin may tune; the defaults fit small studies."""

    min_gene_coverage: float = _checked(0.5, check_number(0.0, 1.0))
    label_uncertainty: float = _checked(0.5, check_number(0.0, 1.0))
    min_cells_per_batch: int = _checked(10, check_integer(1, 10**9))
    max_value_abs: float = _checked(1.0e4, check_number(1e-6, 1e30))


@dataclass(frozen=True)
class SiteConfig:
    """Everything ``site map`` / ``site retry`` need, from a YAML file and flags. Each field's
    check (``metadata["check"]``) applies to the file and to the flag alike."""

    coordinator: str | None = _checked(None, check_address)
    trust: Path | None = _checked(None, check_path)
    key: Path | None = _checked(None, check_path)
    site_id: str | None = _checked(None, _check_site_id)
    state: Path | None = _checked(None, check_path)
    insecure: bool = False
    data: Path | None = _checked(None, check_path)
    batch_key: str | None = _checked(None, check_text)
    label_key: str | None = _checked(None, check_text)
    label_method: str = _checked("auto", _check_label_method)
    layer: str | None = _checked(None, check_text)
    batches: tuple[str, ...] | None = _checked(None, _check_batches)
    out: Path | None = _checked(None, check_path)
    timeout_s: float = _checked(30.0, check_number(0.1, 3600.0), flag="--timeout")
    max_epochs: int | None = _checked(None, check_integer(1, 100_000))
    seed: int = _checked(0, check_integer(0, 2**32 - 1))
    contribute_labels: bool = False
    label_epsilon_budget: float | None = _checked(None, check_number(1e-6, 1e6))
    label_dp_epsilon: float | None = _checked(None, check_number(1e-6, 1e6))
    label_dp_delta: float | None = _checked(None, check_number(1e-300, 0.5))
    label_dp_clip_norm: float | None = _checked(None, check_number(1e-6, 1e6))
    genesis_labels_only: bool = False
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


def load_config(path: str | Path) -> SiteConfig:
    """Read and validate a site YAML file (:mod:`protocols.settings`: ``yaml.safe_load``, never a
    full loader; relative paths are relative to the file)."""
    path = Path(path)
    try:
        doc = read_yaml_mapping(path)
    except ConfigError as exc:
        raise ConfigError(f"{exc}; check --config") from exc
    cfg = build(SiteConfig, doc, source=str(path), base=path.parent, skip=frozenset({"source"}))
    return replace(cfg, source=str(path))


def merge_flags(config: SiteConfig, flags: Mapping[str, Any]) -> SiteConfig:
    """Overlay command-line values (``None`` = not given) on ``config``, validating them."""
    by_name = {f.name: f for f in fields(SiteConfig)}
    th_fields = {f.name: f for f in fields(Thresholds)}
    updates: dict[str, Any] = {}
    thresholds: dict[str, Any] = {}
    for key, value in flags.items():
        if value is None or value is False:
            continue
        f = by_name.get(key) or th_fields.get(key)
        if f is None or key in ("source", "thresholds"):  # pragma: no cover - a CLI bug
            raise KeyError(key)
        where = "command line: " + f.metadata.get("flag", "--" + key.replace("_", "-"))
        check = f.metadata.get("check")
        checked = True if key == "insecure" else check(value, where, None) if check else value
        (thresholds if key in th_fields else updates)[key] = checked
    if thresholds:
        updates["thresholds"] = replace(config.thresholds, **thresholds)
    return replace(config, **updates)
