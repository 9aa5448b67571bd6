"""``scarches-fl map`` is as careful as ``site map``: both run ``scarches_fl.query`` before any
training, and both write the same ``uns["scarches_fl"]`` record."""

from __future__ import annotations

import json
from pathlib import Path

import anndata as ad
import numpy as np
import pytest

from scarches_fl.model import ReferenceModel
from scarches_fl.query import MAPPING_RECORD_FIELDS
from scarches_fl_cli.main import main

LEDGER_FIELDS = {"tree_size", "checkpoint_root", "origin", "site_id"}


@pytest.fixture()
def no_training(monkeypatch):
    """Any training fails the test: a refusal must come before it."""

    def refuse(*_a, **_k):
        raise AssertionError("training started before the inputs were checked")

    monkeypatch.setattr(ReferenceModel, "surgery", refuse)
    monkeypatch.setattr(ReferenceModel, "train_reference", refuse)


def _map(reference_bundle, panc8, out, *extra):
    return main(
        [
            "-q",
            "map",
            "--reference",
            str(reference_bundle),
            "--data",
            str(panc8),
            "--batch-key",
            "batch",
            "--batches",
            "celseq2",
            "--max-epochs",
            "1",
            "--no-progress",
            "--out",
            str(out),
            *extra,
        ]
    )


def test_unknown_label_key_is_refused_before_fine_tuning(
    reference_bundle, panc8, tmp_path, no_training, capsys
):
    rc = _map(reference_bundle, panc8, tmp_path / "q.h5ad", "--label-key", "celltype")
    assert rc == 2
    err = capsys.readouterr().err
    assert "'celltype' is not a label level" in err and "cell_type" in err
    assert not (tmp_path / "q.h5ad").exists()


def test_per_cell_batch_key_is_refused_before_fine_tuning(
    reference_bundle, panc8, tmp_path, no_training, capsys
):
    full = ad.read_h5ad(panc8)
    q = full[:42].copy()
    q.obs["cell"] = [f"cell{i}" for i in range(42)]
    q.write_h5ad(tmp_path / "q.h5ad")
    rc = main(
        [
            "-q",
            "map",
            "--reference",
            str(reference_bundle),
            "--data",
            str(tmp_path / "q.h5ad"),
            "--batch-key",
            "cell",
            "--min-cells-per-batch",
            "1",
            "--out",
            str(tmp_path / "o.h5ad"),
        ]
    )
    assert rc == 2
    assert "42 distinct values for 42 cells" in capsys.readouterr().err


def test_existing_bundle_is_not_overwritten(reference_bundle, panc8, tmp_path, no_training, capsys):
    rc = main(
        [
            "-q",
            "reference",
            "train",
            "--data",
            str(panc8),
            "--batch-key",
            "batch",
            "--out",
            str(reference_bundle),
        ]
    )
    err = capsys.readouterr().err
    assert rc == 2 and "already exists" in err and "--force" in err


def test_map_creates_the_output_folder_refuses_overwrite_and_names_the_counts(
    reference_bundle, panc8, tmp_path, capsys
):
    out = tmp_path / "not" / "yet" / "q.h5ad"
    assert _map(reference_bundle, panc8, out, "--label-key", "cell_type") == 0
    assert "counts from X" in capsys.readouterr().out
    record = ad.read_h5ad(out).uns["scarches_fl"]
    assert record["counts"] == "X" and record["label_key"] == "cell_type"
    before = out.read_bytes()
    assert _map(reference_bundle, panc8, out) == 2
    assert "already exists" in capsys.readouterr().err
    assert out.read_bytes() == before


def test_map_and_site_map_write_the_same_record(reference_bundle, panc8, tmp_path):
    from site_agent.mapping import map_query, open_query, write_mapped

    cli_out = tmp_path / "cli.h5ad"
    assert _map(reference_bundle, panc8, cli_out, "--label-key", "cell_type") == 0
    model = ReferenceModel.from_bundle(reference_bundle)
    with open_query(panc8) as q:
        outcome = map_query(
            q,
            model,
            site_id="site-z",
            batch_key="batch",
            label_key="cell_type",
            layer=None,
            batches=["celseq2"],
            min_gene_coverage=0.5,
            label_threshold=0.5,
            min_cells_per_batch=10,
            max_epochs=1,
            seed=0,
        )
    site_out = tmp_path / "site.h5ad"
    write_mapped(
        outcome,
        site_out,
        provenance={
            "tree_size": 1,
            "checkpoint_root": "ab" * 32,
            "origin": "test",
            "site_id": "site-z",
        },
    )
    cli_rec = ad.read_h5ad(cli_out).uns["scarches_fl"]
    site_rec = ad.read_h5ad(site_out).uns["scarches_fl"]
    assert set(site_rec) == set(MAPPING_RECORD_FIELDS)
    assert set(cli_rec) == set(MAPPING_RECORD_FIELDS) - LEDGER_FIELDS
    for key in set(cli_rec) - {"model_digest", "namespace", "new_conditions"}:
        a, b = cli_rec[key], site_rec[key]
        if isinstance(a, dict):
            assert set(a) == set(b), key
        else:
            assert np.asarray(a).tolist() == np.asarray(b).tolist(), key
    assert Path(site_out).stat().st_size > 0


def test_evaluate_takes_the_bundled_file_as_reference_data(
    reference_bundle, panc8, tmp_path, capsys
):
    out = tmp_path / "q.h5ad"
    assert _map(reference_bundle, panc8, out, "--label-key", "cell_type") == 0
    rc = main(
        [
            "evaluate",
            "--data",
            str(out),
            "--batch-key",
            "batch",
            "--label-key",
            "cell_type",
            "--reference",
            str(reference_bundle),
            "--reference-data",
            str(panc8),
            "--embedding",
            "pca",
            "--report",
            str(tmp_path / "report"),
        ]
    )
    assert rc == 0, capsys.readouterr().err
    err = capsys.readouterr().err
    line = next(x for x in err.splitlines() if "left out, not reference studies" in x)
    assert "celseq2" in line and "smartseq2" in line and "720 of 1000" in line
    metrics = json.loads((tmp_path / "report" / "metrics.json").read_text())
    assert metrics["n_reference_cells"] == 720  # the six reference studies, not the query's
