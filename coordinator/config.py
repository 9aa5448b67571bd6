"""The coordinator's configuration: ``coordinator.yaml`` in the state directory.

``coordinator init`` writes it with every field spelled out; ``serve`` loads and validates it
before it opens anything, and every mistake is a :class:`~protocols.errors.ConfigError` naming
the file and the field (``coordinator.yaml: limits.max_diff_bytes: must be a positive
integer``). Unknown fields are errors too (a typo must not silently fall back to a default).
Paths are relative to the state directory unless absolute.

The limits a site update must respect (largest value, L2 norm per condition, conditions per
update) are not here: they are part of the trust policy pinned in ``trust.json`` (so sites and
auditors apply the same ones) and are set at init.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from protocols.errors import ConfigError
from protocols.limits import DEFAULT_LIMITS
from protocols.settings import StatePaths, build, read_yaml_mapping

__all__ = [
    "CONFIG_FILENAME",
    "CoordinatorConfig",
    "ServerLimits",
    "RateLimitConfig",
    "StatePaths",
    "TLSConfig",
    "load_config",
    "write_config",
    "parse_listen",
]

logger = logging.getLogger(__name__)

CONFIG_FILENAME = "coordinator.yaml"
_MiB = 1024 * 1024


@dataclass(frozen=True)
class ServerLimits:
    """Every size and time the server accepts, in one place."""

    #: one gRPC message received or sent (the submission: envelope + diff + framing)
    max_message_bytes: int = 20 * _MiB
    #: a site update's DSSE envelope (default and ceiling: the protocol's limits table,
    #: :data:`protocols.limits.DEFAULT_LIMITS`; an operator may only lower it)
    max_envelope_bytes: int = DEFAULT_LIMITS.max_envelope_bytes
    #: a site update's diff.safetensors (the same)
    max_diff_bytes: int = DEFAULT_LIMITS.max_diff_bytes
    #: bytes per streamed chunk of a blob or reference
    chunk_bytes: int = 1 * _MiB
    #: entries per GetEntries page
    max_entries_per_page: int = 256
    #: a witness's cosigned note
    max_note_bytes: int = 64 * 1024
    #: longest time a unary request may hold a worker, seconds
    request_deadline_s: float = 30.0
    #: gRPC worker threads
    max_workers: int = 16
    #: concurrent RPCs before the server answers RESOURCE_EXHAUSTED
    max_concurrent_rpcs: int = 256
    #: conditions the reference may hold in all (genesis and rounds included); an update over
    #: it is refused with E_CONDITION_CAP. Memory and serving cost grow with it.
    max_conditions_per_reference: int = 50_000
    #: conditions one site namespace may hold; an update over it is refused with E_CONDITION_CAP
    max_conditions_per_site: int = 5_000


@dataclass(frozen=True)
class RateLimitConfig:
    """Per-site token bucket for submissions: ``burst`` at once, ``per_second`` sustained."""

    enabled: bool = True
    burst: int = 60
    per_second: float = 30.0


@dataclass(frozen=True)
class TLSConfig:
    certificate: str = "tls/server.crt"
    private_key: str = "tls/server.key"


@dataclass(frozen=True)
class CoordinatorConfig:
    origin: str
    listen: str = "127.0.0.1:7443"
    durable: bool = True
    tls: TLSConfig = field(default_factory=TLSConfig)
    paths: StatePaths = field(default_factory=StatePaths)
    limits: ServerLimits = field(default_factory=ServerLimits)
    rate_limit: RateLimitConfig = field(default_factory=RateLimitConfig)
    #: write a snapshot of the replayed state after this many new entries, or half the size of
    #: the last snapshot if that is more (and at shutdown)
    snapshot_every: int = 2000
    #: where it was loaded from (not written)
    state_dir: Path = field(default=Path("."), compare=False)

    def path(self, rel: str) -> Path:
        p = Path(rel)
        return p if p.is_absolute() else self.state_dir / p

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out.pop("state_dir")
        return out


def parse_listen(value: str, *, where: str = "listen") -> tuple[str, int]:
    """``HOST:PORT`` (``[::1]:PORT`` for IPv6) -> (host, port)."""
    if not isinstance(value, str) or ":" not in value:
        raise ConfigError(f"{where}: expected HOST:PORT (e.g. 127.0.0.1:7443), got {value!r}")
    if value.startswith("["):
        host, _, port_s = value[1:].partition("]:")
    else:
        host, _, port_s = value.rpartition(":")
    try:
        port = int(port_s)
    except ValueError:
        port = -1
    if not host or not 0 <= port <= 65535:
        raise ConfigError(f"{where}: expected HOST:PORT with a port 0-65535, got {value!r}")
    return host, port


def load_config(state_dir: str | os.PathLike[str]) -> CoordinatorConfig:
    """Load and validate ``STATE/coordinator.yaml``."""
    state_dir = Path(state_dir)
    file = state_dir / CONFIG_FILENAME
    if not file.is_file():
        raise ConfigError(
            f"{file}: not found; is {state_dir} a coordinator state directory? Create one with "
            "`scarches-fl coordinator init --dir STATE --reference BUNDLE_DIR`"
        )
    data = read_yaml_mapping(file)
    cfg = build(CoordinatorConfig, data, source=str(file), skip=frozenset({"state_dir"}))
    cfg = dataclasses.replace(cfg, state_dir=state_dir)
    parse_listen(cfg.listen, where=f"{file}: listen")
    for name in ("max_envelope_bytes", "max_diff_bytes"):
        ceiling = getattr(DEFAULT_LIMITS, name)
        if getattr(cfg.limits, name) > ceiling:
            raise ConfigError(
                f"{file}: limits.{name}: {getattr(cfg.limits, name)} is above the protocol's "
                f"limit of {ceiling} bytes (protocols/limits.py), which every site and auditor "
                "enforces; lower it"
            )
    if cfg.limits.max_message_bytes < cfg.limits.max_envelope_bytes + cfg.limits.max_diff_bytes:
        raise ConfigError(
            f"{file}: limits.max_message_bytes: must be at least max_envelope_bytes + "
            f"max_diff_bytes ({cfg.limits.max_envelope_bytes + cfg.limits.max_diff_bytes}), so "
            "that an oversize diff is answered with a reason code instead of a transport error"
        )
    if cfg.limits.max_conditions_per_site > cfg.limits.max_conditions_per_reference:
        raise ConfigError(
            f"{file}: limits.max_conditions_per_site: {cfg.limits.max_conditions_per_site} is "
            f"above limits.max_conditions_per_reference ({cfg.limits.max_conditions_per_reference}); "
            "lower it or raise the per-reference cap"
        )
    return cfg


def write_config(cfg: CoordinatorConfig) -> Path:
    """Write ``STATE/coordinator.yaml`` atomically (used by ``init``)."""
    import yaml

    from protocols.bundle import atomic_write

    header = (
        "# scarches-fl coordinator configuration (written by `scarches-fl coordinator init`).\n"
        "# Paths are relative to this directory. Every field is validated at start.\n"
    )
    body = yaml.safe_dump(cfg.to_dict(), sort_keys=False, default_flow_style=False)
    path = cfg.state_dir / CONFIG_FILENAME
    atomic_write(path, (header + body).encode())
    return path
