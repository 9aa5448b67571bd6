"""scvi-tools reference in, grown reference out: scvi-tools trains a small SCVI and a small SCANVI,
the operator imports it and publishes it as the genesis of a real coordinator (TLS, loopback), a
site maps a new study and contributes, an auditor verifies the ledger, the operator exports the
grown reference, and scvi-tools loads the export and embeds the site's cells as the site's
mapping did (within 1e-4)."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import anndata as ad
import numpy as np
import pytest
from site_helpers import cli, free_port, run_cli

scvi = pytest.importorskip(
    "scvi", reason="scvi-tools is not installed: pip install -e '.[bench]' runs these tests"
)
from tests.scvi_models import (  # noqa: E402
    ARCHITECTURES,
    reference_cells,
    train_scanvi,
    train_scvi,
)

ORIGIN = "scvi.consortium.test/log"


def _serve(coord: Path, log_path: Path) -> tuple[subprocess.Popen, str]:
    from protocols.errors import TransportError
    from protocols.policy import read_trust
    from protocols.registry_client import RegistryClient

    address = f"127.0.0.1:{free_port()}"
    log = open(log_path, "wb")  # noqa: SIM115 - closed with the process below
    proc = subprocess.Popen(
        cli("coordinator", "serve", "--dir", str(coord), "--listen", address),
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    proc.log = log  # type: ignore[attr-defined]
    pem = read_trust(coord / "trust.json").tls_root_pem.encode()
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"coordinator exited: {log_path.read_text()}")
        try:
            with RegistryClient(address, trust=pem, timeout=20) as client:
                client.health()
            return proc, address
        except TransportError:
            time.sleep(0.3)
    proc.terminate()
    raise AssertionError("coordinator not healthy after 90 s")


def _stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=10)
    proc.log.close()  # type: ignore[attr-defined]


@pytest.mark.slow
@pytest.mark.parametrize("model_class", ["SCVI", "SCANVI"])
def test_scvi_reference_through_a_consortium_and_back(model_class, tmp_path):
    cells = reference_cells(480, n_batches=4)  # batch0-2 the reference, batch3 the site's new study
    ref_cells = cells[cells.obs["batch"] != "batch3"].copy()
    site_cells = cells[cells.obs["batch"] == "batch3"].copy()
    model = train_scvi(ref_cells, tmp_path / "scvi", **ARCHITECTURES["scarches-recipe"])
    model_dir = tmp_path / "scvi"
    label_args: list[str] = []
    if model_class == "SCANVI":
        model = train_scanvi(model, tmp_path / "scanvi")
        model_dir = tmp_path / "scanvi"
        ref_h5ad = tmp_path / "reference.h5ad"
        ref_cells.write_h5ad(ref_h5ad)
        label_args = ["--data", str(ref_h5ad)]
    site_h5ad = tmp_path / "site.h5ad"
    site_cells.write_h5ad(site_h5ad)

    # operator: import, genesis, enrol, serve (TLS)
    bundle = tmp_path / "bundle"
    out = run_cli("reference", "import-scvi", str(model_dir), *label_args, "--out", str(bundle))
    assert f"imported {model_class}" in out.stdout
    coord = tmp_path / "coordinator"
    run_cli(
        "coordinator", "init", "--dir", str(coord), "--reference", str(bundle), "--origin", ORIGIN
    )
    keys = tmp_path / "site-a" / "keys"
    run_cli("site", "keygen", "--out", str(keys))
    run_cli(
        "coordinator",
        "enroll",
        "--dir",
        str(coord),
        "--site-id",
        "site-a",
        "--public-key",
        str(keys / "site.pub"),
    )
    proc, address = _serve(coord, tmp_path / "coordinator.log")
    try:
        trust = coord / "trust.json"
        mapped = tmp_path / "site-a.h5ad"
        site_label = ["--label-key", "cell_type"] if model_class == "SCANVI" else []
        res = run_cli(
            "site",
            "map",
            "--coordinator",
            address,
            "--trust",
            str(trust),
            "--key",
            str(keys / "site.key"),
            "--site-id",
            "site-a",
            "--state",
            str(tmp_path / "site-a" / "state"),
            "--data",
            str(site_h5ad),
            "--batch-key",
            "batch",
            *site_label,
            "--out",
            str(mapped),
            "--max-epochs",
            "5",
        )
        assert "delivered" in res.stdout, res.stdout
        audit = run_cli(
            "audit",
            "--coordinator",
            address,
            "--trust",
            str(trust),
            "--state",
            str(tmp_path / "auditor"),
        )
        assert "VERIFIED" in audit.stdout, audit.stdout
        from protocols.bundle import bundle_from_bytes, write_bundle
        from protocols.policy import read_trust
        from protocols.registry_client import RegistryClient

        pem = read_trust(trust).tls_root_pem.encode()
        with RegistryClient(address, trust=pem, timeout=20) as client:
            size = client.get_checkpoint().size
            served = client.get_reference(size)
        grown = bundle_from_bytes(served.manifest_bytes, served.safetensors_bytes)
    finally:
        _stop(proc)

    site = ad.read_h5ad(mapped)
    record = site.uns["scarches_fl"]
    # the served reference is the imported one plus exactly the site's update
    assert record["model_digest"] == grown.digest
    assert list(record["new_conditions"]) == ["site-a/batch3"]
    assert grown.conditions == ["ref/batch0", "ref/batch1", "ref/batch2", "site-a/batch3"]
    grown_dir = tmp_path / "grown"
    write_bundle(grown_dir, grown)

    # operator: export; a biologist opens it in scvi-tools with the site's cells
    export = tmp_path / "export"
    res = run_cli("reference", "export-scvi", str(grown_dir), "--out", str(export))
    assert "contains site data: no" in res.stdout
    info = json.loads((export / "EXPORT.json").read_text())
    assert info["batch_categories"] == ["batch0", "batch1", "batch2", "site-a/batch3"]
    assert info["site_conditions"] == ["site-a/batch3"] and info["contains_site_data"] is False
    query = site_cells.copy()
    query.obs["batch"] = "site-a/batch3"
    cls = getattr(scvi.model, model_class)
    loaded = cls.load(str(export), adata=query)
    np.testing.assert_allclose(
        loaded.get_latent_representation(), site.obsm["X_scarches"], atol=1e-4, rtol=0
    )
    # the reference's own cells embed as before the federation
    np.testing.assert_allclose(
        loaded.get_latent_representation(ref_cells.copy()),
        model.get_latent_representation(ref_cells.copy()),
        atol=1e-5,
    )
