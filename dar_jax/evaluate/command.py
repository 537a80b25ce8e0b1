"""``python -m dar_jax.evaluate``: the published protocol in one command.

Generation (D-AR's protocol by default: 50,000 samples, uniformly random labels, CFG schedule
"1.2,8.0", top-k 0, top-p 1, uint8 by clamp(127.5 x + 128)) or the class-balanced protocol
(``--per-class 50``), written in resumable shards (a killed run regenerates only missing shards),
then FID / IS / precision / recall against a reference (the ADM suite's
``VIRTUAL_imagenet256_labeled.npz`` or a stats file of this project). ``--rfid`` measures a
tokenizer instead: reconstruction FID on the centre crops the tokenizer sees, which are saved
(shards + reference statistics) for reuse. Results go to ``<out>/results.json`` with every
setting that affects them, including fingerprints of the models' parameters: samples of a
model that was replaced at the same path are never reused. Every option and input file is
checked before anything is generated or written.

    python -m dar_jax.evaluate --gpt ckpt/dar_l --tokenizer ckpt/tokenizer_v1 \
        --inception pt_inception-2015-12-05-6726825d.pth \
        --reference VIRTUAL_imagenet256_labeled.npz --out eval/dar_l
    python -m dar_jax.evaluate --rfid --tokenizer ckpt/tokenizer_v1 --inception ... \
        --data-kind tfds --data-name imagenet2012 --num-samples 50000 --out eval/rfid_v1
"""
from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np

from dar_jax import evaluate as ev


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m dar_jax.evaluate", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="output directory (shards, results.json)")
    ap.add_argument("--tokenizer", required=True, help="tokenizer model directory or reference .pt")
    ap.add_argument("--gpt", default=None, help="GPT model directory or reference .pt (size inferred)")
    ap.add_argument("--inception", required=True, help="pytorch-fid weights (pt_inception-2015-12-05-*.pth)")
    ap.add_argument("--protocol", default="adm", choices=["adm", "pytorch_fid"],
                    help="Inception preprocessing: adm (TF graph of the ADM suite) or pytorch_fid")
    ap.add_argument("--inception-batch-size", type=int, default=100,
                    help="images per Inception call (split over the local devices)")
    ap.add_argument("--reference", default=None,
                    help="ADM reference batch or dar-jax stats npz (omit: IS only, stats saved)")
    ap.add_argument("--num-samples", type=int, default=50_000)
    ap.add_argument("--labels", default="random", choices=list(ev.protocol.LABEL_MODES))
    ap.add_argument("--per-class", type=int, default=0, help="class-balanced protocol: N per class")
    ap.add_argument("--cfg-scale", default="1.2,8.0")
    ap.add_argument("--cfg-interval", type=int, default=-1)
    ap.add_argument("--top-k", type=int, default=0)
    ap.add_argument("--top-p", type=float, default=1.0)
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--solver", default="adams2")
    ap.add_argument("--steps", type=int, default=0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--dtype", default=None, choices=["float32", "bfloat16"])
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--shard-size", type=int, default=1000)
    ap.add_argument("--npz", action="store_true", help="also assemble the ADM evaluator's samples.npz")
    ap.add_argument("--pr-dtype", default="float32", choices=["float32", "float16"],
                    help="precision/recall distance dtype (float16 mimics the ADM suite)")
    # reconstruction FID
    ap.add_argument("--rfid", action="store_true", help="reconstruction FID of the tokenizer")
    ap.add_argument("--data-kind", default="tfds", help="rFID data: tfds | folder | synthetic")
    ap.add_argument("--data-name", default="imagenet2012")
    ap.add_argument("--data-dir", default="")
    ap.add_argument("--data-split", default="validation")
    ap.add_argument("--image-size", type=int, default=256)
    ap.add_argument("--quiet", action="store_true")
    from dar_jax.cli import add_gpt_size_flags
    add_gpt_size_flags(ap)
    from dar_jax.cli import add_distributed_args
    add_distributed_args(ap)
    return ap


def _main() -> bool:
    import jax
    return jax.process_index() == 0


def _barrier(name: str) -> None:
    """Waits for every process (no-op on one): shards of all processes are complete after it."""
    import jax
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        multihost_utils.sync_global_devices(f"dar_evaluate_{name}")


def _prepare(directory, labels, shard_size, settings):
    """The shard plan, made by process 0 first (the others reopen and check it)."""
    plan = ev.prepare_shards(directory, labels, shard_size, settings) if _main() else None
    _barrier(f"plan_{os.path.basename(str(directory))}")
    return plan or ev.prepare_shards(directory, labels, shard_size, settings)


def _progress(total: int, desc: str, quiet: bool):
    if quiet or not _main():
        return None
    from tqdm import tqdm
    return tqdm(total=total, desc=desc, unit="shard", dynamic_ncols=True)


def _run_plan(plan, generate_fn, desc: str, quiet: bool, hooks) -> dict:
    bar = _progress(plan.num_shards, desc, quiet)

    def on_shard(done, total):
        if bar is not None:
            bar.n = done
            bar.refresh()
        hooks("shard", done)

    report = ev.generate_samples(plan, generate_fn, on_shard=on_shard)   # this process's shards
    if bar is not None:
        bar.close()
    _barrier(f"shards_{os.path.basename(plan.directory)}")
    return report


def _in_batches(fn, batch_size: int):
    """fn(labels, indices) applied ``batch_size`` rows at a time (reconstructions)."""
    def run(labels, indices):
        return np.concatenate([np.asarray(fn(labels[s:s + batch_size], indices[s:s + batch_size]))
                               for s in range(0, len(labels), batch_size)])
    return run


def _generation_fn(models, args):
    """generate(labels, indices) -> uint8 images over this process's devices (each process
    generates its own shards): :func:`pipeline.sample_many`."""
    from dar_jax import parallel, pipeline
    target = parallel.target_for(parallel.local_mesh({"data": -1}))
    models = pipeline.place(models, target)
    opts = pipeline.SampleOptions(cfg_scale=args.cfg_scale, cfg_interval=args.cfg_interval,
                                  temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                                  solver=args.solver, num_steps=args.steps or None, dtype=args.dtype)

    def generate(labels, indices):
        return pipeline.sample_many(models, labels, args.seed, opts, batch_size=args.batch_size,
                                    target=target, indices=indices).images

    return generate


def _settings(args, keys) -> dict:
    return {k: getattr(args, k.replace("-", "_")) for k in keys}


def check_args(args) -> None:
    """Every option and input path, before anything is loaded, generated or written."""
    from dar_jax import io, pipeline
    from dar_jax.cli import sampling_flag_errors
    bad = sampling_flag_errors(args, {"--num-samples": 1, "--batch-size": 1, "--shard-size": 1,
                                      "--per-class": 0, "--inception-batch-size": 1, "--image-size": 1})
    if bad:
        raise pipeline.PipelineError("; ".join(bad))
    pipeline.SampleOptions(cfg_scale=args.cfg_scale, solver=args.solver)  # malformed "a,b", solver
    if not args.rfid and not args.gpt:
        raise pipeline.PipelineError("--gpt is required (or --rfid for a tokenizer alone)")
    paths = [("--inception", args.inception), ("--tokenizer", args.tokenizer)]
    paths += [] if args.rfid else [("--gpt", args.gpt)]
    paths += [("--reference", args.reference)] if args.reference else []
    for flag, path in paths:
        if not os.path.exists(path):
            raise pipeline.PipelineError(f"{flag} not found: {path}")
    io.check_output_dir(args.out, "--out")
    if args.reference:
        ev.check_reference(args.reference)


def run(args, hooks=None) -> dict | None:
    """Every process generates its shards (shard i: process i % count, on its own devices);
    process 0 then computes the metrics and writes results.json (the others return None).
    ``hooks(event, n)``, if given, is called with ``("shard", shards done)`` after each new
    shard (tests interrupt a run there)."""
    from dar_jax import pipeline
    from dar_jax.checkpoint import store
    from dar_jax.cli import gpt_size_flags, init_distributed
    hooks = hooks or (lambda event, n: None)
    t0 = time.perf_counter()
    check_args(args)
    init_distributed(args)
    params = ev.load_inception(args.inception)
    extract = ev.feature_extractor(ev.InceptionConfig(protocol=args.protocol), params,
                                   batch_size=args.inception_batch_size)
    results: dict = {"command": "rfid" if args.rfid else "generation", "inception": args.inception,
                     "protocol": args.protocol}
    if args.rfid:
        rfid = _rfid(args, extract, hooks)
        if rfid is None:
            return None
        results.update(rfid)
    else:
        models = pipeline.load_models(args.gpt, args.tokenizer, **gpt_size_flags(args))
        if args.per_class:
            labels = ev.sample_labels(args.per_class * models.num_classes, models.num_classes, "balanced")
        else:
            labels = ev.sample_labels(args.num_samples, models.num_classes, args.labels, args.seed)
        settings = _settings(args, ["gpt", "tokenizer", "cfg_scale", "cfg_interval", "top_k", "top_p",
                                    "temperature", "solver", "steps", "seed", "dtype", "labels", "per_class"])
        settings["label_mode"] = "balanced" if args.per_class else args.labels
        settings["gpt_fingerprint"] = store.fingerprint(models.gpt_params)
        settings["tokenizer_fingerprint"] = store.fingerprint(models.tok_params)
        generate = _generation_fn(models, args)
        plan = _prepare(os.path.join(args.out, "samples"), labels, args.shard_size, settings)
        # the reference (checked in check_args) is read before any sample is generated
        ref = ev.read_reference(args.reference, extract, need_activations=False) if args.reference else None
        results["settings"] = settings
        results["num_samples"] = plan.num_samples
        results["shards"] = _run_plan(plan, generate, "generating", args.quiet, hooks)
        if not _main():
            return None
        if args.npz:
            results["samples_npz"] = ev.assemble_npz(plan, os.path.join(args.out, "samples.npz"))
        stats, logits = ev.sample_features(plan, extract, keep_activations=bool(args.reference))
        results.update(_metrics(args, stats, logits, ref))
    results["seconds"] = time.perf_counter() - t0
    path = os.path.join(args.out, "results.json")
    from dar_jax import io
    io.write_file(path, lambda f: f.write(json.dumps(results, indent=1, default=_json_default).encode()))
    print(json.dumps({k: results[k] for k in ("fid", "inception_score", "precision", "recall", "rfid")
                      if k in results}))
    print(f"wrote {path}")
    return results


def _metrics(args, stats, logits, ref) -> dict:
    out = {}
    if ref is not None:
        if ref.dim != stats.dim:
            raise ev.FeatureSizeError(f"{args.reference} holds features of size {ref.dim}, the "
                                      f"samples {stats.dim}")
        out.update(ev.evaluate_features(stats, logits, ref, distance_dtype=args.pr_dtype))
        out["reference"] = ref.meta
    else:
        out["inception_score"] = ev.inception_score(logits)
        ev.save_reference(os.path.join(args.out, "sample_stats.npz"), stats)
        out["sample_stats"] = os.path.join(args.out, "sample_stats.npz")
    return out


def _rfid(args, extract, hooks) -> dict:
    from dar_jax import data, pipeline
    from dar_jax import tokenizer as tok
    from dar_jax.checkpoint import store
    from dar_jax.data.augment import center_crop_arr
    tok_cfg, tok_params = pipeline.load_tokenizer(args.tokenizer)
    data_cfg = {"kind": args.data_kind, "name": args.data_name, "data_dir": args.data_dir,
                "image_size": args.image_size}
    if args.data_kind == "synthetic":
        data_cfg["num_classes"] = 10
    source = data.make_source(data_cfg, args.data_split)
    n = min(args.num_samples, len(source))
    crop_settings = {"data": data_cfg, "split": args.data_split, "crop": "adm_center_crop"}
    crops = _prepare(os.path.join(args.out, "crops"), np.zeros(n, np.int32),
                     args.shard_size, crop_settings)

    def crop_fn(labels, indices):
        return np.stack([center_crop_arr(np.asarray(source[int(i)]["image"]), args.image_size)
                         for i in indices]).astype(np.uint8)

    report = {"crops": _run_plan(crops, crop_fn, "center crops", args.quiet, hooks)}
    recon_settings = {"tokenizer": args.tokenizer, "solver": args.solver, "steps": args.steps,
                      "seed": args.seed, "crops": crop_settings,
                      "tokenizer_fingerprint": store.fingerprint(tok_params)}
    recon = _prepare(os.path.join(args.out, "reconstructions"), np.zeros(n, np.int32),
                     args.shard_size, recon_settings)
    crop_images = {}

    def crop_batch(indices):
        out = []
        for i in indices:
            shard = int(i) // crops.shard_size
            if shard not in crop_images:
                crop_images.clear()
                with np.load(crops.path(shard)) as z:
                    crop_images[shard] = z["images"]
            out.append(crop_images[shard][int(i) - shard * crops.shard_size])
        return np.stack(out)

    def recon_fn(labels, indices):
        images = crop_batch(indices).astype(np.float32) / 127.5 - 1.0
        codes = tok.encode(tok_cfg, tok_params, images)
        noise = pipeline.decode_noise(pipeline.keys_for(args.seed, indices), *images.shape[1:3])
        out = tok.decode(tok_cfg, tok_params, codes, noise, solver=args.solver,
                         num_steps=args.steps or None)
        return np.asarray(pipeline.to_uint8(out))

    report["reconstructions"] = _run_plan(recon, _in_batches(recon_fn, args.batch_size),
                                          "reconstructing", args.quiet, hooks)
    if not _main():
        return None
    ref_path = os.path.join(args.out, "crops_reference.npz")
    if os.path.exists(ref_path):
        ref = ev.read_reference(ref_path)
    else:
        ref, _ = ev.sample_features(crops, extract, keep_activations=True)
        ev.save_reference(ref_path, ref)
    stats, logits = ev.sample_features(recon, extract, keep_activations=True)
    metrics = ev.evaluate_features(stats, logits, ref, distance_dtype=args.pr_dtype)
    return {"settings": recon_settings, "num_samples": n, "shards": report, "rfid": metrics["fid"],
            "reference": ref_path, **{k: v for k, v in metrics.items() if k != "fid"}}


def _json_default(x):
    if isinstance(x, np.ndarray):
        return x.tolist()
    if isinstance(x, (np.integer, np.floating)):
        return x.item()
    return str(x)


def main(argv=None, hooks=None) -> int:
    from dar_jax.cli import guarded_main
    args = build_parser().parse_args(argv)
    return guarded_main(lambda: run(args, hooks))
