"""scarches_fl: the science. Conditional VAEs for scRNA-seq counts, architecture surgery,
condition-only fine-tuning, label transfer and metrics. No networking, no keys.

The Python API (:mod:`scarches_fl.api`)::

    ref = scarches_fl.Reference.load("bundle")
    ref.map(query, batch_key="batch", label_key="cell_type")
    scarches_fl.evaluate(query, batch_key="batch", label_key="cell_type")

``Reference`` and ``evaluate`` are imported on first use, so ``import scarches_fl`` stays cheap
and works in the auditor's base install (no torch, no anndata); using them needs the ``model``
extra.
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version
from typing import TYPE_CHECKING, Any

try:
    __version__ = version("scarches-fl")
except PackageNotFoundError:  # running from a source tree without an install
    __version__ = "0.0.0+source"

if TYPE_CHECKING:
    from scarches_fl.api import Reference, evaluate

__all__ = ["Reference", "__version__", "evaluate"]

_LAZY = {"Reference": "scarches_fl.api", "evaluate": "scarches_fl.api"}


def __getattr__(name: str) -> Any:
    module_name = _LAZY.get(name)
    if module_name is None:
        raise AttributeError(f"module 'scarches_fl' has no attribute {name!r}")
    import importlib

    try:
        value = getattr(importlib.import_module(module_name), name)
    except ModuleNotFoundError as exc:
        from scarches_fl._extras import OWN_PACKAGES, MissingExtraError, extra_for_module

        top = (exc.name or "").partition(".")[0]
        if top in OWN_PACKAGES:
            raise
        extra = extra_for_module(top) or "model"
        raise MissingExtraError(
            f"scarches_fl.{name} needs the module {top!r}, which this install lacks; install "
            f"the '{extra}' extra: in the scarches-fl source tree "
            f"`pip install -c constraints.txt '.[{extra}]'`"
        ) from exc
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
