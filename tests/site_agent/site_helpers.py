"""Helpers shared by the site agent's tests (imported by conftest.py and the test modules)."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import threading
from typing import Any


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "scarches_fl_cli", *args]


def run_cli(*args: str, timeout: float = 300, check: bool = True) -> subprocess.CompletedProcess:
    env = dict(os.environ, FLWR_TELEMETRY_ENABLED="0")
    proc = subprocess.run(cli(*args), capture_output=True, text=True, timeout=timeout, env=env)
    if check and proc.returncode != 0:
        raise AssertionError(
            f"{' '.join(args[:3])} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
        )
    return proc


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])



class BarrierClient:
    """Wraps a RegistryClient so that ``submit_update`` waits until every party got there
    (two sites map on the same base before either contributes)."""

    def __init__(self, inner: Any, barrier: threading.Barrier) -> None:
        self._inner = inner
        self._barrier = barrier

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    def __enter__(self) -> BarrierClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self._inner.close()

    def submit_update(self, envelope: bytes, diff: bytes) -> Any:
        with contextlib.suppress(threading.BrokenBarrierError):
            self._barrier.wait(timeout=180)
        return self._inner.submit_update(envelope, diff)
