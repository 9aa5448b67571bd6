"""Import of scvi-tools SCVI / SCANVI models: the forward pass equals scvi-tools' own, a pickle
that would run code is refused, unsupported options are named, and the CLI writes a bundle.

scvi-tools trains the models inside the tests (the ``bench`` extra installs it; CI installs it).
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

scvi = pytest.importorskip(
    "scvi", reason="scvi-tools is not installed: pip install -e '.[bench]' runs these tests"
)
torch = pytest.importorskip("torch")

from protocols.bundle import read_bundle  # noqa: E402
from scarches_fl.model import ReferenceModel  # noqa: E402
from scarches_fl.scvi_interop import (  # noqa: E402
    ScviImportError,
    classifier_labels,
    export_scvi,
    import_scvi,
    read_model_file,
)
from scarches_fl_cli.main import main  # noqa: E402
from tests.scvi_models import (  # noqa: E402
    ARCHITECTURES,
    quiet,
    reference_cells,
    train_scanvi,
    train_scvi,
)


@pytest.fixture(scope="module")
def cells():
    return reference_cells()


@pytest.fixture(scope="module")
def saved(cells, tmp_path_factory):
    """{name: (scvi-tools model, model dir)} for every architecture, plus a SCANVI."""
    root = tmp_path_factory.mktemp("scvi_models")
    out = {}
    for name, kw in ARCHITECTURES.items():
        out[name] = (train_scvi(cells, root / name, **kw), root / name)
    out["scanvi"] = (train_scanvi(out["scvi-defaults"][0], root / "scanvi"), root / "scanvi")
    return out


@pytest.mark.parametrize("name", sorted(ARCHITECTURES))
def test_latent_mean_equals_scvi_tools(saved, cells, name, tmp_path):
    model, path = saved[name]
    expected = model.get_latent_representation(cells.copy())
    ref = import_scvi(path)
    ref.save(tmp_path / "bundle")
    reread = ReferenceModel.from_bundle(tmp_path / "bundle")
    for m in (ref, reread):
        ours = m.get_latent(cells, batch_key="batch", namespace="ref")
        np.testing.assert_allclose(ours, expected, atol=1e-5, rtol=0)
    assert reread.digest == ref.digest


def test_imported_options_and_provenance(saved):
    ref = import_scvi(saved["scvi-defaults"][1])
    hp = ref.hyperparameters
    assert hp["likelihood"] == "zinb" and hp["inject_covariates"] == "all"
    assert hp["encode_covariates"] is False and hp["use_batch_norm"] == "both"
    assert hp["encoder_input"] == "log1p"
    src = ref.registration["scvi"]
    assert src["model_class"] == "SCVI" and src["scvi_version"] == scvi.__version__
    assert src["setup_args"]["batch_key"] == "batch"
    assert ref.conditions == ["ref/batch0", "ref/batch1", "ref/batch2"]
    # the encoder takes no condition: surgery trains the decoder's columns only
    specs = ref.module.specs
    assert "encoder.layers.0.weight_s" not in specs
    assert [n for n, s in specs.items() if s.role == "condition"] == [
        "decoder.layers.0.weight_s",
        "decoder.layers.1.weight_s",
    ]
    recipe = import_scvi(saved["scarches-recipe"][1])
    cond = sorted(n for n, s in recipe.module.specs.items() if s.role == "condition")
    assert cond == [
        "decoder.layers.0.weight_s",
        "decoder.layers.1.weight_s",
        "encoder.layers.0.weight_s",
        "encoder.layers.1.weight_s",
        "px_r",
    ]


def test_scanvi_labels_equal_predict(saved, cells):
    model, path = saved["scanvi"]
    expected = np.asarray(model.predict(cells.copy()), dtype=object)
    ref = import_scvi(path)
    ours = classifier_labels(ref, cells, batch_key="batch", namespace="ref")
    assert (ours == expected).all()
    assert ref.registration["classifier_classes"] == sorted(set(cells.obs["cell_type"]))
    np.testing.assert_allclose(
        ref.get_latent(cells, batch_key="batch", namespace="ref"),
        model.get_latent_representation(cells.copy()),
        atol=1e-5,
    )


def test_prototypes_from_reference_cells(saved, cells):
    ref = import_scvi(saved["scanvi"][1], data=cells)
    level = ref.labels["levels"]["cell_type"]
    assert sorted(level["prototype"]["type_cell_counts"]) == sorted(set(cells.obs["cell_type"]))
    without = import_scvi(saved["scanvi"][1])
    assert without.labels == {}


def test_reader_keeps_no_pandas_objects(saved):
    mf = read_model_file(saved["scanvi"][1] / "model.pt")
    assert "history_" in mf.attr and not any(
        type(v).__module__.startswith("pandas") for v in mf.attr["history_"].values()
    )
    assert mf.var_names[:2] == ["gene00", "gene01"]


class _RunsCode:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_pickle_that_runs_code_is_refused(saved, tmp_path):
    raw = torch.load(saved["scvi-defaults"][1] / "model.pt", weights_only=False)
    marker = tmp_path / "ran"
    raw["attr_dict"]["payload_"] = _RunsCode(marker)
    evil = tmp_path / "evil"
    evil.mkdir()
    torch.save(raw, evil / "model.pt")
    with pytest.raises(ScviImportError, match=r"system.*could run code"):
        import_scvi(evil)
    assert not marker.exists()


def test_legacy_pickle_file_is_refused(tmp_path):
    (tmp_path / "model.pt").write_bytes(b"\x80\x02}q\x00.")
    with pytest.raises(ScviImportError, match="not a torch zip checkpoint"):
        import_scvi(tmp_path)


@pytest.mark.parametrize(
    "change, named",
    [
        ({"use_observed_lib_size": False}, "use_observed_lib_size"),
        ({"dispersion": "gene-cell"}, "gene-cell"),
        ({"gene_likelihood": "poisson"}, "poisson"),
        ({"latent_distribution": "ln"}, "latent_distribution"),
    ],
)
def test_unsupported_options_are_named(saved, tmp_path, change, named):
    raw = torch.load(saved["scvi-defaults"][1] / "model.pt", weights_only=False)
    raw["attr_dict"]["init_params_"]["non_kwargs"].update(change)
    torch.save(raw, tmp_path / "model.pt")
    with pytest.raises(ScviImportError, match=named):
        import_scvi(tmp_path)


def test_covariate_keys_are_refused(saved, tmp_path):
    raw = torch.load(saved["scvi-defaults"][1] / "model.pt", weights_only=False)
    raw["attr_dict"]["registry_"]["setup_args"]["categorical_covariate_keys"] = ["donor"]
    torch.save(raw, tmp_path / "model.pt")
    with pytest.raises(ScviImportError, match="categorical_covariate_keys"):
        import_scvi(tmp_path)


def test_cli_import_then_export(saved, cells, tmp_path, capsys):
    model, path = saved["scanvi"]
    data = tmp_path / "ref.h5ad"
    cells.write_h5ad(data)
    bundle_dir = tmp_path / "bundle"
    rc = main(
        ["-q", "reference", "import-scvi", str(path), "--data", str(data), "--out", str(bundle_dir)]
    )
    assert rc == 0
    printed = capsys.readouterr().out
    assert "imported SCANVI" in printed and "3 conditions" in printed
    assert "classifier: 4 cell types" in printed and "label 'cell_type'" in printed
    bundle = read_bundle(bundle_dir)
    assert bundle.manifest["registration"]["scvi"]["model_class"] == "SCANVI"
    out = tmp_path / "export"
    rc = main(["-q", "reference", "export-scvi", str(bundle_dir), "--out", str(out)])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "contains site data: no" in printed
    info = json.loads((out / "EXPORT.json").read_text())
    assert info["contains_site_data"] is False
    assert info["batch_categories"] == ["batch0", "batch1", "batch2"]
    quiet()
    back = scvi.model.SCANVI.load(str(out), adata=cells.copy())
    np.testing.assert_allclose(
        back.get_latent_representation(), model.get_latent_representation(cells.copy()), atol=1e-6
    )
    assert (np.asarray(back.predict()) == np.asarray(model.predict(cells.copy()))).all()
    rc = main(["-q", "reference", "import-scvi", str(path), "--out", str(bundle_dir)])
    assert rc == 2  # refuses to replace without --force
    assert "already exists" in capsys.readouterr().err


def test_export_refuses_a_native_bundle(tmp_path):
    adata = reference_cells(120)
    ref = ReferenceModel.train_reference(
        adata, batch_key="batch", max_epochs=1, progress=False, n_hidden=8, n_latent=2
    )
    with pytest.raises(Exception, match="not imported from scvi-tools"):
        export_scvi(ref, tmp_path / "out")


@pytest.mark.parametrize(
    "n_reference_batches, module_kw",
    [(1, {"encode_covariates": True}), (3, {}), (3, {"dispersion": "gene-batch"})],
)
def test_surgery_then_export_embeds_as_our_mapping(tmp_path, n_reference_batches, module_kw):
    """Without a coordinator: surgery on an imported model, export, scvi-tools embeds the new
    study's cells as the surgery did (one reference batch: scvi-tools adds no one-hot columns
    until the export has two conditions)."""
    cells = reference_cells(240, seed=1, n_batches=n_reference_batches + 1)
    new = f"batch{n_reference_batches}"
    ref_cells = cells[cells.obs["batch"] != new].copy()
    query = cells[cells.obs["batch"] == new].copy()
    model = train_scvi(ref_cells, tmp_path / "scvi", **module_kw)
    ref = import_scvi(tmp_path / "scvi")
    res = ref.surgery(query, batch_key="batch", namespace="site-a", max_epochs=3, progress=False)
    assert set(res.diff) == {n for n, s in ref.module.specs.items() if s.role == "condition"}
    out = export_scvi(res.model, tmp_path / "export")
    q = query.copy()
    q.obs["batch"] = f"site-a/{new}"
    back = scvi.model.SCVI.load(str(out), adata=q)
    np.testing.assert_allclose(back.get_latent_representation(), res.latent, atol=1e-4, rtol=0)
    np.testing.assert_allclose(
        back.get_latent_representation(ref_cells.copy()),
        model.get_latent_representation(ref_cells.copy()),
        atol=1e-5,
    )


def test_python_api_from_scvi_map_to_scvi(saved, tmp_path):
    """``Reference.from_scvi`` -> ``map`` a new study -> ``to_scvi``: scvi-tools embeds the
    study's cells as the mapping did."""
    from scarches_fl import Reference

    model, path = saved["scarches-recipe"]
    study = reference_cells(120, seed=5)
    study = study[study.obs["batch"] == "batch0"].copy()
    study.obs["batch"] = "new-study"
    ref = Reference.from_scvi(path)
    assert ref.registration["scvi"]["model_class"] == "SCVI"
    mapped = ref.map(study, batch_key="batch", namespace="site-a", max_epochs=3)
    assert "site-a/new-study" in mapped.reference.conditions
    out = mapped.reference.to_scvi(tmp_path / "export")
    q = study.copy()
    q.obs["batch"] = "site-a/new-study"
    back = scvi.model.SCVI.load(str(out), adata=q)
    np.testing.assert_allclose(
        back.get_latent_representation(), study.obsm["X_scarches"], atol=1e-4, rtol=0
    )


def test_surgery_on_batch_norm_reference_keeps_every_old_number(saved):
    """scvi-tools' defaults (batch norm in encoder and decoder): conditions-mode surgery trains
    the new columns only; every imported number, running statistics included, is bit-identical
    afterwards, and the diff is exactly the new columns of the condition tensors."""
    ref = import_scvi(saved["scvi-defaults"][1])
    study = reference_cells(120, seed=3)
    study = study[study.obs["batch"] == "batch1"].copy()
    study.obs["batch"] = "new-study"
    before = ref.module.export_tensors()
    res = ref.surgery(study, batch_key="batch", namespace="site-a", max_epochs=2, progress=False)
    after = res.model.module.export_tensors()
    assert res.trainable_parameters == sum(v.size for v in res.diff.values()) == 2 * 16
    for name, old in before.items():
        spec = ref.module.specs[name]
        new = after[name]
        if spec.role == "condition":
            assert np.array_equal(new[:, : old.shape[1]], old), name
            assert np.array_equal(new[:, old.shape[1] :], res.diff[name]), name
        else:
            assert np.array_equal(new, old), name
    assert any(n.endswith(".bn.running_var") for n in before)
