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


def import_scvi_quietly() -> Any:
    """``scvi`` with its and Lightning's warnings and progress logging silenced first."""
    import logging
    import warnings

    warnings.simplefilter("ignore")
    logging.getLogger("lightning").setLevel(logging.ERROR)
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    import scvi

    return scvi


def scvi_epoch_timer() -> Any:
    """A Lightning callback that records each training epoch's wall time in ``.times``."""
    from lightning.pytorch.callbacks import Callback

    class EpochTimer(Callback):
        def __init__(self) -> None:
            self.times: list[float] = []
            self._t = 0.0

        def on_train_epoch_start(self, trainer: Any, pl_module: Any) -> None:
            self._t = time.perf_counter()

        def on_train_epoch_end(self, trainer: Any, pl_module: Any) -> None:
            self.times.append(time.perf_counter() - self._t)

    return EpochTimer()
