"""What every benchmark records beside its figures, and how it saves them."""

from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path
from typing import Any


def machine(load_before: float) -> dict[str, Any]:
    """The machine, and the other work on it during the run (the figures are only as quiet as
    the load average says)."""
    return {
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "loadavg_1m_before": round(load_before, 2),
        "loadavg_1m_after": round(os.getloadavg()[0], 2),
    }


def save(doc: dict[str, Any], out: Path) -> None:
    """Stamp ``doc`` with the date, write it as JSON to ``out`` and say where."""
    doc["date"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=2) + "\n")
    print(f"wrote {out}")
