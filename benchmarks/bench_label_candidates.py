"""Candidate label rules on one of our mapped latents (issue 22: labels under a condition shift).

Trains our reference and maps the query once per scenario (the splits of ``bench_labels.py``),
then scores, on the same two latents:

* ``prototype`` / ``knn``: today's label transfer (:func:`scarches_fl.labels.predict_labels`);
* ``classifier_head``: the bundle's latent classifier (``classifier.weight`` / ``.bias``, trained
  with the reference) applied to the query latent, argmax;
* ``prototype_query_refined``: transductive, at the site, no weight moves: prototype labels,
  then each type's prototypes are moved by the mean offset of the type's confident query cells
  (uncertainty < 0.2, at least 5 cells) from those prototypes, and the query is labelled again
  (3 rounds). A shared response that displaces every query cell of a type in the latent is
  followed; a type with no confident query cell keeps its reference prototypes.

One seed, a first measurement: ``python benchmarks/bench_label_candidates.py --scenario
shift_strong`` writes ``benchmarks/results/labels_vs_scanvi/candidates_<scenario>.json``.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import bench_labels as B  # noqa: E402

from scarches_fl.labels import build_label_knowledge, predict_labels  # noqa: E402

CONFIDENT = 0.2
MIN_CONFIDENT = 5
ROUNDS = 3


def refine_prototypes(knowledge: dict, query_latent: np.ndarray, label_key: str) -> dict:
    """Label knowledge whose prototypes follow the confident query cells of each type."""
    refined = copy.deepcopy(knowledge)
    proto = refined["levels"][label_key]["prototype"]
    for _ in range(ROUNDS):
        pred = predict_labels(refined, {}, query_latent, label_key=label_key, method="prototype")
        for c in proto["classes"]:
            sure = (pred.top_label == c) & (pred.uncertainty < CONFIDENT)
            if sure.sum() < MIN_CONFIDENT:
                continue
            own = [p for p in proto["prototypes"] if p["label"] == c]
            centre = np.average(
                [p["mean"] for p in own], axis=0, weights=[p["weight"] for p in own]
            )
            offset = query_latent[sure].mean(axis=0) - centre
            for p in own:
                p["mean"] = (np.asarray(p["mean"]) + offset).tolist()
    return refined


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--scenario", required=True, choices=list(B.SCENARIOS))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out-dir", default=str(ROOT / "benchmarks" / "results" / "labels_vs_scanvi"))
    args = ap.parse_args(argv)
    from scarches_fl.model import ReferenceModel

    t0 = time.perf_counter()
    ref, query = B.split(args.scenario)
    model = ReferenceModel.train_reference(
        ref, batch_key=B.BATCH, label_key=B.LABEL, seed=args.seed, progress=False
    )
    res = model.surgery(query, batch_key=B.BATCH, namespace="site1", seed=args.seed, progress=False)
    zr = np.asarray(res.model.get_latent(ref, batch_key=B.BATCH, namespace="ref"), np.float64)
    zq = np.asarray(res.latent, np.float64)
    truth = query.obs[B.LABEL].to_numpy().astype(str)
    knowledge, atlas = build_label_knowledge(
        zr, {B.LABEL: ref.obs[B.LABEL].to_numpy()}, include_atlas=True, seed=args.seed
    )
    out: dict = {}
    for method in ("prototype", "knn"):
        p = predict_labels(knowledge, atlas, zq, label_key=B.LABEL, method=method)
        out[method] = B.label_figures(truth, p.pred.astype(str), p.top_label.astype(str), ref)
    tensors = model.tensors()
    classes = model.registration["classifier_classes"]
    logits = zq @ tensors["classifier.weight"].T.astype(np.float64) + tensors["classifier.bias"]
    head = np.asarray(classes, dtype=object)[logits.argmax(axis=1)].astype(str)
    out["classifier_head"] = B.label_figures(truth, head, head, ref)
    refined = refine_prototypes(knowledge, zq, B.LABEL)
    p = predict_labels(refined, {}, zq, label_key=B.LABEL, method="prototype")
    out["prototype_query_refined"] = B.label_figures(
        truth, p.pred.astype(str), p.top_label.astype(str), ref
    )
    pred, _ = B.no_integration_floor(ref, query, seed=args.seed)
    out["no_integration"] = B.label_figures(truth, pred, pred, ref)
    result = {
        "scenario": args.scenario,
        "seed": args.seed,
        "command": "python benchmarks/bench_label_candidates.py "
        + " ".join(sys.argv[1:] if argv is None else argv),
        "wall_s": time.perf_counter() - t0,
        "environment": B._environment(),
        "rules": out,
    }
    path = Path(args.out_dir) / f"candidates_{args.scenario}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2, sort_keys=True))
    print(f"== {args.scenario} seed {args.seed}: label rules on one scarches-fl latent ==")
    print(f"{'rule':26s} {'acc':>7s} {'as-read':>8s} {'known->U':>9s}")
    for name, r in out.items():
        print(
            f"{name:26s} {r['accuracy_top_label']:7.3f} {r['accuracy_with_unknown']:8.3f} "
            f"{r['known_fraction_called_unknown']:9.3f}"
        )
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
