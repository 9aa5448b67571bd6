"""The label benchmark's summary over seeds (``benchmarks/bench_labels.py --seeds``)."""

from __future__ import annotations

import pytest

from benchmarks.bench_labels import _summary_table, main, summarize


def _run(seed: int, auroc: float, acc: float) -> dict:
    return {
        "seed": seed,
        "methods": {
            "scarches_fl": {
                "run": {"reference_train_s": 1.0},
                "prototype": {
                    "novel_type": "alpha",
                    "novel_auroc": auroc,
                    "accuracy_top_label": acc,
                    "reference_train_s_not_a_metric": 3.0,
                },
                "integration": {"nmi": acc / 2, "k": 15},
            }
        },
    }


def test_summary_is_mean_min_max_of_the_seeds():
    runs = [_run(0, 0.8, 0.9), _run(1, 0.6, 0.7), _run(2, 0.7, 0.8)]
    s = summarize(runs)["scarches_fl"]
    auroc = s["prototype"]["novel_auroc"]
    assert auroc["values"] == [0.8, 0.6, 0.7]
    assert auroc["mean"] == pytest.approx(0.7)
    assert (auroc["min"], auroc["max"]) == (0.6, 0.8)
    assert s["prototype"]["accuracy_top_label"]["mean"] == pytest.approx(0.8)
    # strings and keys that are not label-transfer figures are left out; timings stay per run
    assert set(s["prototype"]) == {"novel_auroc", "accuracy_top_label"}
    assert "run" not in s
    assert s["integration"]["nmi"]["mean"] == pytest.approx(0.4)
    table = _summary_table("panc8_holdout_alpha", [0, 1, 2], summarize(runs))
    assert "0.700 [0.600-0.800]" in table


@pytest.mark.parametrize("seeds", ["0,0", "a,b", ","])
def test_bad_seed_lists_are_refused(seeds, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--scenario", "panc8", "--seeds", seeds])
    assert exc.value.code == 2
    assert "--seeds" in capsys.readouterr().err


def test_merge_combines_one_seed_files_into_the_five_seed_format(tmp_path, capsys):
    import json

    paths = []
    for seed, auroc in ((1, 0.6), (0, 0.8)):
        run = {"scenario": "panc8", "n_query_cells": 280, **_run(seed, auroc, 0.9)}
        path = tmp_path / f"s{seed}.json"
        path.write_text(json.dumps(run))
        paths.append(str(path))
    assert main(["--merge", *paths, "--out-dir", str(tmp_path / "out")]) == 0
    merged = json.loads((tmp_path / "out" / "labels_panc8.json").read_text())
    assert merged["seeds"] == [0, 1]
    assert [r["seed"] for r in merged["per_seed"]] == [0, 1]
    assert merged["n_query_cells"] == 280 and "methods" not in merged
    summary = merged["summary"]["scarches_fl"]["prototype"]
    assert summary["novel_auroc"]["mean"] == pytest.approx(0.7)
    assert "0.700 [0.600-0.800]" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="twice"):
        main(["--merge", paths[0], paths[0], "--out-dir", str(tmp_path / "out")])


def test_a_method_some_seeds_lack_is_summarised_over_the_seeds_that_have_it():
    # scvi-tools' methods run on seed 0 only (``--skip-scvi`` on the others)
    runs = [_run(0, 0.8, 0.9), _run(1, 0.6, 0.7), _run(2, 0.7, 0.8)]
    runs[0]["methods"]["scanvi_surgery"] = {"predict": {"accuracy_top_label": 0.95}}
    s = summarize(runs)
    assert s["scarches_fl"]["prototype"]["novel_auroc"]["seeds"] == [0, 1, 2]
    scanvi = s["scanvi_surgery"]["predict"]["accuracy_top_label"]
    assert scanvi["values"] == [0.95] and scanvi["seeds"] == [0]
    table = _summary_table("cellbench5", [0, 1, 2], s)
    assert "scanvi_surgery predict: seeds 0 only" in table
    assert "scarches_fl prototype: seeds" not in table
