"""Durable file writes for the coordinator: the one implementation lives in ``protocols.bundle``
(temp file in the same directory, fsync, rename, fsync the directory)."""

from __future__ import annotations

from protocols.bundle import atomic_write, fsync_dir

__all__ = ["atomic_write", "fsync_dir"]
