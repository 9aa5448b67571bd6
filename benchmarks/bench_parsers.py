"""Strict parsers on crafted worst-case inputs: seconds per parse, by parser, family and size.

    python benchmarks/bench_parsers.py [--repeat 3] [--out benchmarks/results/parsers_crafted.json]

Every family of ``tests/protocols/_crafted.py`` (escaped quotes in an unterminated string, a
bracket bomb, a long escaped string, many keys) goes into every strict parser at 64 KiB, 1 MiB
and the parser's maximum allowed size; the crafted ``SubmitUpdate`` envelope of the issue is the
``envelope`` / ``escaped_quotes`` row. It prints the best of ``--repeat`` runs and the answer
(the typed error's reason code, or ``parsed``).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--out", default=str(ROOT / "benchmarks/results/parsers_crafted.json"))
    args = ap.parse_args(argv)

    from protocols.errors import ScarchesFLError
    from tests.protocols._crafted import FAMILIES, crafted_json, parsers

    rows = []
    for name, (call, cap) in sorted(parsers().items()):
        sizes = sorted({s for s in (64 * 1024, 1024 * 1024) if s <= cap()} | {cap()})
        for family in sorted(FAMILIES):
            for size in sizes:
                data = crafted_json(family, size)
                best, answer = float("inf"), "parsed"
                for _ in range(args.repeat):
                    t0 = time.perf_counter()
                    try:
                        call(data)
                        answer = "parsed"
                    except ScarchesFLError as exc:
                        answer = exc.reason_code or type(exc).__name__
                    best = min(best, time.perf_counter() - t0)
                rows.append(
                    {
                        "parser": name,
                        "family": family,
                        "bytes": len(data),
                        "seconds": best,
                        "answer": answer,
                    }
                )
                print(f"{name:<19} {family:<15} {len(data):>9} B  {best * 1000:9.2f} ms  {answer}")
    worst = max(rows, key=lambda r: r["seconds"] / max(r["bytes"], 1))
    print(
        f"slowest per byte: {worst['parser']} / {worst['family']}: "
        f"{worst['seconds'] / worst['bytes'] * 1e9:.1f} ns/byte"
    )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps(
            {
                "benchmark": "parsers_crafted",
                "repeat": args.repeat,
                "python": platform.python_version(),
                "machine": platform.machine(),
                "rows": rows,
            },
            indent=1,
        )
        + "\n"
    )
    print(f"saved {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
