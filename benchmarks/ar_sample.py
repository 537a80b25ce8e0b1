"""AR sampling speed: 256-token generation with CFG, images/s and tokens/s.

    python benchmarks/ar_sample.py                         # GPT-B, batch 1/4/16, f32 + bf16
    python benchmarks/ar_sample.py --models GPT-B GPT-L --batches 4 \
        --reference-python /tmp/venv_ref/bin/python --reference-dir /tmp/dar_ref

Baselines measured in the same run: a token-by-token Python loop over the same jitted decode step
(what a straightforward port does), the bound of reading every weight once per token at the
measured memory bandwidth, the bound of its matmul FLOPs at the measured matmul peak (both probes
run by this script: common.probes), and (optionally) the PyTorch reference (GPT-B, batch 4, CFG 4).
"""
from __future__ import annotations

import argparse
import functools
import sys

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parent))
import common  # noqa: E402

from dar_jax import ar  # noqa: E402
from dar_jax.ar import generation  # noqa: E402
from dar_jax.parallel import default_target  # noqa: E402


def python_loop_generate(cfg, params, labels, key, scale, n):
    """Baseline: one jitted call per token (same math, Python drives the loop)."""
    b = labels.shape[0]
    target = default_target()
    st = generation._StaticOptions(num_tokens=n, cfg_active=True, top_k=0, use_top_p=False, greedy=False,
                                   cfg_interval=-1, target=target)
    keys = ar.sample_keys(key, b)

    @functools.partial(jax.jit, donate_argnums=(1,))
    def step(params, cache, x, pos):
        model = ar.bind(cfg, params)
        logits, cache = model.decode(x, pos, cache, target)
        logits = logits[:, -1]
        mixed = logits[b:] + (logits[:b] - logits[b:]) * scale
        tok = generation._sample_token(mixed, keys, pos, jnp.float32(1.0), jnp.float32(1.0), st)
        return tok, cache

    @jax.jit
    def embed_labels(params, labels):
        m = ar.bind(cfg, params)
        return m.embed_labels(jnp.concatenate([labels, jnp.full_like(labels, cfg.num_classes)]))[:, None]

    @jax.jit
    def embed_tokens(params, tok):
        return ar.bind(cfg, params).embed_tokens(jnp.concatenate([tok, tok]))[:, None]

    cache = ar.bind(cfg, params).init_cache(2 * b, target=target)
    tok, cache = step(params, cache, embed_labels(params, labels), 0)
    out = [tok]
    for pos in range(1, n):
        tok, cache = step(params, cache, embed_tokens(params, tok), pos)
        out.append(tok)
    return jnp.stack(out, 1)


def matmul_params(cfg) -> int:
    """Weights used in matmuls at every token step (all but the two embedding tables; the output
    head included)."""
    total = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(ar.abstract_params(cfg)))
    return total - cfg.vocab_size * cfg.dim - (cfg.num_classes + 1) * cfg.dim


def weight_bytes(cfg, dtype_bytes: int) -> int:
    """Bytes of the weights read per token step (all matmul weights incl. the output head)."""
    return matmul_params(cfg) * dtype_bytes


def generation_flops(cfg, rows: int, tokens: int) -> float:
    """Analytic FLOPs of generating ``tokens`` tokens for ``rows`` rows (CFG rows included): the
    matmuls (2 per weight per row and token) and attention against the cache (q.k and p.v)."""
    attn = sum(4 * cfg.n_layer * cfg.dim * (t + 1) for t in range(tokens))
    return rows * (2.0 * matmul_params(cfg) * tokens + attn)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", nargs="+", default=["GPT-B"])
    ap.add_argument("--batches", nargs="+", type=int, default=[1, 4, 16])
    ap.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--cfg-scale", type=float, default=4.0)
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--no-python-loop", action="store_true")
    common.add_reference_args(ap)
    args = ap.parse_args()

    print(f"machine: {common.machine()}")
    probe = common.probes()
    bw, peak = probe["bandwidth_gbs"], probe["matmul_gflops"]
    rows = []
    for name in args.models:
        for dtype in args.dtypes:
            cfg = ar.gpt_config(name, block_size=args.tokens, dtype=dtype)
            params = ar.init_params(cfg, jax.random.key(0))
            params = jax.tree.map(lambda x: x + 0.01 * jax.random.normal(jax.random.key(1), x.shape), params)
            for b in args.batches:
                labels = jnp.arange(b) % cfg.num_classes
                run = lambda: ar.generate(cfg, params, labels, jax.random.key(0),
                                          cfg_scale=args.cfg_scale).block_until_ready()
                sec = common.timeit(run, reps=args.reps)
                row = dict(model=name, dtype=dtype, batch=b, seconds=sec, images_per_s=b / sec,
                           tokens_per_s=b * args.tokens / sec)
                # weights are read in float32 on CPU whatever the compute dtype (see generation.py)
                wb = weight_bytes(cfg, 4 if (dtype == "float32" or jax.default_backend() == "cpu") else 2)
                rows_run = 2 * b if args.cfg_scale > 1.0 else b
                row["weight_read_bound_s"] = args.tokens * wb / (bw * 1e9)
                row["compute_bound_s"] = generation_flops(cfg, rows_run, args.tokens) / (peak * 1e9)
                row["fraction_of_bound"] = max(row["weight_read_bound_s"], row["compute_bound_s"]) / sec
                if not args.no_python_loop:
                    loop = lambda: python_loop_generate(cfg, params, labels, jax.random.key(0),
                                                        args.cfg_scale, args.tokens).block_until_ready()
                    row["python_loop_s"] = common.timeit(loop, reps=1)
                    row["speedup_vs_loop"] = row["python_loop_s"] / sec
                rows.append(row)
                print(row, flush=True)
    print()
    common.print_table(rows, ["model", "dtype", "batch", "seconds", "images_per_s", "tokens_per_s",
                              "python_loop_s", "speedup_vs_loop", "weight_read_bound_s", "compute_bound_s",
                              "fraction_of_bound"])
    ref = common.time_reference(args, "gpt_sample", 4, "GPT-B")
    if ref is not None:
        ours = [r for r in rows if r["model"] == "GPT-B" and r["dtype"] == "float32" and r["batch"] == 4]
        if ours:
            print(f"\nPyTorch reference GPT-B batch 4 CFG 4: {ref:.2f} s; dar-jax {ours[0]['seconds']:.2f} s "
                  f"-> {ref / ours[0]['seconds']:.2f}x faster")


if __name__ == "__main__":
    main()
