"""``python -m scarches_fl_cli ...``: the ``scarches-fl`` command without its console script."""

from __future__ import annotations

import sys

from scarches_fl_cli.main import main

if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
