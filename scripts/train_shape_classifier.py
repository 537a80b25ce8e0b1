"""Trains the independent shapes classifier (dar_jax.evaluate.shapes_classifier) on real
synthetic images and saves it to models/shape_classifier.npz, printing held-out accuracy.

    python scripts/train_shape_classifier.py [--size 32] [--classes 10] [--steps 1500]
"""
from __future__ import annotations

import argparse
import pathlib
import time

from dar_jax import data
from dar_jax.evaluate import shapes_classifier as sc

REPO = pathlib.Path(__file__).resolve().parent.parent


def batches(size: int, classes: int, batch: int, split: str, seed: int):
    pipe = data.make_dataset({"kind": "synthetic", "image_size": size, "num_classes": classes},
                             global_batch_size=batch, seed=seed, split=split, purpose="tokenizer",
                             process_index=0, process_count=1)
    return pipe.iterator()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", type=int, default=32)
    ap.add_argument("--classes", type=int, default=10)
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--out", default=str(REPO / "models" / "shape_classifier.npz"))
    a = ap.parse_args()
    it = batches(a.size, a.classes, 64, "train", 0)
    t0 = time.perf_counter()

    def next_batch(step):
        b = next(it)
        return b["image"], b["label"]

    params = sc.train(next_batch, a.classes, steps=a.steps)
    n = 2000
    images, labels = sc.real_images("test", n, a.size, a.classes)
    acc = float((sc.predict(params, images) == labels).mean())
    sc.save(a.out, params)
    print(f"held-out accuracy {acc:.4f} on {n} test images; trained in {time.perf_counter() - t0:.0f} s; wrote {a.out}")


if __name__ == "__main__":
    main()
