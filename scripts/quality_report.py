"""Quality of a D-AR model on the synthetic shapes, measured by the independent classifier.

    python scripts/quality_report.py [--models models/default] [--num 1000] [--out quality.json]

Reports class accuracy of generated samples (as many per class), tokenizer reconstruction PSNR on
held-out images, and the Frechet distance between real and generated images in the classifier's
feature space, with the real-vs-real distance (two disjoint real sets) as its floor. Per solver
(``--solvers``) it compares the final images with the last preview (after G - 1 token groups,
the same tokens): the classifier's accuracy on each, and their high-frequency energy (mean
absolute difference of neighbouring pixels, beside that of real images), which rises with
sampling noise.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import pathlib
import time

import numpy as np

from dar_jax import pipeline
from dar_jax import tokenizer as tok
from dar_jax.evaluate import metrics
from dar_jax.evaluate import shapes_classifier as sc

REPO = pathlib.Path(__file__).resolve().parent.parent


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default=str(REPO / "models" / "default"))
    ap.add_argument("--classifier", default=str(REPO / "models" / "shape_classifier.npz"))
    ap.add_argument("--num", type=int, default=1000)
    ap.add_argument("--cfg-scale", default=str(pipeline.SampleOptions().cfg_scale), help="default: the pipeline's")
    ap.add_argument("--batch-size", type=int, default=100)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--solvers", default="euler,adams2,heun,dpmpp_2m",
                    help="comma-separated solvers whose finals and last previews are compared")
    ap.add_argument("--out", default="")
    a = ap.parse_args()
    t0 = time.perf_counter()
    m = pipeline.load_models(a.models + "/gpt", a.models + "/tokenizer")
    clf = sc.load(a.classifier)
    size, classes = m.tok_cfg.sampling_resolution, m.num_classes
    labels = np.arange(a.num) % classes
    opts = pipeline.SampleOptions(cfg_scale=a.cfg_scale)

    def generate(options):
        finals, last_previews = [], []
        for s in range(0, a.num, a.batch_size):
            idx = np.arange(s, min(s + a.batch_size, a.num))
            res = pipeline.sample(m, labels[idx], pipeline.keys_for(a.seed, idx), options, previews=True)
            finals.append(np.clip(np.asarray(res.images), -1, 1))
            last_previews.append(np.clip(np.asarray(res.previews[:, -2]), -1, 1))
        return np.concatenate(finals), np.concatenate(last_previews)

    def roughness(x):   # mean |neighbour difference| over both axes, in [-1, 1] units
        return float(np.mean(np.abs(np.diff(x, axis=1))) + np.mean(np.abs(np.diff(x, axis=2)))) / 2

    solvers = [x for x in a.solvers.split(",") if x]
    runs = {solver: generate(dataclasses.replace(opts, solver=solver)) for solver in solvers}
    gen = runs[opts.solver][0] if opts.solver in runs else generate(opts)[0]
    pred = sc.predict(clf, gen)
    per_class = [float((pred[labels == c] == c).mean()) for c in range(classes)]
    test, test_labels = sc.real_images("test", a.num, size, classes)
    val, _ = sc.real_images("validation", a.num, size, classes)
    clf_acc = float((sc.predict(clf, test) == test_labels).mean())
    recon = []
    for s in range(0, a.num, a.batch_size):
        batch = test[s:s + a.batch_size]
        recon.append(np.asarray(tok.reconstruct(m.tok_cfg, m.tok_params, batch, pipeline.noise_for(m, pipeline.sample_keys(a.seed + 1, len(batch), s)))))
    psnr = float(np.mean(metrics.psnr(np.concatenate(recon), test)))
    f = lambda x: metrics.compute_stats(sc.feature_batches(clf, x))
    fd_gen = metrics.frechet_distance(f(gen), f(test))
    fd_floor = metrics.frechet_distance(f(val), f(test))
    by_solver = {}
    for solver, (finals, previews) in runs.items():
        by_solver[solver] = {
            "accuracy_final": float((sc.predict(clf, finals) == labels).mean()),
            "accuracy_last_preview": float((sc.predict(clf, previews) == labels).mean()),
            "roughness_final": roughness(finals), "roughness_last_preview": roughness(previews)}
    report = {"num_generated": a.num, "cfg_scale": a.cfg_scale, "class_accuracy": float((pred == labels).mean()),
              "class_accuracy_per_class": per_class, "classifier_heldout_accuracy": clf_acc,
              "reconstruction_psnr_db": psnr, "roughness_real": roughness(test),
              "default_solver": opts.solver, "finals_vs_last_preview": by_solver, "frechet_gen_vs_real": fd_gen, "frechet_real_vs_real": fd_floor,
              "seconds": time.perf_counter() - t0}
    print(json.dumps(report, indent=1))
    if a.out:
        pathlib.Path(a.out).write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
