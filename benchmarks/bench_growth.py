"""Growth benchmark: a cell type the genesis reference lacks, learnt through the ledger.

A type is removed from the genesis reference. Site A holds it (labelled), maps onto the
reference and contributes its label prototypes (``site map --contribute-labels``: the same
``site_agent.labels`` and ``protocols.labels`` code, through a real ``LedgerState``: genesis,
enrolment, a signed ``label_contribution``, the operator's ``label-policy accept``). Site C,
also holding the type, maps onto the same reference. We measure at site C:

* ``new_before`` / ``new_after``: the fraction of C's cells of the type called by its name with the
  genesis labels, and with the label knowledge after A's contribution (``Unknown`` is wrong);
* ``known_before`` / ``known_after``: the same for C's cells of every other type;
* ``new_after_new_only`` / ``known_after_new_only``: the same when site A sends the new type's
  prototype only (not its prototypes of types the reference knows): where a loss comes from;
* ``new_own_upper``: the new type's accuracy if C's own cells of the type were the contributed
  prototype (no site shift between A and C): what the latent geometry allows at best;
* the same after A's contribution under the Gaussian mechanism at epsilon 4 and 1 (delta 1e-5;
  clip norm stated per dataset from public genesis numbers: the largest genesis prototype norm
  plus two pooled standard deviations).

Datasets (``--dataset``): ``cellbench5`` (CellBench 5-line, type A549: genesis = CEL-seq2 3-line
plate + 5-line plate 1 without A549, site A = plate 2, site C = plate 3) and ``panc8`` (type
ductal: genesis = inDrop 1, 2, 4 + CEL-seq + Fluidigm C1 without ductal, site A = inDrop 3 (30
ductal cells), site C = Smart-seq2 (39)).

Prints a table and writes ``benchmarks/results/growth_<dataset>.json`` (mean [min-max] over
seeds, every seed's figures, the machine load).

    python benchmarks/bench_growth.py --dataset cellbench5 --n-top-genes 2000 --seeds 0 1 2 3 4
    python benchmarks/bench_growth.py --dataset panc8 --seeds 0 1 2 3 4
    python benchmarks/bench_growth.py --plot benchmarks/results/growth_cellbench5.json \
        benchmarks/results/growth_panc8.json
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import logging
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks._results import machine, save  # noqa: E402

logger = logging.getLogger("bench_growth")
BATCH, LABEL = "batch", "cell_type"
ORIGIN = "bench.scarches-fl/growth"
DATASETS = {
    "cellbench5": {
        "file": "cellbench_celllines.h5ad",
        "genesis": ["CELseq2_3cl", "CELseq2_5cl_p1"],
        "site_a": ["CELseq2_5cl_p2"],
        "site_c": ["CELseq2_5cl_p3"],
        "type": "A549",
    },
    "panc8": {
        "file": "panc8_sub_nebula.h5ad",
        "genesis": ["indrop1", "indrop2", "indrop4", "celseq", "fluidigmc1"],
        "site_a": ["indrop3"],
        "site_c": ["smartseq2"],
        "type": "ductal",
    },
}
EPSILONS = (4.0, 1.0)
DELTA = 1e-5


def shared_data_dir() -> Path:
    for cand in (os.environ.get("SCARCHES_FL_SHARED"), ROOT.parent / "shared", ROOT / "shared"):
        if cand and (Path(cand) / "data").is_dir():
            return Path(cand) / "data"
    raise SystemExit("shared/data not found beside the checkout; set SCARCHES_FL_SHARED")


def split(name: str):
    import anndata as ad

    spec = DATASETS[name]
    adata = ad.read_h5ad(shared_data_dir() / spec["file"])
    adata.obs[BATCH] = adata.obs[BATCH].astype(str)
    adata.obs[LABEL] = adata.obs[LABEL].astype(str)
    b, y = adata.obs[BATCH], adata.obs[LABEL]
    genesis = adata[(b.isin(spec["genesis"]) & (y != spec["type"])).to_numpy()].copy()
    site_a = adata[b.isin(spec["site_a"]).to_numpy()].copy()
    site_c = adata[b.isin(spec["site_c"]).to_numpy()].copy()
    return genesis, site_a, site_c


class _Ledger:
    """A real ledger state: genesis, two enrolled sites, contributions and policy entries."""

    def __init__(self, bundle: Any) -> None:
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

        from protocols.checkpoint import NoteSigner
        from protocols.ledger import LedgerState, enrol_entry, make_genesis
        from protocols.policy import build_trust

        self.operator = Ed25519PrivateKey.generate()
        log = NoteSigner(ORIGIN, os.urandom(32))
        trust = build_trust(
            origin=ORIGIN,
            log_public_key=log.verifier.vkey,
            operator_keys=[self.operator.public_key()],
        )
        self.state = LedgerState(trust)
        self.blobs: dict[str, bytes] = {}
        g = make_genesis(bundle, origin=ORIGIN, operator_keys=[self.operator])
        self.blobs.update(g.blobs)
        self.state.apply(g.envelope, self.blobs.get)
        self.sites = {s: Ed25519PrivateKey.generate() for s in ("site-a", "site-c")}
        for s, k in self.sites.items():
            self.state.apply(
                enrol_entry(
                    origin=ORIGIN,
                    site_id=s,
                    public_key=k.public_key(),
                    operator_keys=[self.operator],
                ),
                self.blobs.get,
            )
        self.base = self.state.size
        self.seq = {s: 0 for s in self.sites}

    def policy(self, **kw: Any) -> None:
        from protocols.labels import LabelPolicyChange, label_policy_entry

        if "settings" in kw:
            change = LabelPolicyChange("settings", ORIGIN, settings=kw["settings"])
        else:
            change = LabelPolicyChange(
                kw["action"], ORIGIN, label_key=LABEL, name=kw["name"], target=kw["target"]
            )
        self.state.apply(label_policy_entry(change, [self.operator]), self.blobs.get)

    def contribute(self, site: str, contrib: Any) -> int:
        from protocols.keys import key_id
        from protocols.labels import build_contribution_payload, sign_contribution

        self.seq[site] += 1
        st = self.state
        payload = build_contribution_payload(
            origin=ORIGIN,
            site_id=site,
            site_key_id=key_id(self.sites[site]),
            sequence=self.seq[site],
            base_size=self.base,
            base_root=st.root_at(self.base),
            base_digest=st.digest_at(self.base),
            label_key=LABEL,
            prototypes=contrib.prototypes,
            privacy=contrib.privacy,
        )
        return st.apply(sign_contribution(payload, self.sites[site]), self.blobs.get).index


def clip_norm_from_genesis(labels: dict) -> float:
    """The operator's clip norm, from public genesis numbers only."""
    proto = labels["levels"][LABEL]["prototype"]
    norms = [float(np.linalg.norm(p["mean"])) for p in proto["prototypes"]]
    spread = math.sqrt(float(np.trace(np.asarray(proto["shared_covariance"]))))
    return float(round(max(norms) + 2.0 * spread, 2))


def second_pass_geometry(
    knowledge: dict,
    tensors: dict,
    scores: np.ndarray,
    batches: np.ndarray,
    truth: np.ndarray,
    held: str,
) -> dict:
    """Why the new type is or is not named at site C, read off the expression rule's second
    pass (``scarches_fl.refine.contributed_pass``, the one the default rule runs): for each of
    C's cells of the type whose top type there is another, its two best types and posteriors;
    and, in whitened units of the reference's pooled covariance after C's offset, the distance
    from the mean of C's cells of the type to the contributed prototype (as read: moved by A's
    anchors) and to the nearest reference type, from the contributed prototype to that type,
    and the type's spread (root mean per-component
    variance of C's cells around their own mean; 1 is the pooled covariance's)."""
    from scarches_fl._expression_sums import _whiten
    from scarches_fl.refine import contributed_pass, read_type_means

    level = knowledge["levels"][LABEL]["expression"]
    second = contributed_pass(level, tensors, scores, batches)
    if second is None:
        return {}
    classes, probs = second["classes"], second["probabilities"]
    mask = truth == held
    j = classes.index(held)
    misses = []
    for i in np.flatnonzero(mask & (probs.argmax(axis=1) != j)):
        order = np.argsort(-probs[i])
        misses.append(
            {
                "cell": int(i),
                "top": classes[order[0]],
                "p_top": round(float(probs[i, order[0]]), 3),
                "p_new_type": round(float(probs[i, j]), 3),
            }
        )
    cov = np.asarray(tensors[level["covariance_tensor"]], dtype=np.float64)
    wm = _whiten(cov)
    own = len(level["classes"])
    means = read_type_means(
        np.vstack([np.asarray(tensors[level["means_tensor"]], float), second["extra"]["means"]]),
        cov,
        [*level["cell_counts"], *second["extra"]["cell_counts"]],
        1.0,
    )
    nu = means @ wm.T
    names = sorted(set(np.asarray(batches).astype(str).tolist()))
    w = (scores @ wm.T)[mask] - second["offsets"][names.index(str(batches[mask][0]))]
    c_mean = w.mean(axis=0)
    to_ref = np.linalg.norm(nu[:own] - c_mean[None, :], axis=1)
    gap = nu[j] - c_mean
    return {
        "misses": misses,
        "c_mean_to_contributed": round(float(np.linalg.norm(gap)), 3),
        "largest_component_gap": round(float(np.abs(gap).max()), 3),
        "c_mean_to_nearest_reference_type": round(float(to_ref.min()), 3),
        "nearest_reference_type": level["classes"][int(to_ref.argmin())],
        "contributed_to_that_type": round(
            float(np.linalg.norm(nu[j] - nu[int(to_ref.argmin())])), 3
        ),
        "c_cells_spread": round(float(np.sqrt(np.mean(np.var(w, axis=0)))), 3),
        "components": int(w.shape[1]),
    }


def site_to_site_residuals(contrib_a: Any, contrib_c: Any, level: dict, tensors: dict) -> dict:
    """How far one type's cells at site A and at site C differ once each site's frame is
    removed, from the two sites' contributions (public numbers): per type that both carry
    with an expression part, the distance between A's and C's means, in whitened units of the
    reference's pooled covariance, after each site's frame offset (the count-weighted mean of
    its anchors' differences from the reference's means as read, as
    ``scarches_fl.refine.contributed_expression_types`` computes it) is removed. For an anchor
    this is what a per-batch offset leaves of the technology difference (the anchors also set
    the offsets, so it is a lower bound); for the new type it is what A's prototype carries of
    the difference."""
    from scarches_fl._expression_sums import _whiten
    from scarches_fl.refine import read_type_means

    cov = np.asarray(tensors[level["covariance_tensor"]], dtype=np.float64)
    wm = _whiten(cov)
    ref = read_type_means(
        np.asarray(tensors[level["means_tensor"]], dtype=np.float64),
        cov,
        level["cell_counts"],
        1.0,
    )
    index = {c: i for i, c in enumerate(level["classes"])}

    def parts(contrib: Any) -> dict[str, tuple[np.ndarray, int]]:
        return {
            p["name"]: (np.asarray(p["expression"]["mean"], dtype=np.float64), int(p["count"]))
            for p in contrib.prototypes
            if p.get("expression") is not None
        }

    def frame(site: dict[str, tuple[np.ndarray, int]]) -> np.ndarray:
        anchors = [(m - ref[index[t]], n) for t, (m, n) in site.items() if t in index]
        return sum(d * n for d, n in anchors) / max(sum(n for _, n in anchors), 1)

    a, c = parts(contrib_a), parts(contrib_c)
    fa, fc = frame(a), frame(c)
    return {
        t: round(float(np.linalg.norm(((a[t][0] - fa) - (c[t][0] - fc)) @ wm.T)), 3)
        for t in sorted(set(a) & set(c))
    }


def accuracy(pred: np.ndarray, truth: np.ndarray, mask: np.ndarray) -> float:
    return float(np.mean(pred[mask] == truth[mask])) if mask.any() else float("nan")


def run_seed(
    name: str,
    seed: int,
    *,
    max_epochs: int | None,
    surgery_epochs: int | None,
    n_top_genes: int | None = None,
    cache: Path | None = None,
) -> dict:
    from protocols.labels import DPRequirement, LabelPolicy, merge_label_knowledge
    from scarches_fl.labels import predict_labels
    from scarches_fl.model import ReferenceModel
    from scarches_fl.refine import query_scores, transfer_labels
    from site_agent.labels import build_site_prototypes, choose_dp, expression_clip_norm

    spec = DATASETS[name]
    held = spec["type"]
    genesis, site_a, site_c = split(name)
    where = None
    if cache is not None:
        settings = {
            "dataset": name,
            "max_epochs": max_epochs,
            "surgery_epochs": surgery_epochs,
            "n_top_genes": n_top_genes,
        }
        key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]
        where = cache / f"{name}_seed{seed}_{key}"
    if where is not None and (where / "latents.npz").is_file():
        # a model trained and mapped earlier with the same settings: the label rules are
        # scored afresh on it (the weights, latents and prototypes are the cache's)
        model = ReferenceModel.from_bundle(where / "reference")
        with np.load(where / "latents.npz", allow_pickle=False) as z:  # never pickle
            latent_a, latent_c = z["site_a"], z["site_c"]
        timing = {
            **json.loads((where / "run.json").read_text()),
            "read_from_model_cache": str(where),
        }
    else:
        t0 = time.perf_counter()
        model = ReferenceModel.train_reference(
            genesis,
            batch_key=BATCH,
            label_key=LABEL,
            max_epochs=max_epochs,
            seed=seed,
            progress=False,
            n_top_genes=n_top_genes,
        )
        t1 = time.perf_counter()
        latent_a = model.surgery(
            site_a,
            batch_key=BATCH,
            namespace="site-a",
            max_epochs=surgery_epochs,
            seed=seed,
            progress=False,
        ).latent
        latent_c = model.surgery(
            site_c,
            batch_key=BATCH,
            namespace="site-c",
            max_epochs=surgery_epochs,
            seed=seed,
            progress=False,
        ).latent
        t2 = time.perf_counter()
        timing = {"reference_train_s": round(t1 - t0, 1), "surgeries_s": round(t2 - t1, 1)}
        if where is not None:
            where.mkdir(parents=True, exist_ok=True)
            model.save(where / "reference")
            np.savez(where / "latents.npz", site_a=latent_a, site_c=latent_c)
            (where / "run.json").write_text(json.dumps(timing, indent=2, sort_keys=True))
    bundle = model.to_bundle()
    labels = bundle.manifest["labels"]
    tensors = model.tensors()
    truth_c = site_c.obs[LABEL].to_numpy().astype(str)
    new_mask, known_mask = truth_c == held, truth_c != held
    # what a site computes for the expression part: its cells on the public subspace
    scores_a = query_scores(labels["expression"], tensors, site_a, model.genes)
    scores_c = query_scores(labels["expression"], tensors, site_c, model.genes)
    e_clip = expression_clip_norm(labels["levels"][LABEL]["expression"], tensors)
    methods: dict[str, str] = {}

    def predict(knowledge: dict, rule: str) -> np.ndarray:
        if rule == "latent":  # the latent prototype rule
            p = predict_labels(knowledge, {}, latent_c, label_key=LABEL, method="prototype")
        else:  # what map / site map do by default (--label-method auto)
            kept = model.labels
            model.labels = knowledge
            try:
                p = transfer_labels(model, site_c, latent_c, label_key=LABEL, batch_key=BATCH)
            finally:
                model.labels = kept
            methods[p.method] = p.method
        return np.asarray(p.pred, dtype=str)

    def figures(knowledge: dict, prefix: str, out: dict) -> None:
        for rule, tag in (("default", ""), ("latent", "_latent")):
            pred = predict(knowledge, rule)
            out[f"new_{prefix}{tag}"] = accuracy(pred, truth_c, new_mask)
            out[f"known_{prefix}{tag}"] = accuracy(pred, truth_c, known_mask)

    out: dict[str, Any] = {
        "seed": seed,
        "new_type": held,
        "n_new_at_c": int(new_mask.sum()),
        "n_known_at_c": int(known_mask.sum()),
        "n_new_at_a": int((site_a.obs[LABEL].astype(str) == held).sum()),
        **timing,
        "expression_clip_norm": e_clip,
    }
    figures(labels, "before", out)
    policy = LabelPolicy()
    labels_a = site_a.obs[LABEL].to_numpy()

    def knowledge_after(site: str, contrib: Any, *, settings: Any = None) -> dict:
        led = _Ledger(bundle)
        if settings is not None:
            led.policy(settings=settings)
        index = led.contribute(site, contrib)
        led.policy(action="accept", name=f"{site}:{held}", target=held)
        out.setdefault("contribution_entry", index)
        return led.state.label_knowledge()

    # the contribution as site map --contribute-labels makes it: latent and expression parts
    contrib = build_site_prototypes(
        latent_a, labels_a, label_key=LABEL, policy=policy, seed=seed, expression=scores_a
    )
    out["contributed_types"] = [(p["name"], p["count"]) for p in contrib.prototypes]
    after = knowledge_after("site-a", contrib)
    figures(after, "after", out)
    if methods.get("expression"):
        out["second_pass"] = second_pass_geometry(
            after, tensors, scores_c, site_c.obs[BATCH].to_numpy(), truth_c, held
        )
    # where a loss or gain comes from: site A sending the new type only (no anchors)
    only_new = dataclasses.replace(
        contrib, prototypes=[p for p in contrib.prototypes if p["name"] == held]
    )
    figures(knowledge_after("site-a", only_new), "after_new_only", out)
    # a format version 1 contribution (latent only), as before expression prototypes
    latent_only = dataclasses.replace(
        contrib,
        prototypes=[{k: v for k, v in p.items() if k != "expression"} for p in contrib.prototypes],
    )
    figures(knowledge_after("site-a", latent_only), "after_v1", out)
    # the geometry's bound: C's own cells as the prototypes (all its types, so that its own
    # anchors place the new type; the latent rule's bound as before: the new type only)
    own = build_site_prototypes(
        latent_c,
        truth_c,
        label_key=LABEL,
        policy=policy,
        seed=seed,
        expression=scores_c,
    )
    if "second_pass" in out:
        out["second_pass"]["site_to_site_residuals"] = site_to_site_residuals(
            contrib, own, labels["levels"][LABEL]["expression"], tensors
        )
    own_fig: dict[str, Any] = {}
    figures(knowledge_after("site-c", own), "own", own_fig)
    out["new_own_upper"] = own_fig["new_own"]
    own_new = build_site_prototypes(
        latent_c[new_mask], truth_c[new_mask], label_key=LABEL, policy=policy, seed=seed
    )
    figures(knowledge_after("site-c", own_new), "own_new", own_fig)
    out["new_own_upper_latent"] = own_fig["new_own_new_latent"]
    # DP
    clip = clip_norm_from_genesis(labels)
    out["dp_clip_norm"] = clip
    for eps in EPSILONS:
        dp_policy = LabelPolicy(dp=DPRequirement(clip_norm=clip, epsilon=eps, delta=DELTA))
        # what the agent sends under DP: the latent part only (format version 1)
        dp_contrib = build_site_prototypes(
            latent_a,
            labels_a,
            label_key=LABEL,
            policy=dp_policy,
            dp=choose_dp(dp_policy),
            seed=seed,
        )
        figures(knowledge_after("site-a", dp_contrib, settings=dp_policy), f"after_eps{eps:g}", out)
        held_p = [p for p in dp_contrib.prototypes if p["name"] == held]
        out[f"sigma_eps{eps:g}"] = held_p[0]["sigma"] if held_p else None
        # both parts under one mechanism (format version 2): why the agent does not
        joint = build_site_prototypes(
            latent_a,
            labels_a,
            label_key=LABEL,
            policy=dp_policy,
            dp=choose_dp(dp_policy),
            seed=seed,
            expression=scores_a,
            expression_clip=e_clip,
        )
        figures(
            knowledge_after("site-a", joint, settings=dp_policy), f"after_eps{eps:g}_joint", out
        )
        held_p = [p for p in joint.prototypes if p["name"] == held]
        out[f"joint_sigma_eps{eps:g}"] = held_p[0]["sigma"] if held_p else None
        out[f"expression_sigma_eps{eps:g}"] = held_p[0]["expression"]["sigma"] if held_p else None
    out["default_rule_methods"] = sorted(methods)
    # the merged knowledge without any contribution is the genesis's (a check, not a figure)
    assert merge_label_knowledge(labels, _Ledger(bundle).state.labels) == dict(labels)
    return out


def summarize(rows: list[dict]) -> dict:
    keys = [k for k, v in rows[0].items() if isinstance(v, float) and k != "seed"]
    out = {}
    for k in keys:
        vals = [r[k] for r in rows if isinstance(r.get(k), float) and not math.isnan(r[k])]
        if vals:
            out[k] = {
                "mean": float(np.mean(vals)),
                "min": float(np.min(vals)),
                "max": float(np.max(vals)),
            }
    return out


def _fmt(s: dict, k: str) -> str:
    v = s.get(k)
    return "-" if v is None else f"{v['mean']:.3f} [{v['min']:.3f}-{v['max']:.3f}]"


def table(name: str, summary: dict) -> str:
    rows = []
    for tag, rule in (("", "default rule (expression)"), ("_latent", "latent prototype rule")):
        rows += [
            (f"{rule}: new type at site C, before", f"new_before{tag}"),
            (f"{rule}: new type at site C, after A contributes", f"new_after{tag}"),
            (f"{rule}: known types at site C, before", f"known_before{tag}"),
            (f"{rule}: known types at site C, after", f"known_after{tag}"),
            (f"{rule}: new type, A sends the new type only", f"new_after_new_only{tag}"),
            (f"{rule}: known types, A sends the new type only", f"known_after_new_only{tag}"),
            (f"{rule}: new type, latent-only contribution (v1)", f"new_after_v1{tag}"),
            (f"{rule}: known types, latent-only contribution (v1)", f"known_after_v1{tag}"),
        ]
        for eps in EPSILONS:
            rows += [
                (f"{rule}: new type after, DP epsilon {eps:g}", f"new_after_eps{eps:g}{tag}"),
                (f"{rule}: known types after, DP epsilon {eps:g}", f"known_after_eps{eps:g}{tag}"),
                (
                    f"{rule}: new type after, DP epsilon {eps:g}, both parts",
                    f"new_after_eps{eps:g}_joint{tag}",
                ),
                (
                    f"{rule}: known types after, DP epsilon {eps:g}, both parts",
                    f"known_after_eps{eps:g}_joint{tag}",
                ),
            ]
    rows += [
        ("new type, C's own prototypes (default rule)", "new_own_upper"),
        ("new type, C's own prototype (latent rule)", "new_own_upper_latent"),
    ]
    for eps in EPSILONS:
        rows += [
            (f"latent noise sigma per dimension, epsilon {eps:g}", f"sigma_eps{eps:g}"),
            (f"latent noise sigma, epsilon {eps:g}, both parts", f"joint_sigma_eps{eps:g}"),
            (
                f"expression noise sigma per component, epsilon {eps:g}",
                f"expression_sigma_eps{eps:g}",
            ),
        ]
    lines = [
        f"growth benchmark: {name} (type {DATASETS[name]['type']}), mean [min-max] over seeds",
        "| figure | value |",
        "| --- | --- |",
    ]
    lines += [f"| {label} | {_fmt(summary, key)} |" for label, key in rows]
    return "\n".join(lines)


def plot(results: list[Path], out: Path) -> Path:
    """Bars of the new type's accuracy at site C (before, after, after under DP, C's own
    prototype) and the known types' (before, after), mean with min-max whiskers, one group per
    dataset."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    bars = [
        ("new_before", "new type, before"),
        ("new_after", "new type, after"),
        ("new_after_eps4", "after, DP eps 4"),
        ("new_after_eps1", "after, DP eps 1"),
        ("new_after_latent", "after, latent rule"),
        ("new_own_upper", "C's own prototypes"),
        ("known_before", "known types, before"),
        ("known_after", "known types, after"),
    ]
    docs = [json.loads(p.read_text()) for p in results]
    fig, ax = plt.subplots(figsize=(9, 3.8))
    width = 0.8 / len(bars)
    for j, (key, label) in enumerate(bars):
        xs, means, lo, hi = [], [], [], []
        for i, doc in enumerate(docs):
            v = doc["summary"].get(key)
            if v is None:
                continue
            xs.append(i + (j - len(bars) / 2 + 0.5) * width)
            means.append(v["mean"])
            lo.append(max(0.0, v["mean"] - v["min"]))  # equal seeds: rounding, not spread
            hi.append(max(0.0, v["max"] - v["mean"]))
        ax.bar(xs, means, width, yerr=[lo, hi], capsize=2, label=label)
    ax.set_xticks(range(len(docs)))
    ax.set_xticklabels(
        [f"{d['dataset']} ({d['spec']['type']}), {len(d['seeds'])} seeds" for d in docs]
    )
    ax.set_ylabel("accuracy at site C")
    ax.set_ylim(0, 1.05)
    ax.legend(fontsize=7, ncol=4, loc="upper center", bbox_to_anchor=(0.5, -0.12))
    ax.set_title("label knowledge grows: a type the genesis lacks, taught by site A")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    print(f"wrote {out}")
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dataset", choices=sorted(DATASETS), default="cellbench5")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    ap.add_argument(
        "--max-epochs", type=int, default=None, help="reference epochs (default: the library's)"
    )
    ap.add_argument("--surgery-epochs", type=int, default=None)
    ap.add_argument(
        "--n-top-genes",
        type=int,
        default=None,
        help="train the genesis on this many highly variable genes of its own data "
        "(default: every gene)",
    )
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument(
        "--model-cache",
        type=Path,
        default=None,
        metavar="DIR",
        help="keep each seed's trained and mapped model here and read it on a rerun with the "
        "same settings, so a label rule is re-scored without training again",
    )
    ap.add_argument(
        "--plot",
        type=Path,
        nargs="+",
        metavar="JSON",
        help="only draw benchmarks/results/growth.png from these result files",
    )
    args = ap.parse_args(argv)
    if args.plot:
        plot(args.plot, ROOT / "benchmarks" / "results" / "growth.png")
        return 0
    logging.basicConfig(level=logging.WARNING)
    load = os.getloadavg()[0]
    rows = []
    for seed in args.seeds:
        t = time.perf_counter()
        row = run_seed(
            args.dataset,
            seed,
            max_epochs=args.max_epochs,
            surgery_epochs=args.surgery_epochs,
            n_top_genes=args.n_top_genes,
            cache=args.model_cache,
        )
        rows.append(row)
        print(
            f"seed {seed}: new {row['new_before']:.3f} -> {row['new_after']:.3f} (own "
            f"{row['new_own_upper']:.3f}; eps4 {row['new_after_eps4']:.3f}, eps1 "
            f"{row['new_after_eps1']:.3f}; latent rule {row['new_after_latent']:.3f}); known "
            f"{row['known_before']:.3f} -> {row['known_after']:.3f} (eps4 "
            f"{row['known_after_eps4']:.3f}, eps1 {row['known_after_eps1']:.3f}) "
            f"({time.perf_counter() - t:.0f} s)",
            flush=True,
        )
        geo = row.get("second_pass") or {}
        if geo:
            ties = ", ".join(
                "{} {:.2f} vs {:.2f}".format(m["top"], m["p_top"], m["p_new_type"])
                for m in geo["misses"]
            )
            print(
                f"  second pass: {len(geo['misses'])} cells of the type called another "
                f"({ties}); "
                f"C's mean of the type is {geo['c_mean_to_contributed']:.2f} from the contributed "
                f"prototype (largest component {geo['largest_component_gap']:.2f}) and "
                f"{geo['c_mean_to_nearest_reference_type']:.2f} from "
                f"{geo['nearest_reference_type']} (the contributed prototype "
                f"{geo['contributed_to_that_type']:.2f}); C's cells spread {geo['c_cells_spread']:.2f} "
                f"per component (whitened, {geo['components']} components)",
                flush=True,
            )
            print(
                "  the same type at A and at C after each site's frame: "
                + ", ".join(f"{t} {d:.2f}" for t, d in geo["site_to_site_residuals"].items()),
                flush=True,
            )
    summary = summarize(rows)
    print(table(args.dataset, summary))
    doc = {
        "benchmark": "growth",
        "dataset": args.dataset,
        "spec": DATASETS[args.dataset],
        "seeds": args.seeds,
        "max_epochs": args.max_epochs,
        "surgery_epochs": args.surgery_epochs,
        "n_top_genes": args.n_top_genes,
        "epsilons": list(EPSILONS),
        "delta": DELTA,
        "summary": summary,
        "per_seed": rows,
        "machine": machine(load),
    }
    save(doc, args.out or ROOT / "benchmarks" / "results" / f"growth_{args.dataset}.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
