"""The logic of ``sample.py`` (see its docstring): class labels -> PNGs / ADM npz."""
from __future__ import annotations

import argparse
import math
import os
import pathlib
import time

import numpy as np

REPO = pathlib.Path(__file__).resolve().parent.parent
DEFAULT_MODEL_DIR = REPO / "models" / "default"


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="sample.py", description="Sample images with D-AR.",
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--gpt", default=str(DEFAULT_MODEL_DIR / "gpt"),
                    help="GPT model directory (dar-jax) or the reference's .pt (needs --gpt-model)")
    ap.add_argument("--tokenizer", default=str(DEFAULT_MODEL_DIR / "tokenizer"),
                    help="tokenizer model directory (dar-jax) or the reference's .pt")
    ap.add_argument("--gpt-model", default=None, help="size of a GPT .pt: GPT-B | GPT-L | GPT-XL")
    ap.add_argument("--num-classes", type=int, default=1000, help="classes of a GPT .pt")
    ap.add_argument("--classes", default="all", help='"all" or a comma-separated list of class ids')
    ap.add_argument("--num-images", type=int, default=0,
                    help="images to sample (cycling through --classes); 0 = one per class")
    ap.add_argument("--per-class", type=int, default=0,
                    help="N images of every class in --classes (e.g. 50 for the ADM FID set)")
    ap.add_argument("--cfg-scale", default="4.0", help='number, or "a,b" linear over the tokens')
    ap.add_argument("--cfg-interval", type=int, default=-1)
    ap.add_argument("--top-k", type=int, default=0)
    ap.add_argument("--top-p", type=float, default=1.0)
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--solver", default="adams2", help="euler | adams2 | heun | dpmpp_2m")
    ap.add_argument("--steps", type=int, default=0, help="decoder steps (0: the tokenizer's)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--dtype", default=None, choices=["float32", "bfloat16"])
    ap.add_argument("--size", type=int, default=0, help="decode resolution (0: the tokenizer's)")
    ap.add_argument("--out", default="samples", help="output directory")
    ap.add_argument("--previews", dest="previews", action="store_true", default=True,
                    help="write each image's preview strip (the image after each token group)")
    ap.add_argument("--no-previews", dest="previews", action="store_false")
    ap.add_argument("--no-images", action="store_true", help="write no per-image PNGs (npz only)")
    ap.add_argument("--layout-from", default=None, help="image whose first token groups fix the layout")
    ap.add_argument("--layout-groups", type=int, default=2)
    ap.add_argument("--npz", action="store_true", help="also write the ADM evaluator's sample batch")
    ap.add_argument("--quiet", action="store_true", help="no progress bar")
    from dar_jax.cli import add_distributed_args
    add_distributed_args(ap)
    return ap


def parse_classes(text: str, num_classes: int) -> list[int]:
    from dar_jax.pipeline import PipelineError
    if text.strip().lower() == "all":
        return list(range(num_classes))
    try:
        classes = [int(c) for c in text.split(",") if c.strip()]
    except ValueError:
        raise PipelineError(f"--classes must be 'all' or comma-separated integers, got {text!r}") from None
    bad = [c for c in classes if not 0 <= c < num_classes]
    if not classes or bad:
        raise PipelineError(f"class ids must lie in [0, {num_classes}); got {bad or text!r}")
    return classes


def plan_labels(classes: list[int], num_images: int, per_class: int) -> np.ndarray:
    if per_class:
        return np.repeat(np.asarray(classes, np.int32), per_class)
    n = num_images or len(classes)
    return np.asarray([classes[i % len(classes)] for i in range(n)], np.int32)


def run(args) -> str:
    import jax

    from dar_jax import parallel, pipeline
    from dar_jax.cli import init_distributed
    from dar_jax.pipeline import PipelineError

    init_distributed(args)
    if args.batch_size < 1:
        raise PipelineError("--batch-size must be >= 1")
    for path in (args.gpt, args.tokenizer):
        if not os.path.exists(path):
            hint = ""
            if str(DEFAULT_MODEL_DIR) in os.path.abspath(path):
                hint = (" (the shipped default model is missing: restore it with "
                        "`git checkout -- models/default` or retrain it with scripts/train_default.sh)")
            raise PipelineError(f"checkpoint not found: {path}{hint}")
    from dar_jax.ar import parse_cfg_scale
    parse_cfg_scale(args.cfg_scale)  # malformed "a,b" fails before anything is loaded
    try:
        models = pipeline.load_models(args.gpt, args.tokenizer, gpt_size=args.gpt_model,
                                      num_classes=args.num_classes)
    except PipelineError:
        raise
    except Exception as e:
        from dar_jax.cli import expected_errors
        if isinstance(e, expected_errors()):
            hint = ""
            if str(DEFAULT_MODEL_DIR) in os.path.abspath(args.gpt):
                hint = (" (the shipped default model looks corrupt: restore it with "
                        "`git checkout -- models/default` or retrain it with scripts/train_default.sh)")
            raise type(e)(f"{e}{hint}") from None
        raise
    classes = parse_classes(args.classes, models.num_classes)
    labels = plan_labels(classes, args.num_images, args.per_class)
    opts = pipeline.SampleOptions(cfg_scale=args.cfg_scale, cfg_interval=args.cfg_interval,
                                  temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                                  solver=args.solver, num_steps=args.steps or None, dtype=args.dtype,
                                  size=args.size or None)
    prefix, prefix_len = None, 0
    if args.layout_from:
        size = pipeline.sampling.resolution(models.tok_cfg, args.size or None)[0]
        image = pipeline.load_image(args.layout_from, size)
        codes, prefix_len = pipeline.layout_prefix(models, image, args.layout_groups)
        prefix = np.asarray(codes)

    # spread each batch over the devices of every process: a 1-D data mesh, parameters
    # replicated; each process places only the rows of its devices, outputs are gathered
    mesh = parallel.make_mesh({"data": -1})
    target = parallel.target_for(mesh)
    ndev = mesh.size
    bs = math.ceil(args.batch_size / ndev) * ndev
    models = pipeline.Models(models.gpt_cfg, parallel.put_replicated(models.gpt_params, target),
                             models.tok_cfg, parallel.put_replicated(models.tok_params, target))
    out = pathlib.Path(args.out)
    main = jax.process_index() == 0
    if main:
        out.mkdir(parents=True, exist_ok=True)
    all_images, all_strips, all_tokens = [], [], []
    bar = None
    if main and not args.quiet:
        from tqdm import tqdm
        bar = tqdm(total=len(labels), desc="sampling", unit="img", dynamic_ncols=True)
    t0 = time.perf_counter()
    for start in range(0, len(labels), bs):
        idx = np.arange(start, min(start + bs, len(labels)))
        n = len(idx)
        pad = bs - n
        lab = np.concatenate([labels[idx], np.full(pad, labels[0], np.int32)])
        pre = None if prefix is None else np.repeat(prefix[:1], bs, 0)
        res = pipeline.sample_global(models, lab, np.arange(start, start + bs), args.seed, opts,
                                     target=target, prefix=pre, prefix_len=prefix_len,
                                     previews=args.previews)
        all_images.append(pipeline.to_uint8(res.images[:n]))
        all_tokens.append(res.tokens[:n])
        if args.previews:
            all_strips.append(pipeline.to_uint8(res.previews[:n]))
        if bar is not None:
            bar.update(n)
            bar.set_postfix(img_per_s=f"{(start + n) / (time.perf_counter() - t0):.2f}")
    if bar is not None:
        bar.close()
    images = np.concatenate(all_images)
    if main:
        _write_outputs(out, images, labels, np.concatenate(all_tokens),
                       np.concatenate(all_strips) if args.previews else None, args)
        print(f"wrote {len(images)} images to {out.resolve()}")
    return str(out)


def _write_outputs(out: pathlib.Path, images: np.ndarray, labels: np.ndarray, tokens: np.ndarray,
                   strips, args) -> None:
    from PIL import Image

    def save(path, arr):
        tmp = str(path) + ".tmp"
        Image.fromarray(arr).save(tmp, format="PNG")
        os.replace(tmp, path)

    if not args.no_images:
        for i, (img, lab) in enumerate(zip(images, labels)):
            save(out / f"{i:06d}_class{int(lab)}.png", img)
            if strips is not None:
                save(out / f"{i:06d}_class{int(lab)}_previews.png", np.concatenate(list(strips[i]), axis=1))
        cols = int(math.ceil(math.sqrt(len(images))))
        save(out / "grid.png", make_grid(images, cols))
        if strips is not None:
            rows = [np.concatenate(list(s), axis=1) for s in strips]
            save(out / "previews.png", np.concatenate(rows, axis=0))
    if args.npz:
        tmp = out / "samples.npz.tmp.npz"
        np.savez(tmp, arr_0=images, arr_1=labels, tokens=tokens)
        os.replace(tmp, out / "samples.npz")


def make_grid(images: np.ndarray, cols: int) -> np.ndarray:
    n, h, w, c = images.shape
    rows = int(math.ceil(n / cols))
    grid = np.zeros((rows * h, cols * w, c), np.uint8)
    for i, img in enumerate(images):
        r, q = divmod(i, cols)
        grid[r * h:(r + 1) * h, q * w:(q + 1) * w] = img
    return grid


def main(argv=None) -> int:
    from dar_jax.cli import guarded_main
    args = build_parser().parse_args(argv)
    return guarded_main(lambda: run(args))
