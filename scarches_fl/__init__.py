"""scarches_fl: the science. Conditional VAEs for scRNA-seq counts, architecture surgery,
condition-only fine-tuning, label transfer and metrics. No networking, no keys.

Heavy modules (torch) are imported lazily so that ``import scarches_fl`` stays cheap.
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("scarches-fl")
except PackageNotFoundError:  # running from a source tree without an install
    __version__ = "0.0.0+source"

__all__ = ["__version__"]
