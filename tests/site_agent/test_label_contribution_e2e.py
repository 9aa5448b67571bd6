"""``site map --contribute-labels`` against a real coordinator on loopback: the dry run shows
exactly what would leave (declared prototype fields, bucketed counts, no per-cell value, no cell
name) and sends nothing; the real run logs a label contribution; a later site's predictions say
where each label came from, and ``--genesis-labels-only`` leaves the contributions out."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import anndata as ad
import pytest

from coordinator.admin import enroll_site, init_state
from protocols.keys import generate_private_key, save_private_key, save_public_key
from site_agent.agent import run_map
from site_agent.config import SiteConfig
from tests.coordinator.conftest import running_server

pytestmark = [pytest.mark.slow, pytest.mark.network]

_FIELDS = {
    "kind",
    "format_version",
    "origin",
    "site_id",
    "key_id",
    "sequence",
    "base",
    "label_key",
    "n_latent",
    "privacy",
    "prototypes",
}


def _site(root: Path, state_dir: Path, site_id: str) -> Path:
    key = generate_private_key()
    kdir = root / site_id
    kdir.mkdir(parents=True)
    save_private_key(key, kdir / "site.key")
    save_public_key(key, kdir / "site.pub")
    enroll_site(state_dir, site_id=site_id, public_key=kdir / "site.pub")
    return kdir / "site.key"


def _lists(obj):
    if isinstance(obj, dict):
        for v in obj.values():
            yield from _lists(v)
    elif isinstance(obj, list):
        yield obj
        for v in obj:
            yield from _lists(v)


def test_contribute_labels_end_to_end(reference_bundle: Path, panc8: Path, tmp_path: Path) -> None:
    coord = tmp_path / "coord"
    init_state(coord, reference=reference_bundle, origin="test.scarches-fl.local/labels")
    keys = {s: _site(tmp_path / "keys", coord, s) for s in ("lab-a", "lab-b")}
    query = ad.read_h5ad(panc8, backed="r")
    cells = set(map(str, query.obs_names))
    with running_server(coord, name="labels-e2e") as server:

        def cfg(site: str, batch: str, out: str, **kw) -> SiteConfig:
            return SiteConfig(
                coordinator=server.address,
                trust=coord / "trust.json",
                key=keys[site],
                site_id=site,
                state=tmp_path / site / "state",
                data=panc8,
                batch_key="batch",
                label_key="cell_type",
                batches=(batch,),
                out=tmp_path / f"{out}.h5ad",
                max_epochs=3,
                **kw,
            )

        a = cfg("lab-a", "celseq2", "a-dry", contribute_labels=True)
        dry = run_map(a, dry_run=True, printer=None)
        assert dry.label_entry is not None and dry.label_entry.envelope_bytes is None
        raw = dry.label_entry.payload_bytes
        payload = json.loads(raw)
        # the reference carries expression prototypes: format version 2 (ADR 0045)
        assert set(payload) == _FIELDS | {"n_expression"} and payload["format_version"] == 2
        assert payload["kind"] == "label_contribution"
        n_latent, n_expression = payload["n_latent"], payload["n_expression"]
        assert n_latent == 8 and n_expression == 100
        for p in payload["prototypes"]:
            assert set(p) == {"name", "count", "mean", "std", "sigma", "expression"}
            assert set(p["expression"]) == {"mean", "std", "sigma"}
            assert len(p["expression"]["mean"]) == len(p["expression"]["std"]) == n_expression
            assert p["count"] >= 20 and p["count"] % 10 == 0
        # vectors of the latent or the expression subspace, one per type: never one per cell
        n_cells = int((query.obs["batch"] == "celseq2").sum())
        longest = max(len(v) for v in _lists(payload))
        assert longest <= max(n_latent, n_expression, len(payload["prototypes"])) < n_cells
        text = raw.decode()
        assert not any(c in text for c in cells if len(c) >= 6)  # no cell name
        truth = query.obs.loc[query.obs["batch"] == "celseq2", "cell_type"].value_counts()
        summary = dry.label_entry.summary()
        for p in summary["prototypes"]:
            assert p["cells_here"] == int(truth[p["name"]])
            assert p["count"] == p["cells_here"] // 10 * 10
        rare = [t for t, n in truth.items() if 0 < n < 20]
        assert rare and all(t in summary["kept_back"] for t in rare)  # k-1 cells never leave

        real = run_map(dataclasses.replace(a, out=tmp_path / "a.h5ad"), printer=None)
        assert real.label_receipt is not None
        index = real.label_receipt["leaf_index"]

        # lab-a annotated only types the reference knows: the default (expression) rule uses
        # them to place lab-a's frame, never to relabel; the latent prototype rule uses every
        # accepted prototype and says which cells took theirs from lab-a
        b = cfg("lab-b", "smartseq2", "b-default")
        run_map(b, printer=None)
        out = ad.read_h5ad(tmp_path / "b-default.h5ad")
        assert set(out.obs["cell_type_source"].astype(str)) == {"genesis"}
        b = cfg("lab-b", "smartseq2", "b", label_method="prototype")
        run_map(b, printer=None)
        out = ad.read_h5ad(tmp_path / "b.h5ad")
        sources = set(out.obs["cell_type_source"].astype(str))
        assert sources <= {"genesis", f"lab-a#{index}"} and f"lab-a#{index}" in sources
        only = dataclasses.replace(b, out=tmp_path / "b-genesis.h5ad", genesis_labels_only=True)
        run_map(only, printer=None)
        out = ad.read_h5ad(tmp_path / "b-genesis.h5ad")
        assert set(out.obs["cell_type_source"].astype(str)) == {"genesis"}
