"""Benchmark: time and peak memory of a full offline audit, replay included, by ledger size.

For each size (default 100, 1,000 and 10,000 site updates) a coordinator state directory is
generated with ``benchmarks/gen_ledger.py`` (kept in ``--workdir`` and reused), then audited in
a fresh process exactly as ``scarches-fl audit --ledger DIR --trust DIR/trust.json`` would, with
an empty auditor state. Each child reports its wall time, CPU time, peak resident memory and the
engine's own stage timings. The machine's load average is recorded too: on a shared machine wall
time includes waiting for a core, CPU time does not.

Usage::

    python benchmarks/bench_audit.py [--sizes 100,1000,10000] [--workdir DIR] [--out FILE]

Results: ``benchmarks/results/audit_offline.json`` (printed as a table too).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

_CHILD = r"""
import json, resource, sys, time
t0 = time.perf_counter(); c0 = time.process_time()
from protocols._audit_sources import StateDirSource
from protocols.audit import load_trust_file, run_audit
state_dir, aud = sys.argv[1], sys.argv[2]
src = StateDirSource(state_dir)
res = run_audit(src, load_trust_file(state_dir + "/trust.json"), state_dir=aud)
src.close()
print(json.dumps({
    "exit_code": res.exit_code,
    "entries": res.tree_size,
    "wall_s": time.perf_counter() - t0,
    "cpu_s": time.process_time() - c0,
    "engine_s": res.seconds,
    "timings": res.timings,
    "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    "torch_loaded": "torch" in sys.modules,
}))
"""


def _ensure_ledger(workdir: Path, n: int) -> Path:
    from benchmarks.gen_ledger import build_ledger

    d = workdir / f"ledger-{n}"
    if (d / "ledger.sqlite").is_file() and (d / "DONE").is_file():
        return d
    if d.exists():
        shutil.rmtree(d)
    t = time.perf_counter()
    g = build_ledger(d, n_updates=n)
    (d / "DONE").write_text(json.dumps({"entries": g.size, "seconds": g.seconds}))
    print(f"generated {n} updates ({g.size} entries) in {time.perf_counter() - t:.1f} s", file=sys.stderr)
    return d


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="100,1000,10000")
    ap.add_argument("--workdir", default=str(Path(tempfile.gettempdir()) / "scarches-fl-bench-audit"))
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "audit_offline.json"))
    ap.add_argument(
        "--repeat", type=int, default=1, help="audits per size (mean, min and max are reported)"
    )
    args = ap.parse_args(argv)
    sys.path.insert(0, str(REPO))
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    rows = []
    for n in [int(s) for s in args.sizes.split(",")]:
        ledger = _ensure_ledger(workdir, n)
        runs = []
        for _ in range(args.repeat):
            aud = Path(tempfile.mkdtemp(prefix="aud-", dir=workdir))
            load_before = os.getloadavg()[0]
            proc = subprocess.run(
                [sys.executable, "-c", _CHILD, str(ledger), str(aud)],
                cwd=REPO, capture_output=True, text=True, timeout=3600,
                env=dict(os.environ, PYTHONPATH=str(REPO)),
            )
            shutil.rmtree(aud, ignore_errors=True)
            if proc.returncode != 0:
                print(proc.stderr, file=sys.stderr)
                return 1
            row = json.loads(proc.stdout.strip().splitlines()[-1])
            row["updates"] = n
            row["load_avg_1m_before"] = load_before
            row["load_avg_1m_after"] = os.getloadavg()[0]
            if row["exit_code"] != 0:
                print(f"audit of {ledger} did not verify: {row}", file=sys.stderr)
                return 1
            runs.append(row)
        summary = {"updates": n, "entries": runs[0]["entries"], "runs": runs}
        for key in ("wall_s", "cpu_s", "peak_rss_mib", "load_avg_1m_before"):
            vals = [r[key] for r in runs]
            summary[key] = {"mean": sum(vals) / len(vals), "min": min(vals), "max": max(vals)}
        rows.append(summary)

        def fmt(key: str, unit: str, summary: dict = summary) -> str:
            v = summary[key]
            return f"{v['mean']:.2f} [{v['min']:.2f}-{v['max']:.2f}]{unit}"

        print(
            f"{n:>6} updates ({summary['entries']:>6} entries), {len(runs)} run(s), mean [min-max]: "
            f"wall {fmt('wall_s', ' s')}, cpu {fmt('cpu_s', ' s')}, peak RSS "
            f"{fmt('peak_rss_mib', ' MiB')}, load {fmt('load_avg_1m_before', '')}"
        )
    result = {
        "benchmark": "audit_offline",
        "description": "full offline audit (checkpoint, Merkle root, every signature under the "
        "policy in force, every blob, replay from genesis with the digest of every stated base "
        "version, served model rebuilt and compared) of gen_ledger.py ledgers: 10 sites, one "
        "new condition per update, bases advancing every 50 entries, hidden 128, 200 genes",
        "target": "10,000 updates in under 10 s (issue 16)",
        "machine": {"python": platform.python_version(), "cpus": os.cpu_count(),
                    "platform": platform.platform()},
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "rows": rows,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"results: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
