"""Quality of a D-AR model on the synthetic shapes, measured by the independent classifier.

    python scripts/quality_report.py [--models models/default] [--num 1000] [--out quality.json]

Reports class accuracy of generated samples (as many per class), tokenizer reconstruction PSNR on
held-out images, and the Frechet distance between real and generated images in the classifier's
feature space, with the real-vs-real distance (two disjoint real sets) as its floor.
"""
from __future__ import annotations

import argparse
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
    ap.add_argument("--out", default="")
    a = ap.parse_args()
    t0 = time.perf_counter()
    m = pipeline.load_models(a.models + "/gpt", a.models + "/tokenizer")
    clf = sc.load(a.classifier)
    size, classes = m.tok_cfg.sampling_resolution, m.num_classes
    labels = np.arange(a.num) % classes
    opts = pipeline.SampleOptions(cfg_scale=a.cfg_scale)
    gen = []
    for s in range(0, a.num, a.batch_size):
        idx = np.arange(s, min(s + a.batch_size, a.num))
        res = pipeline.sample(m, labels[idx], pipeline.keys_for(a.seed, idx), opts)
        gen.append(np.clip(np.asarray(res.images), -1, 1))
    gen = np.concatenate(gen)
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
    report = {"num_generated": a.num, "cfg_scale": a.cfg_scale, "class_accuracy": float((pred == labels).mean()),
              "class_accuracy_per_class": per_class, "classifier_heldout_accuracy": clf_acc,
              "reconstruction_psnr_db": psnr, "frechet_gen_vs_real": fd_gen, "frechet_real_vs_real": fd_floor,
              "seconds": time.perf_counter() - t0}
    print(json.dumps(report, indent=1))
    if a.out:
        pathlib.Path(a.out).write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
