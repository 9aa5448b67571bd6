"""The ServerApp's round logic (Flower's Strategy.start driving OwnedColumnsFedAvg) on an
in-process grid (no Ray, no SuperLink): a site that never answers is recorded as missing and the
round completes with the others; a correctly signed contribution with the wrong tensor shapes is
excluded; the unsigned num-examples metric does not weigh the average; the records verify."""

from __future__ import annotations

import json

import numpy as np
import pytest

pytestmark = [pytest.mark.flower, pytest.mark.timeout(300)]

SITES = {"s-a": ["indrop3"], "s-b": ["celseq", "fluidigmc1"], "s-c": ["indrop4"]}


class InProcessGrid:
    """Delivers each message to a site's handler in this process; ``silent`` sites never
    answer (as a SuperNode that went away), ``mutate`` rewrites a site's reply."""

    def __init__(self, configs, *, silent=(), mutate=None):
        self.nodes = {i + 1: cfg for i, cfg in enumerate(configs)}
        self.silent = set(silent)
        self.mutate = mutate or {}
        self.timeouts = []

    def get_node_ids(self):
        return list(self.nodes)

    def send_and_receive(self, messages, *, timeout=None):
        from site_agent import federated_client as C

        self.timeouts.append(timeout)
        replies = []
        for m in messages:
            cfg = self.nodes[m.metadata.dst_node_id]
            if cfg.site_id in self.silent:
                continue
            handler = {
                "query": C._describe, "train": C._train, "evaluate": C._evaluate,
                "query.label_statistics": lambda c, m: C._label_share(c, m, "label_statistics"),
                "query.label_calibration": lambda c, m: C._label_share(c, m, "label_calibration"),
                **{
                    f"query.{t}": (lambda c, m, t=t: C._expression_share(c, m, t))
                    for t in ("expression_moments", "expression_statistics",
                              "expression_calibration")
                },
            }
            reply = handler[m.metadata.message_type](cfg, m)
            if cfg.site_id in self.mutate and m.metadata.message_type == "train":
                reply = self.mutate[cfg.site_id](cfg, m, reply)
            replies.append(reply)
        return replies


@pytest.fixture(autouse=True)
def _task_identity(monkeypatch):
    """Messages built outside a Flower runtime need the process's task identity (what the
    SuperLink or the Simulation Engine sets)."""
    from flwr.supercore.task_identity import TaskIdentity

    monkeypatch.setattr(TaskIdentity, "_task_id", 1)
    monkeypatch.setattr(TaskIdentity, "_run_id", 1)
    monkeypatch.setattr(TaskIdentity, "_node_id", 0)


@pytest.fixture(scope="module")
def site_configs(tmp_path_factory, shared_data):
    import anndata as ad

    from protocols.keys import generate_private_key, save_private_key
    from site_agent.federated_client import FederatedSiteConfig

    tmp = tmp_path_factory.mktemp("sites")
    a = ad.read_h5ad(shared_data / "panc8_sub_nebula.h5ad")
    configs, keys = [], {}
    for site, studies in SITES.items():
        a[a.obs["batch"].isin(studies)].copy().write_h5ad(tmp / f"{site}.h5ad")
        k = generate_private_key()
        save_private_key(k, tmp / f"{site}.key")
        keys[site] = k.public_key()
        configs.append(FederatedSiteConfig(site_id=site, data_path=str(tmp / f"{site}.h5ad"),
                                  batch_key="batch", site_key_path=str(tmp / f"{site}.key")))
    return configs, keys


def _settings(tmp_path, keys, **kw):
    from coordinator.federated_server import FederationSettings
    from protocols.keys import generate_private_key

    ck = generate_private_key()
    fields = dict(rounds=2, local_epochs=1, n_hidden=16, n_latent=4, round_timeout=7.5,
                  min_sites=2, wait_for_sites=0.0)
    return FederationSettings(
        out_dir=str(tmp_path / "records"), bundle_dir=str(tmp_path / "bundle"), site_keys=keys,
        coordinator_key=ck, **{**fields, **kw}), ck


def _resign_with_bad_shape(cfg, message, reply):
    """The site itself sends (and signs) a W_s block with one column too many."""
    from flwr.app import Array, ArrayRecord, ConfigRecord, Message, RecordDict

    from protocols.federated import (
        CONTRIBUTION_PAYLOAD_TYPE,
        peek_payload,
        sign_payload,
        tensor_digest,
    )
    from protocols.keys import load_private_key

    arrays = {k: a.numpy() for k, a in reply.content.array_records["arrays"].items()}
    w = arrays["encoder.layers.0.weight_s"]
    arrays["encoder.layers.0.weight_s"] = np.concatenate([w, w[:, :1]], axis=1)
    payload = peek_payload(bytes(reply.content.config_records["signature"]["envelope"]))
    payload["contribution_digest"] = tensor_digest(arrays)
    env = sign_payload(load_private_key(cfg.site_key_path), CONTRIBUTION_PAYLOAD_TYPE, payload)
    return Message(content=RecordDict({
        "arrays": ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in arrays.items()}),
        "metrics": reply.content.metric_records["metrics"],
        "signature": ConfigRecord({"envelope": env})}), reply_to=message)


def test_strategy_is_a_flower_fedavg():
    from flwr.serverapp.strategy import FedAvg

    from coordinator.federated_strategy import OwnedColumnsFedAvg

    assert issubclass(OwnedColumnsFedAvg, FedAvg)


def _inflate_metric(cfg, message, reply):
    """The site claims a million cells in the unsigned metric record (FedAvg's weight key)."""
    from flwr.app import MetricRecord

    reply.content.metric_records["metrics"] = MetricRecord({"num-examples": 10**6})
    return reply


def test_unsigned_metric_does_not_weigh_the_average(tmp_path, site_configs, monkeypatch):
    from coordinator.federated_server import run_federation
    from protocols.bundle import read_bundle
    from scarches_fl import _federated as F

    configs, keys = site_configs
    settings, _ = _settings(tmp_path, keys, rounds=1, keep_models=True)
    grid = InProcessGrid(configs[:2], mutate={"s-a": _inflate_metric})
    seen = {}
    real = F.aggregate

    def spy(global_tensors, contributions, *args, **kw):
        seen["n_train"] = {c.site_id: c.n_train for c in contributions}
        return real(global_tensors, contributions, *args, **kw)

    monkeypatch.setattr(F, "aggregate", spy)
    result = run_federation(grid, settings)
    signed = {c["site_id"]: c["n_train"] for c in result.rounds[0].contributors}
    assert seen["n_train"] == signed and signed["s-a"] < 10**6
    assert read_bundle(tmp_path / "records" / "models" / "round-0001").digest == (
        result.rounds[0].aggregate_digest)


def test_silent_site_is_missing_and_bad_shapes_are_excluded(tmp_path, site_configs):
    from coordinator.federated_files import verify_run_directory
    from coordinator.federated_server import run_federation
    from protocols.bundle import read_bundle

    configs, keys = site_configs
    settings, ck = _settings(tmp_path, keys)
    grid = InProcessGrid(configs, mutate={"s-b": _resign_with_bad_shape})
    # s-c describes itself, then goes silent for round 1 and comes back for round 2.
    calls = {"n": 0}
    original = grid.send_and_receive

    def flaky(messages, *, timeout=None):
        messages = list(messages)
        kinds = {m.metadata.message_type for m in messages}
        if "train" in kinds:
            calls["n"] += 1
            grid.silent = {"s-c"} if calls["n"] == 1 else set()
        return original(messages, timeout=timeout)

    grid.send_and_receive = flaky
    result = run_federation(grid, settings)
    # Flower drove the rounds through the Strategy: one train exchange per round and a single
    # evaluate exchange, for the final aggregate (the empty ones send nothing).
    assert calls["n"] == 2
    r1, r2 = result.rounds
    assert r1.missing == ["s-c"]
    assert [c["site_id"] for c in r1.contributors] == ["s-a"]
    assert [(e["site_id"], e["reason"]) for e in r1.excluded] == [("s-b", "wrong_tensors")]
    assert [c["site_id"] for c in r2.contributors] == ["s-a", "s-c"]
    assert all(t == settings.round_timeout for t in grid.timeouts[1:])
    # The records verify; the bundle is the chosen aggregate.
    report = verify_run_directory(tmp_path / "records", site_keys=keys,
                                  coordinator_key=ck.public_key(), bundle=tmp_path / "bundle")
    assert report.final_digest == read_bundle(tmp_path / "bundle").digest
    summary = json.loads((tmp_path / "records" / "federation-summary.json").read_text())
    assert summary["rounds"][0]["missing"] == ["s-c"]


def test_label_key_gives_the_bundle_prototypes_from_signed_site_statistics(
        tmp_path, site_configs, monkeypatch):
    """With a label key, training ends with the label exchanges: the bundle carries one
    prototype per type with k cells pooled, built from every site's signed share; the records
    verify, and a bundle whose label knowledge was altered does not."""
    from coordinator.federated_files import verify_run_directory
    from coordinator.federated_server import run_federation
    from protocols.bundle import read_bundle, write_bundle
    from protocols.federated import FederationError, peek_payload

    configs, keys = site_configs
    settings, ck = _settings(tmp_path, keys, rounds=1, label_key="cell_type")
    result = run_federation(InProcessGrid(configs), settings)
    bundle = read_bundle(tmp_path / "bundle")
    level = bundle.manifest["labels"]["levels"]["cell_type"]["prototype"]
    record = peek_payload((tmp_path / "records" / "rounds" / "labels.json").read_bytes())
    assert record["kept"] == level["classes"] and len(level["classes"]) >= 3
    # k on the pooled count (default 5, ADR 0039): every type the shares carry 5 cells of,
    # including types under 20 pooled cells
    k = settings.label_min_cells
    assert level["classes"] == sorted(t for t, n in record["types"].items() if n >= k)
    assert min(level["type_cell_counts"].values()) < 20
    assert {s["site_id"] for s in record["shares"]} == {"s-a", "s-b", "s-c"}
    for share in record["shares"]:
        if share["task"] == "label_statistics":
            assert all(n >= settings.label_site_floor for n in share["cells"].values())
    report = verify_run_directory(tmp_path / "records", site_keys=keys,
                                  coordinator_key=ck.public_key(), bundle=tmp_path / "bundle")
    assert report.final_digest == bundle.digest == result.bundle_digest
    assert report.label_shares_from == ["s-a", "s-b", "s-c"]
    # the floors the bundle was built under, as the signed record names them (ADRs 0038-0039)
    assert report.label_floors == {"min_cells": 5, "site_floor": 5}
    # verify recomputed the latent prototypes from the stored shares; one flipped byte in a
    # stored statistics share fails it
    stored = tmp_path / "records" / "rounds" / "labels.s-a.label_statistics.safetensors"
    original = stored.read_bytes()
    stored.write_bytes(original[:-1] + bytes([original[-1] ^ 1]))
    with pytest.raises(FederationError, match="not the one its site signed"):
        verify_run_directory(tmp_path / "records", site_keys=keys,
                             coordinator_key=ck.public_key(), bundle=tmp_path / "bundle")
    stored.write_bytes(original)
    # Swap two prototypes' labels and rewrite the bundle (valid digest, wrong knowledge).
    from protocols.bundle import make_bundle

    manifest = {k: v for k, v in bundle.manifest.items() if k != "digest"}
    protos = manifest["labels"]["levels"]["cell_type"]["prototype"]["prototypes"]
    protos[0]["label"], protos[1]["label"] = protos[1]["label"], protos[0]["label"]
    write_bundle(tmp_path / "forged", make_bundle(manifest, dict(bundle.tensors)))
    with pytest.raises(FederationError, match="label knowledge"):
        verify_run_directory(tmp_path / "records", site_keys=keys,
                             coordinator_key=ck.public_key(), bundle=tmp_path / "forged")
    # the replay catches it without the digest check (a coordinator that signed prototypes the
    # shares do not give)
    import coordinator.federated_files as FF

    monkeypatch.setattr(FF, "_check_labelled_bundle", lambda *_a: None)
    with pytest.raises(FederationError, match="latent prototypes are not what"):
        verify_run_directory(tmp_path / "records", site_keys=keys,
                             coordinator_key=ck.public_key(), bundle=tmp_path / "forged")


def test_label_key_gives_the_bundle_expression_prototypes_from_site_sums(
        tmp_path, site_configs, monkeypatch):
    """With a label key the bundle also carries expression prototypes built from the sites'
    signed sums (ADR 0037), so that map's default rule reads it; every share is in the record,
    verify recomputes the expression prototypes from the stored shares and catches a flipped byte
    in one,
    each type's and batch's sums a site sent cover at least the site floor of cells, and a bundle
    whose expression tensors were altered does not verify."""
    from coordinator.federated_files import verify_run_directory
    from coordinator.federated_server import run_federation
    from protocols.bundle import make_bundle, read_bundle, write_bundle
    from protocols.federated import FederationError, peek_payload
    from scarches_fl.refine import has_expression_prototypes

    configs, keys = site_configs
    settings, ck = _settings(tmp_path, keys, rounds=1, label_key="cell_type")
    run_federation(InProcessGrid(configs), settings)
    bundle = read_bundle(tmp_path / "bundle")
    labels = bundle.manifest["labels"]
    assert has_expression_prototypes(labels, bundle.tensors, "cell_type")
    level = labels["levels"]["cell_type"]
    assert level["expression"]["classes"] == level["prototype"]["classes"]
    record = peek_payload((tmp_path / "records" / "rounds" / "labels.json").read_bytes())
    assert record["expression"]["classes"] == level["expression"]["classes"]
    tasks = {(s["site_id"], s["task"]) for s in record["shares"]}
    for task in ("expression_moments", "expression_statistics", "expression_calibration"):
        assert {site for site, t in tasks if t == task} == {"s-a", "s-b", "s-c"}
    for site in ("s-a", "s-b", "s-c"):
        share = peek_payload(
            (tmp_path / "records" / "rounds" / f"labels.{site}.expression_statistics.json")
            .read_bytes())
        kinds = {json.loads(n)[0] for n in share["types"]}
        assert kinds == {"type", "batch"}  # per-type and per-batch sums, never per group
    # verify replays the coordinator's arithmetic on the stored shares (torch-free)
    verify_run_directory(tmp_path / "records", site_keys=keys, coordinator_key=ck.public_key(),
                         bundle=tmp_path / "bundle")
    stored = tmp_path / "records" / "rounds" / "labels.s-b.expression_statistics.safetensors"
    original = stored.read_bytes()
    flipped = bytearray(original)
    flipped[-1] ^= 1  # one byte of the last array
    stored.write_bytes(bytes(flipped))
    with pytest.raises(FederationError, match="not the one its site signed"):
        verify_run_directory(tmp_path / "records", site_keys=keys,
                             coordinator_key=ck.public_key(), bundle=tmp_path / "bundle")
    stored.write_bytes(original)
    manifest = {k: v for k, v in bundle.manifest.items() if k != "digest"}
    tensors = dict(bundle.tensors)
    name = level["expression"]["means_tensor"]
    tensors[name] = tensors[name].copy()
    tensors[name].reshape(-1).view(np.uint8)[0] ^= 1  # one flipped byte
    write_bundle(tmp_path / "forged", make_bundle(manifest, tensors))
    with pytest.raises(FederationError, match="expression prototypes"):
        verify_run_directory(tmp_path / "records", site_keys=keys,
                             coordinator_key=ck.public_key(), bundle=tmp_path / "forged")
    # the replay catches what the digest check cannot, prototypes a coordinator computed
    # wrongly and signed: with the digest check switched off, a bundle whose type means moved
    import coordinator.federated_files as FF

    monkeypatch.setattr(FF, "_check_labelled_bundle", lambda *_a: None)
    tensors[name] = bundle.tensors[name] + np.float32(0.5)
    write_bundle(tmp_path / "forged", make_bundle(manifest, tensors))
    with pytest.raises(FederationError, match="not what the sites' signed shares give"):
        verify_run_directory(tmp_path / "records", site_keys=keys,
                             coordinator_key=ck.public_key(), bundle=tmp_path / "forged")


def _ignoring_the_minimum(cfg):
    """A site whose agent ignores every per-site minimum (its own and the federation's)."""
    from dataclasses import fields

    from site_agent.federated_client import FederatedSiteConfig

    careless = type("Careless", (FederatedSiteConfig,), {"site_floor": lambda self, c: 1})
    return careless(**{f.name: getattr(cfg, f.name) for f in fields(cfg)})


def test_a_label_share_below_the_site_minimum_is_rejected_with_its_reason_code(
        tmp_path, site_configs):
    """ADR 0038: s-b sends (and signs) per-type statistics over 1-3 of its cells; the
    coordinator excludes that share with E_LABEL_SHARE_MINIMUM, pools the others, and the
    records verify."""
    from coordinator.federated_files import verify_run_directory
    from coordinator.federated_server import run_federation
    from protocols.bundle import read_bundle
    from protocols.federated import peek_payload

    configs, keys = site_configs
    settings, ck = _settings(tmp_path, keys, rounds=1, label_key="cell_type")
    grid = InProcessGrid([configs[0], _ignoring_the_minimum(configs[1]), configs[2]])
    run_federation(grid, settings)
    record = peek_payload((tmp_path / "records" / "rounds" / "labels.json").read_bytes())
    rejected = [e for e in record["excluded"] if e["site_id"] == "s-b"]
    assert ("label_statistics", "below_site_minimum", "E_LABEL_SHARE_MINIMUM") in {
        (e["task"], e["reason"], e.get("reason_code")) for e in rejected}
    assert "per-site minimum of 5" in rejected[0]["detail"]
    stats_from = {s["site_id"] for s in record["shares"] if s["task"] == "label_statistics"}
    assert stats_from == {"s-a", "s-c"}
    assert not (tmp_path / "records" / "rounds" / "labels.s-b.label_statistics.json").exists()
    report = verify_run_directory(tmp_path / "records", site_keys=keys,
                                  coordinator_key=ck.public_key(), bundle=tmp_path / "bundle")
    assert report.final_digest == read_bundle(tmp_path / "bundle").digest
    assert report.label_shares_from == ["s-a", "s-c"]


def test_a_type_below_the_site_minimum_never_leaves_and_verify_holds_the_record_to_it(
        tmp_path, site_configs):
    """The coordinator asks for a minimum of 1: s-a (its own minimum, 5, the default) still
    sends no group of fewer than 5 of its cells in any label exchange; s-b, which ignores it,
    does, and the coordinator (minimum 1) pools it. A label record that then claims a minimum
    of 5 (re-signed by the coordinator) fails ``federate verify`` on that stored share."""
    import safetensors.numpy as stn

    from coordinator.federated_files import verify_run_directory
    from coordinator.federated_server import run_federation
    from protocols.federated import (
        LABELS_PAYLOAD_TYPE,
        RUN_PAYLOAD_TYPE,
        ContributionRejected,
        envelope_sha256,
        peek_payload,
        share_groups,
        sign_payload,
    )

    configs, keys = site_configs
    settings, ck = _settings(tmp_path, keys, rounds=1, label_key="cell_type",
                             label_site_floor=1, label_min_cells=5)
    grid = InProcessGrid([configs[0], _ignoring_the_minimum(configs[1]), configs[2]])
    run_federation(grid, settings)
    rounds = tmp_path / "records" / "rounds"
    record = peek_payload((rounds / "labels.json").read_bytes())
    assert record["site_floor"] == 1 and not record["excluded"]
    smallest = {}
    for share in record["shares"]:
        arrays = stn.load((rounds / f"labels.{share['site_id']}.{share['task']}.safetensors")
                          .read_bytes())
        sizes = [n for _what, n in share_groups(share["task"], arrays)]
        smallest[share["site_id"]] = min(sizes + [smallest.get(share["site_id"], 1e9)])
    assert smallest["s-a"] >= 5 and smallest["s-c"] >= 5
    assert smallest["s-b"] < 5  # the careless site's 1-cell types
    verify_run_directory(tmp_path / "records", site_keys=keys, coordinator_key=ck.public_key(),
                         bundle=tmp_path / "bundle")
    # the same shares under a record that claims the default minimum
    claimed = sign_payload(ck, LABELS_PAYLOAD_TYPE, {**record, "site_floor": 5})
    (rounds / "labels.json").write_bytes(claimed)
    run = peek_payload((rounds / "run.json").read_bytes())
    run["final"]["labels"]["record_sha256"] = envelope_sha256(claimed)
    (rounds / "run.json").write_bytes(sign_payload(ck, RUN_PAYLOAD_TYPE, run))
    with pytest.raises(ContributionRejected, match="share of s-b") as exc:
        verify_run_directory(tmp_path / "records", site_keys=keys,
                             coordinator_key=ck.public_key(), bundle=tmp_path / "bundle")
    assert exc.value.reason_code == "E_LABEL_SHARE_MINIMUM"
