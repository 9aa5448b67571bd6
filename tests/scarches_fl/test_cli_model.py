"""``scarches-fl reference train`` then ``scarches-fl map`` on panc8, through the real CLI."""

from __future__ import annotations

import json

import anndata as ad
import numpy as np
import pytest

from protocols.bundle import read_bundle
from protocols.diff import apply_condition_diff, diff_from_bytes
from scarches_fl_cli.main import main

DATA = "panc8_sub_nebula.h5ad"
REF = "indrop1,indrop2,indrop3,indrop4,celseq,fluidigmc1"


def test_reference_train_then_map(shared_data, tmp_path, capsys):
    data = str(shared_data / DATA)
    ref_dir = tmp_path / "ref"
    rc = main(["-q", "reference", "train", "--data", data, "--batch-key", "batch",
               "--label-key", "cell_type", "--batches", REF, "--max-epochs", "2",
               "--no-progress", "--out", str(ref_dir)])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "720 cells x 1000 genes" in printed and "digest sha256:" in printed
    base = read_bundle(ref_dir)

    out = tmp_path / "q.h5ad"
    upd = tmp_path / "update"
    rc = main(["-q", "map", "--reference", str(ref_dir), "--data", data, "--batch-key", "batch",
               "--batches", "celseq2,smartseq2", "--label-key", "cell_type", "--max-epochs", "2",
               "--no-progress", "--update-out", str(upd), "--out", str(out)])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "mapped 280 cells" in printed and "query/celseq2, query/smartseq2" in printed
    assert "512 trainable parameters" in printed and "update:" in printed

    q = ad.read_h5ad(out)
    assert q.n_obs == 280 and q.obsm["X_scarches"].shape == (280, 10)
    assert np.isfinite(q.obsm["X_scarches"]).all()
    info = q.uns["scarches_fl"]
    assert info["reference_digest"] == base.digest and info["mode"] == "conditions"
    assert float(info["gene_alignment"]["coverage"]) == 1.0 and info["counts"] == "X"
    assert "cell_type_pred" in q.obs and "cell_type_uncertainty" in q.obs
    u = q.obs["cell_type_uncertainty"].to_numpy()
    assert ((u >= 0) & (u <= 1)).all()

    meta = json.loads((upd / "update.json").read_text())
    assert meta["base_digest"] == base.digest
    assert meta["new_conditions"] == ["query/celseq2", "query/smartseq2"]
    assert set(meta["tensors"]) == {"encoder.layers.0.weight_s", "decoder.layers.0.weight_s"}
    raw = (upd / "diff.safetensors").read_bytes()
    assert meta["diff_bytes"] == len(raw)
    applied = apply_condition_diff(base, diff_from_bytes(raw, max_bytes=1 << 20),
                                   meta["new_conditions"])
    assert applied.digest == meta["model_digest"] == info["model_digest"]


def test_cli_errors_are_clear(shared_data, tmp_path, capsys):
    data = str(shared_data / DATA)
    rc = main(["reference", "train", "--data", data, "--batch-key", "donor", "--no-progress",
               "--out", str(tmp_path / "x")])
    assert rc == 2
    err = capsys.readouterr().err
    assert "error: batch key 'donor' not found" in err and "batch, technology" in err
    rc = main(["reference", "train", "--data", str(tmp_path / "missing.h5ad"), "--batch-key",
               "batch", "--out", str(tmp_path / "x")])
    assert rc == 2 and "not found" in capsys.readouterr().err


@pytest.mark.parametrize("mode", ["input_layers"])
def test_update_out_needs_conditions_mode(shared_data, tmp_path, capsys, mode):
    rc = main(["map", "--reference", str(tmp_path), "--data", str(shared_data / DATA),
               "--batch-key", "batch", "--mode", mode, "--update-out", str(tmp_path / "u"),
               "--out", str(tmp_path / "o.h5ad")])
    assert rc == 2 and "--update-out needs --mode conditions" in capsys.readouterr().err


def test_backed_input_and_trvae(shared_data, tmp_path, capsys):
    data = str(shared_data / "cellbench_3tech_hvg.h5ad")
    rc = main(["-q", "reference", "train", "--data", data, "--batch-key", "batch", "--backed",
               "--batches", "10x_3cl,CELseq2_3cl", "--likelihood", "trvae", "--max-epochs", "1",
               "--no-progress", "--namespace", "lab", "--out", str(tmp_path / "ref")])
    assert rc == 0
    rc = main(["-q", "map", "--reference", str(tmp_path / "ref"), "--data", data, "--backed",
               "--batch-key", "batch", "--batches", "Dropseq_3cl", "--max-epochs", "1",
               "--no-progress", "--namespace", "site-b", "--out", str(tmp_path / "q.h5ad")])
    assert rc == 0
    assert "site-b/Dropseq_3cl" in capsys.readouterr().out
    q = ad.read_h5ad(tmp_path / "q.h5ad")
    assert q.n_obs == 210 and q.obsm["X_scarches"].shape == (210, 10)


def test_map_reads_a_gzipped_h5ad_like_site_map(shared_data, tmp_path, capsys):
    """`map` and `site map` open --data through one reader: a gzip-compressed .h5ad works in
    both, and a file that is not HDF5 gets the same message naming the fix."""
    import gzip

    data = shared_data / DATA
    ref = tmp_path / "ref"
    assert main(["reference", "train", "--data", str(data), "--batch-key", "batch",
                 "--max-epochs", "2", "--no-progress", "--out", str(ref)]) == 0
    gz = tmp_path / "q.h5ad.gz"
    with open(data, "rb") as src, gzip.open(gz, "wb", compresslevel=1) as dst:
        dst.write(src.read())
    out = tmp_path / "mapped.h5ad"
    assert main(["map", "--reference", str(ref), "--data", str(gz), "--batch-key", "batch",
                 "--namespace", "q", "--max-epochs", "2", "--no-progress",
                 "--out", str(out)]) == 0
    assert out.is_file()
    capsys.readouterr()
    (tmp_path / "x.csv").write_text("a,b\n")
    assert main(["map", "--reference", str(ref), "--data", str(tmp_path / "x.csv"),
                 "--batch-key", "batch", "--out", str(tmp_path / "m2.h5ad")]) == 2
    assert "is not an HDF5 .h5ad file" in capsys.readouterr().err
