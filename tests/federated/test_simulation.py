"""Flower Simulation Engine, 3 and 10 virtual sites holding the panc8 reference studies: the
federated reference maps the panc8 query as well as a reference trained centrally on the pooled
studies with the same epoch budget; tampered and failing contributions are excluded and
recorded; the signed round records verify end to end."""

from __future__ import annotations

import json

import numpy as np
import pytest

pytestmark = [pytest.mark.flower, pytest.mark.timeout(900)]

REFERENCE = ["celseq", "fluidigmc1", "indrop1", "indrop2", "indrop3", "indrop4"]
QUERY = ["celseq2", "smartseq2"]
ROUNDS, LOCAL_EPOCHS = 10, 5  # central budget: ROUNDS * LOCAL_EPOCHS epochs


@pytest.fixture(scope="module")
def panc8(shared_data):
    import anndata as ad

    a = ad.read_h5ad(shared_data / "panc8_sub_nebula.h5ad")
    assert sorted(set(a.obs["batch"].astype(str))) == sorted(REFERENCE + QUERY)
    return a


def _query_accuracy(model, panc8, ref_latent, ref_labels):
    from sklearn.neighbors import KNeighborsClassifier

    q = panc8[panc8.obs["batch"].isin(QUERY)].copy()
    res = model.surgery(q, batch_key="batch", namespace="query", progress=False, seed=0)
    knn = KNeighborsClassifier(n_neighbors=15).fit(ref_latent, ref_labels)
    return float(np.mean(knn.predict(res.latent) == q.obs["cell_type"].astype(str).values))


@pytest.fixture(scope="module")
def central_accuracy(panc8):
    from scarches_fl.model import ReferenceModel

    ref = panc8[panc8.obs["batch"].isin(REFERENCE)].copy()
    budget = ROUNDS * LOCAL_EPOCHS
    model = ReferenceModel.train_reference(
        ref, batch_key="batch", max_epochs=budget, kl_warmup_epochs=budget // 2,
        early_stopping=False, progress=False, seed=0)
    z = model.get_latent(ref, batch_key="batch", namespace="ref")
    return _query_accuracy(model, panc8, z, ref.obs["cell_type"].astype(str).values)


def _federated_accuracy(out, panc8):
    from scarches_fl.model import ReferenceModel

    model = ReferenceModel.from_bundle(out)
    plan = json.loads((out / "federation" / "site-plan.json").read_text())
    zs, ys = [], []
    for site, studies in plan.items():
        for study, rows in studies.items():
            sub = panc8[rows].copy()
            sub.obs["batch"] = study
            zs.append(model.get_latent(sub, batch_key="batch", namespace=site))
            ys.append(sub.obs["cell_type"].astype(str).values)
    return _query_accuracy(model, panc8, np.concatenate(zs), np.concatenate(ys))


def _verify_records(out):
    """With the keys of the simulation's own ledger (its default place), the one trust root."""
    from coordinator.federated_files import verify_run_directory
    from coordinator.federated_ledger import federation_keys

    keys = federation_keys(out / "federation" / "coordinator")
    return verify_run_directory(out / "federation", site_keys=keys.site_keys,
                                coordinator_key=keys.operator_keys, bundle=out)


@pytest.mark.slow  # a Flower simulation of the whole run: about 30 s on 2 cores
def test_three_sites_match_central_and_exclude_tampered_and_failed(
        tmp_path, panc8, shared_data, central_accuracy, capsys):
    from protocols.bundle import read_bundle
    from scarches_fl_cli.federated_simulation import simulate
    from tests.federated import _faults as faults

    out = tmp_path / "fed3"
    result = simulate(
        shared_data / "panc8_sub_nebula.h5ad", batch_key="batch", label_key="cell_type",
        n_sites=3, rounds=ROUNDS, out=out, batches=REFERENCE, local_epochs=LOCAL_EPOCHS,
        patience=ROUNDS, seed=0,
        client_mods=[faults.tamper(1, 2), faults.fail(2, 1)])
    # Each study at exactly one site; conditions namespaced by the site holding them.
    plan = json.loads((out / "federation" / "site-plan.json").read_text())
    assert sorted(s for st in plan.values() for s in st) == REFERENCE
    bundle = read_bundle(out)
    assert bundle.digest == result.bundle_digest
    # --label-key: the bundle carries prototypes built from the sites' signed statistics.
    level = bundle.manifest["labels"]["levels"]["cell_type"]["prototype"]
    # k = 5 pooled (ADR 0039): every type some site holds 5 cells of (macrophage, 5 cells at
    # one site, among them); schwann (1 cell) is in no share
    assert min(level["type_cell_counts"].values()) == 5
    assert "macrophage" in level["classes"] and "schwann" not in level["classes"]
    assert sorted(bundle.conditions) == sorted(
        f"{site}/{s}" for site, st in plan.items() for s in st)
    r1, r2, r3 = result.rounds[:3]
    # Round 1: site-2 failed; the round completed with the others and says who contributed.
    assert [c["site_id"] for c in r1.contributors] == ["site-0", "site-1"]
    assert [(e["site_id"], e["reason"]) for e in r1.excluded] == [("site-2", "site_error")]
    # Round 2: site-1's contribution was altered after signing: excluded, recorded.
    assert [(e["site_id"], e["reason"]) for e in r2.excluded] == [("site-1", "bad_signature")]
    assert "site-1" not in [c["site_id"] for c in r2.contributors]
    # Both come back in the next round.
    assert [c["site_id"] for c in r3.contributors] == ["site-0", "site-1", "site-2"]
    report = _verify_records(out)
    assert report.rounds == len(result.rounds) and report.final_digest == bundle.digest
    assert {(e["round"], e["site_id"]) for e in report.excluded} == {(1, "site-2"),
                                                                      (2, "site-1")}
    fed = _federated_accuracy(out, panc8)
    print(f"3 sites: federated {fed:.3f}, central {central_accuracy:.3f}")
    assert fed >= central_accuracy - 0.02
    _publish_and_audit(tmp_path, out, result, capsys)


def _publish_and_audit(tmp_path, out, result, capsys):
    """The run becomes ledger entries (genesis = initial model and the enrolments, made by the
    simulation before training; one federated_round per round up to the chosen one, then the
    run's label knowledge as one federated_labels entry) and the auditor's replay ends in the
    federated bundle."""
    from coordinator.federated_ledger import publish_run
    from protocols.bundle import read_bundle
    from scarches_fl_cli.main import main

    records = out / "federation"
    state = records / "coordinator"
    entries = publish_run(state, records)
    kinds = ["federated_round"] * result.final_round + ["federated_labels"]
    assert [e.kind for e in entries] == kinds
    capsys.readouterr()
    assert main(["audit", "--ledger", str(state), "--trust", str(state / "trust.json"),
                 "--state", str(tmp_path / "auditor")]) == 0
    report = capsys.readouterr().out
    assert "VERIFIED" in report and read_bundle(out).digest in report


@pytest.mark.slow  # a Flower simulation of the whole run: about 30 s on 2 cores
def test_ten_sites_match_central(tmp_path, panc8, shared_data, central_accuracy):
    from scarches_fl_cli.federated_simulation import simulate

    out = tmp_path / "fed10"
    result = simulate(
        shared_data / "panc8_sub_nebula.h5ad", batch_key="batch", label_key="cell_type",
        n_sites=10, rounds=ROUNDS, out=out, batches=REFERENCE, local_epochs=LOCAL_EPOCHS,
        patience=ROUNDS, seed=0)
    assert len(result.sites) == 10
    assert all(len(r.contributors) == 10 and not r.excluded for r in result.rounds)
    assert _verify_records(out).contributions_verified == 10 * len(result.rounds)
    fed = _federated_accuracy(out, panc8)
    print(f"10 sites: federated {fed:.3f}, central {central_accuracy:.3f}")
    assert fed >= central_accuracy - 0.02
