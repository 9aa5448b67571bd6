"""End to end on real data: reference on six panc8 studies, surgery for celseq2 + smartseq2.

Few epochs (the point is the bookkeeping, not the embedding quality): every reference tensor is
bit-identical in the query model, the update holds only the new condition slices and is tiny,
export-then-apply reproduces the fine-tuned digest, digests agree across processes.
"""

from __future__ import annotations

import json
import subprocess
import sys
import warnings

import anndata as ad
import numpy as np
import pytest

from protocols.bundle import read_bundle
from protocols.diff import apply_condition_diff, diff_from_bytes, diff_to_bytes
from scarches_fl.data import DataError
from scarches_fl.model import ReferenceModel
from scarches_fl.simulate import simulate_counts

REF_BATCHES = ["indrop1", "indrop2", "indrop3", "indrop4", "celseq", "fluidigmc1"]
QUERY_BATCHES = ["celseq2", "smartseq2"]


@pytest.fixture(scope="module")
def panc8(shared_data):
    a = ad.read_h5ad(shared_data / "panc8_sub_nebula.h5ad")
    assert set(REF_BATCHES + QUERY_BATCHES) == set(a.obs["batch"].astype(str))
    ref = a[a.obs["batch"].isin(REF_BATCHES)].copy()
    query = a[a.obs["batch"].isin(QUERY_BATCHES)].copy()
    return ref, query


@pytest.fixture(scope="module")
def reference(panc8):
    ref, _ = panc8
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return ReferenceModel.train_reference(
            ref, batch_key="batch", label_key="cell_type", max_epochs=3, seed=0, progress=False)


@pytest.fixture(scope="module")
def mapped(reference, panc8):
    _, query = panc8
    return reference.surgery(query, batch_key="batch", namespace="query", max_epochs=3,
                             progress=False)


def test_reference_bundle_round_trip(reference, tmp_path):
    bundle = reference.save(tmp_path / "ref")
    assert bundle.conditions == [f"ref/{b}" for b in sorted(REF_BATCHES)]
    assert bundle.manifest["registration"]["batch_key"] == "batch"
    assert bundle.manifest["registration"]["label_key"] == "cell_type"
    assert bundle.manifest["registration"]["layer"] is None
    assert bundle.manifest["labels"], "label knowledge from scarches_fl.labels"
    assert all(t.dtype == np.float32 for t in bundle.tensors.values())
    loaded = ReferenceModel.from_bundle(tmp_path / "ref")
    assert loaded.digest == bundle.digest
    assert loaded.hyperparameters == reference.hyperparameters
    for name, t in reference.module.export_tensors().items():
        assert np.array_equal(t, loaded.module.export_tensors()[name]), name


def test_every_reference_tensor_is_bit_identical_after_surgery(reference, mapped):
    base = reference.to_bundle()
    new = mapped.model.to_bundle()
    assert mapped.new_conditions == ["query/celseq2", "query/smartseq2"]
    assert new.conditions == base.conditions + mapped.new_conditions
    n_old = len(base.conditions)
    for name, arr in base.tensors.items():
        spec = base.manifest["tensors"][name]
        got = new.tensors[name]
        if spec["role"] == "condition":
            got = np.take(got, np.arange(n_old), axis=spec["axis"])
        assert got.dtype == arr.dtype and np.array_equal(got, arr), name
        assert got.tobytes() == arr.tobytes(), name
    assert mapped.model.labels == reference.labels


def test_update_holds_only_condition_slices_and_is_small(reference, mapped):
    base = reference.to_bundle()
    cond_tensors = {n for n, s in base.manifest["tensors"].items() if s["role"] == "condition"}
    assert set(mapped.diff) == cond_tensors
    for name, arr in mapped.diff.items():
        axis = base.manifest["tensors"][name]["axis"]
        assert arr.shape[axis] == 2 and arr.dtype == np.float32
    diff_bytes = len(diff_to_bytes(mapped.diff))
    bundle_bytes = sum(t.nbytes for t in base.tensors.values())
    assert diff_bytes < 0.02 * bundle_bytes
    assert mapped.trainable_parameters == sum(a.size for a in mapped.diff.values())


def test_export_then_apply_gives_the_fine_tuned_digest(reference, mapped):
    base = reference.to_bundle()
    wire = diff_from_bytes(diff_to_bytes(mapped.diff), max_bytes=10_000_000)
    applied = apply_condition_diff(base, wire, mapped.new_conditions)
    assert applied.digest == mapped.model.digest


def test_query_latent_matches_get_latent(mapped, panc8):
    _, query = panc8
    z = mapped.model.get_latent(query, batch_key="batch", namespace="query")
    assert z.shape == (query.n_obs, 10)
    np.testing.assert_allclose(z, mapped.latent, rtol=1e-5, atol=1e-5)


def test_surgery_errors(reference, panc8):
    ref, query = panc8
    with pytest.raises(DataError, match="already exist"):
        reference.surgery(ref[:50].copy(), batch_key="batch", namespace="ref", max_epochs=1,
                          progress=False)
    with pytest.raises(DataError, match="not in this model"):
        reference.get_latent(query, batch_key="batch", namespace="query")
    with pytest.raises(DataError, match="mode must be"):
        reference.surgery(query, batch_key="batch", namespace="q", mode="everything")


def test_other_modes_report_trainable_counts(reference, panc8):
    _, query = panc8
    counts = {}
    for mode in ("input_layers", "full"):
        res = reference.surgery(query, batch_key="batch", namespace="query", mode=mode,
                                max_epochs=1, progress=False)
        counts[mode] = res.trainable_parameters
        assert res.diff == {}
        assert res.model.conditions[-2:] == ["query/celseq2", "query/smartseq2"]
    assert counts["input_layers"] == reference.trainable_parameters("input_layers") + 2 * 128
    assert counts["full"] > counts["input_layers"] > 2 * 128 * 2


_CHILD = """
import sys, warnings, anndata as ad
warnings.simplefilter("ignore")
from scarches_fl.model import ReferenceModel
a = ad.read_h5ad(sys.argv[1])
m = ReferenceModel.train_reference(a, batch_key="batch", max_epochs=2, seed=7, progress=False)
print(m.digest)
"""


def test_digest_is_the_same_across_processes(tmp_path):
    a = simulate_counts(120, n_genes=40, n_batches=2, n_cell_types=3, seed=1)
    path = tmp_path / "sim.h5ad"
    a.write_h5ad(path)
    here = ReferenceModel.train_reference(a, batch_key="batch", max_epochs=2, seed=7,
                                          progress=False).digest
    out = subprocess.run([sys.executable, "-c", _CHILD, str(path)], capture_output=True,
                         text=True, timeout=120, check=True)
    assert out.stdout.strip().splitlines()[-1] == here


def test_trvae_reference_and_surgery(tmp_path):
    a = simulate_counts(200, n_genes=50, n_batches=3, n_cell_types=3, seed=2)
    ref = a[a.obs["batch"] != "batch2"].copy()
    query = a[a.obs["batch"] == "batch2"].copy()
    m = ReferenceModel.train_reference(ref, batch_key="batch", likelihood="trvae",
                                       max_epochs=2, progress=False)
    m.save(tmp_path / "b")
    assert read_bundle(tmp_path / "b").manifest["hyperparameters"]["likelihood"] == "trvae"
    res = m.surgery(query, batch_key="batch", namespace="site-a", max_epochs=2, progress=False)
    assert res.new_conditions == ["site-a/batch2"]
    base = m.to_bundle()
    assert apply_condition_diff(base, res.diff, res.new_conditions).digest == res.model.digest
    assert json.dumps(res.alignment.to_dict())


def test_surgery_aligns_shuffled_and_partial_query_genes(reference, panc8):
    _, query = panc8
    rng = np.random.default_rng(0)
    keep = np.sort(rng.choice(query.n_vars, size=900, replace=False))
    order = rng.permutation(keep)
    q = query[:, order].copy()
    res = reference.surgery(q, batch_key="batch", namespace="query", max_epochs=1,
                            progress=False)
    a = res.alignment
    assert (a.n_overlap, a.n_missing, a.n_extra, a.reordered) == (900, 100, 0, True)
    with pytest.raises(DataError, match="coverage"):
        reference.surgery(query[:, :100].copy(), batch_key="batch", namespace="query",
                          progress=False)


def test_label_key_trains_a_frozen_latent_classifier(reference, mapped):
    hp = reference.hyperparameters
    assert hp["n_labels"] == 13 and hp["classifier_weight"] > 0
    assert reference.registration["classifier_classes"][0] == "acinar"
    base = reference.to_bundle()
    assert base.tensors["classifier.weight"].shape == (13, 10)
    assert base.manifest["tensors"]["classifier.weight"]["role"] == "frozen"
    assert np.array_equal(mapped.model.to_bundle().tensors["classifier.weight"],
                          base.tensors["classifier.weight"])


def test_classifier_weight_zero_is_unsupervised(panc8):
    ref, _ = panc8
    m = ReferenceModel.train_reference(ref[:200].copy(), batch_key="batch",
                                       label_key="cell_type", classifier_weight=0,
                                       max_epochs=1, progress=False)
    assert m.hyperparameters["n_labels"] == 0
    assert "classifier.weight" not in m.to_bundle().tensors
