"""The logic of ``sample.py`` (see its docstring): class labels -> PNGs / ADM npz."""
from __future__ import annotations

import argparse
import os
import pathlib
import time

import numpy as np

DEFAULT_MODEL_ENV = "DAR_JAX_DEFAULT_MODEL"
DEFAULT_MODEL_REL = pathlib.Path("models") / "default"


def default_model_dir() -> pathlib.Path:
    """The folder of the default model (``gpt/`` and ``tokenizer/``), first match of:
    ``$DAR_JAX_DEFAULT_MODEL``; ``models/default`` under the current directory; ``models/default``
    of the source checkout this package is installed from (an editable install, as the README
    installs it). The last is returned when none exists, so errors name where it is looked for."""
    env = os.environ.get(DEFAULT_MODEL_ENV)
    if env:
        return pathlib.Path(env).resolve()
    here = pathlib.Path.cwd() / DEFAULT_MODEL_REL
    if (here / "gpt").is_dir() and (here / "tokenizer").is_dir():
        return here.resolve()
    return pathlib.Path(__file__).resolve().parent.parent / DEFAULT_MODEL_REL


def add_model_arguments(ap: argparse.ArgumentParser) -> None:
    """The flags naming the models (sample.py, the web demo): --gpt, --tokenizer, the size of a
    GPT .pt, --dtype. :func:`load_models` reads them. The default is the shipped model
    (:func:`default_model_dir`)."""
    default = default_model_dir()
    ap.add_argument("--gpt", default=str(default / "gpt"),
                    help="GPT model directory (dar-jax) or the reference's .pt (size inferred)")
    ap.add_argument("--tokenizer", default=str(default / "tokenizer"),
                    help="tokenizer model directory (dar-jax) or the reference's .pt")
    ap.add_argument("--dtype", default=None, choices=["float32", "bfloat16"],
                    help="compute dtype (default: the models' own)")
    from dar_jax.cli import add_gpt_size_flags
    add_gpt_size_flags(ap)


def check_model_paths(args) -> None:
    from dar_jax.pipeline import PipelineError
    for path in (args.gpt, args.tokenizer):
        if not os.path.exists(path):
            raise PipelineError(f"checkpoint not found: {path}{_default_model_hint(path, 'missing')}")


def load_models(args, size: int | None = None, classes: str | None = None):
    """The models named by :func:`add_model_arguments`' flags. Missing or corrupt files: one
    clear error, with how to restore the shipped default model when it is the one. ``size`` (a
    decode resolution) and ``classes`` (--classes text) are checked against the models' configs
    before their weights are read."""
    from dar_jax import ar, pipeline
    from dar_jax import tokenizer as tok
    from dar_jax.cli import gpt_size_flags

    check_model_paths(args)
    # a model folder's config.json answers before any weights are read; a .pt has none, so its
    # size is checked once it is loaded
    tok_cfg = _load(lambda: pipeline.model_config(args.tokenizer, tok.FAMILY), args.tokenizer)
    size_checked = tok_cfg is not None
    if size_checked and size:
        tok.check_size(tok_cfg, size)
    gpt_cfg = _load(lambda: pipeline.model_config(args.gpt, ar.FAMILY), args.gpt)
    if gpt_cfg is not None and classes is not None:
        parse_classes(classes, gpt_cfg.num_classes)
    tok_cfg, tok_params = _load(lambda: pipeline.load_tokenizer(args.tokenizer), args.tokenizer)
    if size and not size_checked:
        tok.check_size(tok_cfg, size)
    gpt_cfg, gpt_params = _load(lambda: pipeline.load_gpt(
        args.gpt, default_block_size=tok_cfg.num_all_queries, **gpt_size_flags(args)), args.gpt)
    return pipeline.make_models(gpt_cfg, gpt_params, tok_cfg, tok_params)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="sample.py", description="Sample images with D-AR.",
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_model_arguments(ap)
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


def check_args(args) -> None:
    """Every option that can be checked without reading a file; raises PipelineError naming it."""
    from dar_jax.cli import sampling_flag_errors
    from dar_jax.pipeline import PipelineError, SampleOptions
    bad = sampling_flag_errors(args, {"--batch-size": 1, "--num-images": 0, "--per-class": 0,
                                      "--size": 0, "--layout-groups": 0})
    if args.num_images and args.per_class:
        bad.append("give --num-images or --per-class, not both")
    if bad:
        raise PipelineError("; ".join(bad))
    SampleOptions(cfg_scale=args.cfg_scale, solver=args.solver)  # malformed "a,b", unknown solver


def _default_model_hint(path: str, what: str) -> str:
    if str(default_model_dir()) not in os.path.abspath(path):
        return ""
    return (f" (the shipped default model is {what}: restore it with "
            "`git checkout -- models/default` or retrain it with scripts/train_default.sh)")


def _load(fn, path: str):
    """fn() with errors about the shipped default model's files given the way to restore it."""
    from dar_jax.cli import expected_errors
    try:
        return fn()
    except expected_errors() as e:
        hint = _default_model_hint(path, "corrupt")
        if not hint:
            raise
        raise type(e)(f"{e}{hint}") from None


def output_names(labels: np.ndarray, args) -> list[str]:
    """The files sample.py writes into --out."""
    names = []
    if not args.no_images:
        for i, lab in enumerate(labels):
            names.append(f"{i:06d}_class{int(lab)}.png")
            if args.previews:
                names.append(f"{i:06d}_class{int(lab)}_previews.png")
        names += ["grid.png"] + (["previews.png"] if args.previews else [])
    return names + (["samples.npz"] if args.npz else [])


def run(args) -> str:
    from dar_jax import io, pipeline
    from dar_jax.cli import init_distributed
    from dar_jax.pipeline import PipelineError

    # everything that can be checked before a model is read, then before anything is written
    check_args(args)
    init_distributed(args)
    check_model_paths(args)
    if args.layout_from and not os.path.isfile(args.layout_from):
        raise PipelineError(f"layout image not found: {args.layout_from}")
    out = pathlib.Path(io.check_output_dir(args.out, "--out"))
    size = args.size or None
    models = load_models(args, size, classes=args.classes)
    classes = parse_classes(args.classes, models.num_classes)
    labels = plan_labels(classes, args.num_images, args.per_class)
    for name in output_names(labels, args):
        io.check_output_file(out / name)
    opts = pipeline.SampleOptions(cfg_scale=args.cfg_scale, cfg_interval=args.cfg_interval,
                                  temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                                  solver=args.solver, num_steps=args.steps or None, dtype=args.dtype,
                                  size=size)
    return _sample_and_write(models, labels, opts, out, args)


def _sample_and_write(models, labels, opts, out: pathlib.Path, args) -> str:
    import jax

    from dar_jax import parallel, pipeline
    from dar_jax import tokenizer as tok
    prefix, prefix_len = None, 0
    if args.layout_from:
        size = tok.resolution(models.tok_cfg, opts.size)[0]
        image = pipeline.load_image(args.layout_from, size)
        codes, prefix_len = pipeline.layout_prefix(models, image, args.layout_groups)
        prefix = np.asarray(codes)

    # spread each batch over the devices of every process: a 1-D data mesh, parameters
    # replicated; each process places only the rows of its devices, outputs are gathered
    target = parallel.target_for(parallel.make_mesh({"data": -1}))
    main = jax.process_index() == 0
    bar = None
    if main and not args.quiet:
        from tqdm import tqdm
        bar = tqdm(total=len(labels), desc="sampling", unit="img", dynamic_ncols=True)
    t0 = time.perf_counter()

    def progress(done, total):
        if bar is not None:
            bar.update(done - bar.n)
            bar.set_postfix(img_per_s=f"{done / (time.perf_counter() - t0):.2f}")

    res = pipeline.sample_many(pipeline.place(models, target), labels, args.seed, opts,
                               batch_size=args.batch_size, target=target, prefix=prefix,
                               prefix_len=prefix_len, previews=args.previews, on_batch=progress)
    if bar is not None:
        bar.close()
    images = res.images
    if main:
        from dar_jax import io
        io.makedirs(out, "--out")
        _write_outputs(out, images, labels, res.tokens, res.previews, args)
        print(f"wrote {len(images)} images to {out.resolve()}")
    return str(out)


def _write_outputs(out: pathlib.Path, images: np.ndarray, labels: np.ndarray, tokens: np.ndarray,
                   strips, args) -> None:
    from dar_jax import io
    if not args.no_images:
        for i, (img, lab) in enumerate(zip(images, labels)):
            io.save_png(out / f"{i:06d}_class{int(lab)}.png", img)
            if strips is not None:
                io.save_png(out / f"{i:06d}_class{int(lab)}_previews.png", io.sheet(strips[i:i + 1]))
        io.save_png(out / "grid.png", io.grid(images))
        if strips is not None:
            io.save_png(out / "previews.png", io.sheet(strips))
    if args.npz:
        io.write_file(out / "samples.npz", lambda f: np.savez(f, arr_0=images, arr_1=labels, tokens=tokens))


def main(argv=None) -> int:
    from dar_jax.cli import guarded_main
    args = build_parser().parse_args(argv)
    return guarded_main(lambda: run(args))
