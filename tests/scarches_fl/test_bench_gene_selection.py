"""The gene-selection speed benchmark's schedule and summary (``bench_gene_selection.py``):
sizes interleaved over rounds, warm-up epochs dropped, medians per size and the all / N ratio
taken within each round."""

from __future__ import annotations

import pytest

from benchmarks.bench_gene_selection import parse_sizes, schedule, summarize, table


def test_sizes_interleave_over_rounds():
    sizes = parse_sizes("2000, all,4000")
    assert sizes == [2000, None, 4000]
    assert schedule(sizes, 2) == [(0, 2000), (0, None), (0, 4000), (1, 2000), (1, None), (1, 4000)]


@pytest.mark.parametrize("text", ["", "2000,2000", "abc", "0"])
def test_bad_sizes_are_refused(text):
    with pytest.raises(SystemExit, match="--sizes"):
        parse_sizes(text)


def _run(rnd: int, size: str, cpu: list[float], wall: list[float]) -> dict:
    return {"round": rnd, "size": size, "epoch_cpu_seconds": cpu, "epoch_seconds": wall}


def test_summary_drops_warmup_takes_medians_and_pairs_rounds():
    runs = [
        # the first epoch of every run is the warm-up: large, and must not count
        _run(0, "2000", [9.0, 0.1, 0.1, 0.3], [9.0, 0.2, 0.2, 0.2]),
        _run(0, "all", [9.0, 1.2, 1.0, 1.0], [9.0, 3.0, 3.0, 3.0]),
        _run(1, "2000", [9.0, 0.2, 0.2, 0.2], [9.0, 0.5, 0.5, 0.5]),
        _run(1, "all", [9.0, 2.0, 2.0, 2.0], [9.0, 1.0, 1.0, 1.0]),
    ]
    s = summarize(runs, warmup=1)
    small = s["sizes"]["2000"]["cpu_seconds_per_epoch"]
    assert small["values"] == pytest.approx([0.1, 0.2])
    assert (small["min"], small["max"]) == pytest.approx((0.1, 0.2))
    assert s["sizes"]["all"]["runs"] == 2
    ratio = s["ratio_all_over"]["2000"]
    # within a round: 1.0 / 0.1 and 2.0 / 0.2 in CPU; 3.0 / 0.2 and 1.0 / 0.5 in wall
    assert ratio["cpu"]["values"] == pytest.approx([10.0, 10.0])
    assert ratio["wall"]["values"] == pytest.approx([15.0, 2.0])
    assert ratio["wall"]["mean"] == pytest.approx(8.5)
    assert "all / 2000: CPU 10.0x [10.0-10.0x]" in table(s)
    with pytest.raises(ValueError, match="kept no epoch"):
        summarize(runs, warmup=4)
