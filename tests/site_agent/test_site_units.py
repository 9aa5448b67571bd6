"""Unit tests of the site agent's parts that need no coordinator: configuration, state directory,
outbox, privacy guard, and the friendly data checks."""

from __future__ import annotations

import gzip
import os
import stat

import anndata as ad
import numpy as np
import pytest
import scipy.sparse as sp

from protocols.errors import ConfigError
from protocols.update import PAYLOAD_SCHEMA
from site_agent.config import SiteConfig, load_config, merge_flags
from site_agent.guard import PAYLOAD_FIELDS, GuardPolicy, PrivacyGuardError, check_outgoing
from site_agent.mapping import SiteDataError, open_query
from site_agent.outbox import Outbox
from site_agent.state import SiteState, StateError, StateLockedError

# -- configuration ----------------------------------------------------------------------------


def test_config_file_and_flags(tmp_path):
    cfg = tmp_path / "site.yaml"
    cfg.write_text(
        "coordinator: 127.0.0.1:7443\ntrust: keys/trust.json\nsite_id: hospital-a\n"
        "batches: [celseq2, smartseq2]\nlabel_method: prototype\n"
        "thresholds:\n  min_gene_coverage: 0.7\n"
    )
    c = load_config(cfg)
    assert c.label_method == "prototype"
    assert SiteConfig().label_method == "auto"
    assert c.coordinator == "127.0.0.1:7443"
    assert c.trust == tmp_path / "keys" / "trust.json"  # relative to the file
    assert c.batches == ("celseq2", "smartseq2")
    assert c.thresholds.min_gene_coverage == 0.7
    c2 = merge_flags(c, {"site_id": "hospital-b", "batches": "x,y", "min_gene_coverage": 0.2,
                         "insecure": None})
    assert c2.site_id == "hospital-b" and c2.batches == ("x", "y")
    assert c2.thresholds.min_gene_coverage == 0.2 and c2.thresholds.label_uncertainty == 0.5
    assert c2.insecure is False


@pytest.mark.parametrize(
    "text, field",
    [
        ("coordinator: nohostport\n", "coordinator:"),
        ("site_id: Hospital A\n", "site_id:"),
        ("thresholds:\n  min_gene_coverage: high\n", "thresholds.min_gene_coverage:"),
        ("thresholds:\n  coverage: 0.5\n", "thresholds.coverage:"),
        ("batch_kye: batch\n", "batch_kye:"),
        ("insecure: yes please\n", "insecure:"),
        ("label_method: magic\n", "label_method:"),
        ("- a\n- b\n", "top level"),
        ("coordinator: [\n", "line"),
    ],
)
def test_config_errors_name_file_and_field(tmp_path, text, field):
    cfg = tmp_path / "site.yaml"
    cfg.write_text(text)
    with pytest.raises(ConfigError) as ei:
        load_config(cfg)
    assert str(cfg) in str(ei.value) and field in str(ei.value)


def test_config_require_names_missing_flags():
    with pytest.raises(ConfigError, match="--site-id"):
        SiteConfig(coordinator="h:1").require("coordinator", "site_id")


# -- state directory --------------------------------------------------------------------------


def test_sequence_allocation_is_durable_and_never_reused(tmp_path):
    st = SiteState(tmp_path / "state")
    with st.locked():
        assert st.allocate_sequence() == 1
        assert st.allocate_sequence() == 2
        assert st.allocate_sequence(at_least=10) == 11  # the coordinator knows a higher one
    again = SiteState(tmp_path / "state")
    with again.locked():
        assert again.allocate_sequence() == 12
    with pytest.raises(StateError):
        again.allocate_sequence()  # not without the lock


def test_state_lock_is_exclusive(tmp_path):
    st = SiteState(tmp_path / "s")
    with st.locked(), pytest.raises(StateLockedError), SiteState(tmp_path / "s").locked():
        pass


def test_trust_is_pinned_never_replaced_silently(tmp_path):
    st = SiteState(tmp_path / "s").ensure()
    t1 = tmp_path / "t1.json"
    t1.write_bytes(b'{"a":1}')
    assert st.pin_trust(t1) == b'{"a":1}'
    t2 = tmp_path / "t2.json"
    t2.write_bytes(b'{"a":2}')
    with pytest.raises(StateError, match="differs from the trust.json pinned"):
        st.pin_trust(t2)


def test_checkpoint_never_moves_back(tmp_path):
    st = SiteState(tmp_path / "s").ensure()
    st.store_checkpoint(origin="o", size=5, root=b"\1" * 32, note=b"n5")
    with pytest.raises(StateError):
        st.store_checkpoint(origin="o", size=4, root=b"\1" * 32, note=b"n4")
    assert st.last_checkpoint().size == 5


# -- outbox -----------------------------------------------------------------------------------


def test_outbox_keeps_exact_bytes(tmp_path):
    box = Outbox(tmp_path / "outbox")
    e = box.create(sequence=3, payload_bytes=b"{}", diff_bytes=b"\x00\x01",
                   summary={"new_conditions": ["s/a"]}, summary_text="hello\n")
    assert e.id == "update-000003" and e.state == "pending"
    e.write_envelope(b"ENV")
    with pytest.raises(StateError):
        e.write_envelope(b"ENV2")  # never signed twice
    assert box.get("3").envelope_bytes == b"ENV" and box.get("3").diff_bytes == b"\x00\x01"
    assert [x.id for x in box.pending()] == ["update-000003"]
    with pytest.raises(StateError):
        box.create(sequence=3, payload_bytes=b"{}", diff_bytes=b"", summary={}, summary_text="")
    d = box.create(sequence=None, payload_bytes=b"{}", diff_bytes=b"", summary={},
                   summary_text="")
    assert d.id.startswith("dry-run-") and d.state == "dry-run"


# -- privacy guard ----------------------------------------------------------------------------

BASE = {
    "genes": [f"G{i}" for i in range(6)],
    "conditions": ["ref/a", "ref/b"],
    "tensors": {
        "enc.W_s": {"role": "condition", "axis": 1, "shape": [4, 2], "dtype": "float32"},
        "dec.W_s": {"role": "condition", "axis": 1, "shape": [3, 2], "dtype": "float32"},
        "enc.W_x": {"role": "frozen", "shape": [4, 6], "dtype": "float32"},
    },
}


def _payload_bytes(raw: bytes, tensors, *, site_id="site-a", conditions=("site-a/q",),
                   base_size=3, digest="sha256:" + "a" * 64, extra=None, drop=()) -> bytes:
    """A site update payload as a site builds it, optionally with a field added or removed."""
    from protocols.canonical import canonical_json
    from protocols.update import build_update_payload

    obj = build_update_payload(
        origin="test.example/log", site_id=site_id, site_key_id="b" * 64, sequence=1,
        base_size=base_size, base_root="c" * 64, base_digest=digest,
        new_conditions=list(conditions),
        diff={n: np.nan_to_num(t) for n, t in tensors.items()}, diff_bytes=raw,
    ).to_json_obj()
    for key in drop:
        obj.pop(key)
    obj.update(extra or {})
    return canonical_json(obj)


def _good(**over):
    from protocols.diff import diff_from_bytes, diff_to_bytes

    diff = {"enc.W_s": np.ones((4, 1), np.float32), "dec.W_s": np.ones((3, 1), np.float32)}
    diff.update(over.pop("diff", {}))
    raw = diff_to_bytes(diff)
    tensors = diff_from_bytes(raw, max_bytes=1 << 20)
    payload = _payload_bytes(raw, tensors, **over.pop("payload", {}))
    kw = dict(payload_bytes=payload, diff_bytes=raw, diff_tensors=tensors, base_manifest=BASE,
              new_conditions=["site-a/q"], base_size=3, base_digest="sha256:" + "a" * 64,
              policy=GuardPolicy(site_id="site-a"))
    kw.update(over)
    return kw


def test_guard_passes_exact_condition_slices():
    rep = check_outgoing(**_good())
    text = rep.render()
    assert "enc.W_s" in text and "4x1" in text and rep.diff_size > 0
    assert {t.name for t in rep.tensors} == {"enc.W_s", "dec.W_s"}
    assert set(rep.payload_fields) == set(PAYLOAD_SCHEMA)


def test_guard_whitelist_is_the_update_schema():
    """The fields that may leave are derived from the protocol's schema: every top-level field
    and every nested one, and nothing the schema lacks (a field added to the protocol is added
    here by the same change)."""
    assert {p.split(".")[0] for p in PAYLOAD_FIELDS} == set(PAYLOAD_SCHEMA)
    assert "base.digest" in PAYLOAD_FIELDS and "diff.tensors.<name>.l2" in PAYLOAD_FIELDS
    assert not {"n_cells", "stats", "note", "embedding", "labels"} & PAYLOAD_FIELDS


@pytest.mark.parametrize(
    "over, msg",
    [
        ({"diff": {"enc.W_x": np.ones((4, 6), np.float32)}}, "frozen"),
        ({"diff": {"cells.X": np.ones((140, 6), np.float32)}}, "undeclared"),
        ({"diff": {"enc.W_s": np.ones((4, 2), np.float32)}}, "shape"),
        ({"diff": {"enc.W_s": np.full((4, 1), np.nan, np.float32)}}, "NaN"),
        ({"diff": {"enc.W_s": np.full((4, 1), 1e9, np.float32)}}, "magnitude"),
        ({"payload": {"extra": {"embedding": [[0.1, 0.2]]}}}, "only these fields"),
        ({"payload": {"extra": {"stats": {"per_cell": list(range(5000))}}}}, "only these fields"),
        ({"payload": {"extra": {"n_cells": 140}}}, "only these fields"),
        ({"payload": {"drop": ["diff"]}}, "not a site update"),
        ({"payload": {"conditions": ["site-a/q"] * 2000}}, "per-cell or per-gene"),
        ({"payload": {"conditions": ["site-a/G0", "G1", "G2", "G3"]}}, "gene names"),
        ({"payload": {"site_id": "site-b", "conditions": ["site-b/q"]}}, "not this site"),
        ({"payload": {"base_size": 2}}, "base size"),
        ({"payload": {"digest": "sha256:" + "d" * 64}}, "base digest"),
        ({"new_conditions": ["site-b/q"]}, "namespace"),
    ],
)
def test_guard_refuses(over, msg):
    with pytest.raises(PrivacyGuardError, match=msg):
        check_outgoing(**_good(**over))


def test_guard_refuses_payload_describing_other_bytes():
    kw = _good()
    from protocols.diff import diff_to_bytes

    kw["diff_bytes"] = diff_to_bytes(
        {"enc.W_s": np.zeros((4, 1), np.float32), "dec.W_s": np.zeros((3, 1), np.float32)}
    )
    with pytest.raises(PrivacyGuardError, match="hash to"):
        check_outgoing(**kw)


# -- friendly data checks ---------------------------------------------------------------------


def _adata(n=60):
    rng = np.random.default_rng(0)
    a = ad.AnnData(X=sp.csr_matrix(rng.poisson(1.0, (n, 20)).astype(np.float32)))
    a.var_names = [f"GENE{i}" for i in range(20)]
    a.obs["batch"] = ["s1"] * (n // 2) + ["s2"] * (n - n // 2)
    return a


def test_gzipped_h5ad_is_read(tmp_path):
    a = _adata()
    a.write_h5ad(tmp_path / "q.h5ad")
    with open(tmp_path / "q.h5ad", "rb") as src, gzip.open(tmp_path / "q.h5ad.gz", "wb") as dst:
        dst.write(src.read())
    with open_query(tmp_path / "q.h5ad.gz") as b:
        assert b.n_obs == a.n_obs
    with open_query(tmp_path / "q.h5ad", backed=True) as b:
        assert b.isbacked
    (tmp_path / "x.csv").write_text("a,b\n")
    with pytest.raises(SiteDataError, match="not an HDF5"), open_query(tmp_path / "x.csv"):
        pass


def test_keygen_cli(tmp_path, capsys):
    from scarches_fl_cli.main import main

    assert main(["site", "keygen", "--out", str(tmp_path / "k")]) == 0
    out = capsys.readouterr().out
    assert "fingerprint" in out and "ed25519:" in out
    mode = stat.S_IMODE(os.stat(tmp_path / "k" / "site.key").st_mode)
    assert mode == 0o600
    assert (tmp_path / "k" / "site.pub").is_file()
    assert main(["site", "keygen", "--out", str(tmp_path / "k")]) != 0  # never overwrites


def test_map_query_reports_zero_count_cells_and_writes_outputs(reference_bundle, panc8, tmp_path):
    from scarches_fl.model import ReferenceModel
    from site_agent.mapping import map_query, write_mapped

    model = ReferenceModel.from_bundle(reference_bundle)
    full = ad.read_h5ad(panc8)
    q = full[full.obs["batch"] == "smartseq2"].copy()
    q.layers["counts"] = q.X.copy()
    x = q.layers["counts"].tolil()
    x[:3, :] = 0  # three cells without counts
    q.layers["counts"] = x.tocsr()
    q.X = sp.csr_matrix(np.log1p(q.layers["counts"].toarray()))  # X normalised, counts in a layer
    with pytest.raises(SiteDataError, match="--layer counts"):
        map_query(q, model, site_id="site-z", batch_key="batch", label_key="cell_type",
                  layer=None, batches=None, min_gene_coverage=0.5, label_threshold=0.5,
                  min_cells_per_batch=10, max_epochs=1, seed=0)
    out = map_query(q, model, site_id="site-z", batch_key="batch", label_key="cell_type",
                    layer="counts", batches=None, min_gene_coverage=0.5, label_threshold=0.5,
                    min_cells_per_batch=10, max_epochs=1, seed=0)
    assert out.n_zero_cells == 3 and any("zero total counts" in n for n in out.notes)
    assert out.new_conditions == ["site-z/smartseq2"]
    assert set(out.diff) == {n for n, s in model.to_bundle().manifest["tensors"].items()
                             if s["role"] == "condition"}
    write_mapped(out, tmp_path / "o.h5ad", provenance={"tree_size": 7})
    back = ad.read_h5ad(tmp_path / "o.h5ad")
    assert back.obsm["X_scarches"].shape[0] == q.n_obs
    assert back.uns["scarches_fl"]["tree_size"] == 7
    assert back.uns["scarches_fl"]["counts"] == "layers['counts']"
    assert "cell_type_pred" in back.obs and "cell_type_uncertainty" in back.obs


def test_backed_input_is_mapped_in_windows(reference_bundle, panc8, tmp_path):
    from scarches_fl.model import ReferenceModel
    from site_agent.mapping import map_query, open_query

    model = ReferenceModel.from_bundle(reference_bundle)
    full = ad.read_h5ad(panc8)
    full[full.obs["batch"] == "celseq2"].copy().write_h5ad(tmp_path / "q.h5ad")
    with open_query(tmp_path / "q.h5ad", backed=True) as q:
        assert q.isbacked
        out = map_query(q, model, site_id="site-z", batch_key="batch", label_key=None,
                        layer=None, batches=None, min_gene_coverage=0.5, label_threshold=0.5,
                        min_cells_per_batch=10, max_epochs=1, seed=0)
    assert out.adata.X is None and out.adata.obsm["X_scarches"].shape[0] == 140
    assert any("read backed" in n for n in out.notes)


def test_cli_flags_win_over_the_yaml_file(tmp_path):
    from scarches_fl_cli.main import build_parser
    from scarches_fl_cli.site import _config

    cfg = tmp_path / "site.yaml"
    cfg.write_text("coordinator: 127.0.0.1:7443\nsite_id: hospital-a\nbatch_key: batch\n"
                   "state: st\nthresholds:\n  label_uncertainty: 0.3\n")
    args = build_parser().parse_args(["site", "map", "--config", str(cfg), "--site-id",
                                      "hospital-b", "--batches", "a,b", "--dry-run"])
    c = _config(args)
    assert c.coordinator == "127.0.0.1:7443" and c.site_id == "hospital-b"
    assert c.state == tmp_path / "st" and c.batches == ("a", "b")
    assert c.thresholds.label_uncertainty == 0.3 and c.insecure is False
    with pytest.raises(ConfigError, match="--trust"):
        c.require("trust")


def test_status_tells_a_label_contribution_from_a_condition_update():
    from site_agent.status import render_status

    text = render_status({
        "state": "/srv/site/state", "last_sequence": 2, "outbox": {},
        "contributions": [
            {"outbox_id": "update-000001", "sequence": 1, "leaf_index": 3, "tree_size": 4,
             "new_conditions": ["site-a/q"]},
            {"outbox_id": "update-000002", "sequence": 2, "leaf_index": 7, "tree_size": 8,
             "kind": "label_contribution", "label_types": ["ductal", "beta"],
             "new_conditions": []},
        ],
    })
    assert "update-000001: sequence 1, log index 3 (tree size 4), conditions: site-a/q" in text
    assert "update-000002: sequence 2, log index 7 (tree size 8), label prototypes: ductal, beta" in text
