"""The coordinator's size limits come from the protocol's one limits table and cannot exceed it."""

from __future__ import annotations

import pytest

from coordinator.config import ServerLimits, load_config
from protocols.errors import ConfigError
from protocols.limits import DEFAULT_LIMITS


def test_server_limits_default_to_the_protocol_table():
    limits = ServerLimits()
    assert limits.max_envelope_bytes == DEFAULT_LIMITS.max_envelope_bytes
    assert limits.max_diff_bytes == DEFAULT_LIMITS.max_diff_bytes


@pytest.mark.parametrize("name", ["max_envelope_bytes", "max_diff_bytes"])
def test_limit_above_the_protocol_is_refused(tmp_path, name):
    (tmp_path / "coordinator.yaml").write_text(
        f"origin: test.example/log\nlimits:\n  {name}: {getattr(DEFAULT_LIMITS, name) + 1}\n",
        encoding="utf-8",
    )
    with pytest.raises(ConfigError, match=f"limits.{name}.*protocol's limit"):
        load_config(tmp_path)
