"""The checks every mapping path runs before training (``scarches_fl.query``), the read plan
(stream or read whole) and the ``uns["scarches_fl"]`` record, named after the mistake each
refuses."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pytest
import scipy.sparse as sp

from scarches_fl.data import DataError, GeneAlignmentReport
from scarches_fl.query import (
    MAPPING_RECORD_FIELDS,
    check_output_path,
    check_query,
    choose_backed,
    count_matrix_bytes,
    mapping_record,
)

GENES = [f"GENE{i}" for i in range(20)]
LABELS = {"schema": "x", "levels": {"cell_type": {}}}


def _adata(n=60, genes=None, x=None, batches=None):
    genes = genes or GENES
    rng = np.random.default_rng(0)
    x = x if x is not None else sp.csr_matrix(rng.poisson(1.0, (n, len(genes))).astype(np.float32))
    a = ad.AnnData(X=x)
    a.var_names = genes
    a.obs_names = [f"c{i}" for i in range(n)]
    a.obs["batch"] = batches if batches is not None else ["s1"] * (n // 2) + ["s2"] * (n - n // 2)
    return a


def _check(a, **kw):
    args = dict(batch_key="batch", reference_genes=GENES, min_cells_per_batch=10)
    args.update(kw)
    return check_query(a, **args)


def test_counts_in_a_layer_are_named_and_recorded():
    a = _adata()
    a.layers["counts"] = a.X.copy()
    a.X = sp.csr_matrix(np.log1p(a.X.toarray()) / 3.0)
    with pytest.raises(DataError, match="--layer counts"):
        _check(a)
    checked = _check(a, layer="counts")
    assert checked.counts == "layers['counts']"
    assert "counts read from layers['counts']" in checked.notes
    assert _check(_adata()).counts == "X"


def test_per_cell_batch_key_is_refused_not_turned_into_42_conditions():
    with pytest.raises(DataError, match="cell id or barcode.*one condition per cell"):
        _check(_adata(n=42, batches=[f"cell{i}" for i in range(42)]), min_cells_per_batch=1)


def test_single_batch_is_one_condition():
    checked = _check(_adata(batches=["only"] * 60))
    assert checked.batch_sizes == {"only": 60}
    assert any("single value" in n for n in checked.notes)


def test_small_batches_are_refused_with_the_flags_that_fix_it():
    with pytest.raises(DataError, match="--batches s2.*--min-cells-per-batch"):
        _check(_adata(batches=["s1"] * 5 + ["s2"] * 55))
    assert _check(_adata(batches=["s1"] * 5 + ["s2"] * 55), batches=["s2"]).n_cells == 55


def test_missing_batch_key_lists_the_columns():
    with pytest.raises(DataError, match="batch key 'study' is not a column of obs.*batch"):
        _check(_adata(), batch_key="study")


def test_ensembl_ids_vs_symbols_says_how_to_map():
    ens = [f"ENSG{i:011d}" for i in range(20)]
    a = _adata(genes=ens)
    a.var["gene_symbols"] = GENES
    with pytest.raises(DataError) as ei:
        _check(a)
    msg = str(ei.value)
    assert "Ensembl ids" in msg and "symbols" in msg and "--var-names-column gene_symbols" in msg
    assert _check(a, var_names_column="gene_symbols").gene_coverage == 1.0


def test_label_key_unknown_to_the_reference_is_refused_before_training():
    with pytest.raises(DataError, match="'celltype' is not a label level.*cell_type"):
        _check(_adata(), label_key="celltype", labels_manifest=LABELS)
    with pytest.raises(DataError, match="carries no label knowledge"):
        _check(_adata(), label_key="cell_type", labels_manifest=None)
    checked = _check(_adata(), label_key="cell_type", labels_manifest=LABELS)
    assert any("predictions only" in n for n in checked.notes)  # the query has no labels


def test_output_path_folder_is_created_and_an_existing_file_is_kept(tmp_path):
    out = check_output_path(tmp_path / "new" / "deeper" / "q.h5ad")
    assert out.parent.is_dir()
    out.write_bytes(b"results of last week")
    with pytest.raises(DataError, match="already exists.*--force"):
        check_output_path(out)
    assert check_output_path(out, force=True) == out
    assert out.read_bytes() == b"results of last week"  # checking never deletes


def test_output_path_refuses_a_folder_that_is_not_a_bundle(tmp_path):
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "a.txt").write_text("x")
    with pytest.raises(DataError, match="not a model bundle"):
        check_output_path(tmp_path / "notes", force=True)


def test_read_plan_streams_what_would_not_fit(tmp_path):
    a = _adata(n=200)
    a.write_h5ad(tmp_path / "q.h5ad")
    size = count_matrix_bytes(tmp_path / "q.h5ad")
    assert size == a.X.nnz * 8 + 201 * a.X.indptr.dtype.itemsize
    roomy = choose_backed(tmp_path / "q.h5ad", available_bytes=1000 * size)
    tight = choose_backed(tmp_path / "q.h5ad", available_bytes=4 * size)
    assert not roomy.backed and tight.backed
    assert "streaming" in tight.reason and "--in-memory" in tight.reason
    assert choose_backed(tmp_path / "q.h5ad", backed=False, available_bytes=1).backed is False
    assert choose_backed(tmp_path / "q.h5ad", backed=True).backed is True


def test_mapping_record_has_one_schema():
    alignment = GeneAlignmentReport(
        n_reference_genes=3,
        n_query_genes=3,
        n_overlap=3,
        coverage=1.0,
        n_missing=0,
        n_extra=0,
        missing_examples=["x"],
    )
    common = dict(
        reference_digest="sha256:a",
        model_digest="sha256:b",
        mode="conditions",
        namespace="query",
        new_conditions=["query/s1"],
        epochs=2,
        trainable_parameters=10,
        batch_key="batch",
        counts="X",
        alignment=alignment,
    )
    bare = mapping_record(**common)
    full = mapping_record(
        **common,
        label_key="cell_type",
        label_method="prototype",
        threshold=0.5,
        ledger={"tree_size": 3, "checkpoint_root": "ab", "origin": "o", "site_id": "s"},
    )
    assert list(full) == list(MAPPING_RECORD_FIELDS)
    assert set(bare) == set(MAPPING_RECORD_FIELDS) - {
        "label_key",
        "label_method",
        "threshold",
        "tree_size",
        "checkpoint_root",
        "origin",
        "site_id",
    }
    assert "missing_examples" not in bare["gene_alignment"]  # lists stay out of the file
    with pytest.raises(ValueError, match="unknown ledger fields"):
        mapping_record(**common, ledger={"digest": "x"})
