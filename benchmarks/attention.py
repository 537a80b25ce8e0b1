"""Attention benchmark: every available implementation on the D-AR shapes.

    python benchmarks/attention.py                 # time the implementations of this backend
    python benchmarks/attention.py --check         # + interpret-mode correctness (always on CPU)
    python benchmarks/attention.py --lower         # lower the GPU/TPU kernels without a device
    python benchmarks/attention.py --dump-ttir D   # write the Triton modules (real shapes) to D
    python benchmarks/attention.py --compile-ttir D   # (needs only `triton`) compile D for sm_90:
                                                      # registers, spills, shared memory

Timed cases (B x H x L x 64; ``--batch``/``--heads`` change B and H): self-attention with the
``none``, ``causal`` and ``prefix_causal`` (prefix L/2) masks and cross-attention to 32 keys for
L = 256, 512, 1024, each forward and forward+backward; decode of one position per row against a
256-entry cache (GPT-XL: 20 heads, 64 rows = batch 32 doubled by CFG). Each implementation whose
``supports`` accepts the call is timed (median of ``--iters`` jitted runs); TFLOP/s counts the
useful (unmasked) work: forward 4*D per visible (query, key) pair and head, backward 2.5x that;
decode reports the bytes of the valid cache read per second. Ratios are to ``xla`` in the same
run. On CPU only ``xla`` is timed (the kernels are interpreted there: ``--check`` tests them).
"""
from __future__ import annotations

import argparse
import glob
import os
import re
import statistics
import subprocess
import sys
import time

# peak numbers used for the "% of peak" columns, by device kind substring
PEAKS = {"H100": dict(bf16_tflops=989.0, hbm_gbs=3350.0),   # SXM
         "H200": dict(bf16_tflops=989.0, hbm_gbs=4800.0)}


def _peak(kind: str):
    for k, v in PEAKS.items():
        if k in kind:
            return v
    return None


def _visible_pairs(mask: str, lq: int, lk: int, prefix: int = 0) -> int:
    import numpy as np
    i = np.arange(lq)[:, None]
    j = np.arange(lk)[None, :]
    if mask == "none":
        return lq * lk
    vis = (j <= i) if mask == "causal" else ((j < prefix) | (j <= i))
    return int(vis.sum())


def _time(fn, *args, iters: int) -> float:
    import jax
    out = fn(*args)
    jax.block_until_ready(out)
    times = []
    for _ in range(iters):
        t = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def _cases(batch: int, heads: int, lengths):
    for length in lengths:
        yield ("none", length, length, 0)
        yield ("causal", length, length, 0)
        yield ("prefix_causal", length, length, length // 2)
        yield ("cross", length, 32, 0)


def bench(args):
    import jax
    import jax.numpy as jnp
    import dar_jax.nn.attention as A

    dtype = jnp.dtype(args.dtype)
    dev = jax.devices()[0]
    peak = _peak(dev.device_kind)
    backend = jax.default_backend()
    impls = [n for n in A.available_implementations() if n != "auto"]
    if backend == "cpu":
        impls = ["xla"]  # the kernels only run interpreted on CPU (see --check)
    print(f"# device: {dev.device_kind} ({backend}), dtype {dtype.name}, batch {args.batch}, "
          f"heads {args.heads}, head dim 64, jax {jax.__version__}")
    print("| case | impl | fwd ms | fwd TFLOP/s | fwd vs xla | fwd+bwd ms | fwd+bwd TFLOP/s |"
          " fwd+bwd vs xla |" + (" fwd+bwd % peak |" if peak else ""))
    print("|---|---|---|---|---|---|---|---|" + ("---|" if peak else ""))
    key = jax.random.key(0)
    for mask, lq, lk, prefix in _cases(args.batch, args.heads, args.lengths):
        kind = "none" if mask == "cross" else mask
        ks = jax.random.split(key, 4)
        q = jax.random.normal(ks[0], (args.batch, lq, args.heads, 64), dtype)
        k = jax.random.normal(ks[1], (args.batch, lk, args.heads, 64), dtype)
        v = jax.random.normal(ks[2], (args.batch, lk, args.heads, 64), dtype)
        do = jax.random.normal(ks[3], q.shape, dtype)
        flops = 4 * 64 * args.batch * args.heads * _visible_pairs(kind, lq, lk, prefix)
        base = {"f": None, "fb": None}
        for impl in impls:
            _, supports = A.IMPLEMENTATIONS[impl]
            if supports(q, k, v, mask=kind, prefix_len=prefix, kv_len=None, scale=None):
                continue
            f = jax.jit(lambda q, k, v: A.attention(q, k, v, mask=kind, prefix_len=prefix,
                                                    implementation=impl))
            g = jax.jit(lambda q, k, v, do: jax.vjp(
                lambda *a: A.attention(*a, mask=kind, prefix_len=prefix, implementation=impl),
                q, k, v)[1](do))
            t_f = _time(f, q, k, v, iters=args.iters)
            t_fb = _time(g, q, k, v, do, iters=args.iters)  # the vjp runs the forward too
            if impl == "xla":
                base = {"f": t_f, "fb": t_fb}
            tf_f, tf_fb = flops / t_f / 1e12, 3.5 * flops / t_fb / 1e12
            ratio = lambda b, t: f"{b / t:.2f}x" if b else "-"
            row = (f"| {mask} {lq}x{lk} | {impl} | {t_f * 1e3:.3f} | {tf_f:.2f} | "
                   f"{ratio(base['f'], t_f)} | {t_fb * 1e3:.3f} | {tf_fb:.2f} | "
                   f"{ratio(base['fb'], t_fb)} |")
            if peak:
                row += f" {100 * tf_fb / peak['bf16_tflops']:.1f}% |"
            print(row, flush=True)

    print()
    print("| decode (rows x heads x cache) | impl | ms | GB/s of valid cache |"
          + (" % HBM peak |" if peak else ""))
    print("|---|---|---|---|" + ("---|" if peak else ""))
    rows, heads, cache = args.decode_rows, args.decode_heads, 257
    ks = jax.random.split(key, 3)
    q = jax.random.normal(ks[0], (rows, 1, heads, 64), dtype)
    k = jax.random.normal(ks[1], (rows, cache, heads, 64), dtype)
    v = jax.random.normal(ks[2], (rows, cache, heads, 64), dtype)
    kv_len = jnp.full((rows,), cache, jnp.int32)
    nbytes = 2 * rows * cache * heads * 64 * dtype.itemsize + 2 * q.size * dtype.itemsize
    for impl in impls:
        _, supports = A.IMPLEMENTATIONS[impl]
        if supports(q, k, v, mask="decode", prefix_len=0, kv_len=kv_len, scale=None):
            continue
        f = jax.jit(lambda q, k, v, n: A.attention(q, k, v, mask="decode", kv_len=n,
                                                   implementation=impl))
        t = _time(f, q, k, v, kv_len, iters=args.iters)
        row = f"| {rows}x{heads}x{cache} | {impl} | {t * 1e3:.3f} | {nbytes / t / 1e9:.0f} |"
        if peak:
            row += f" {100 * nbytes / t / 1e9 / peak['hbm_gbs']:.1f}% |"
        print(row, flush=True)


def check(args):
    """Interpret-mode kernels vs xla (tiny shapes): max relative error of outputs and grads."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    import dar_jax.kernels as K
    A = sys.modules["dar_jax.nn.attention"]
    jax.config.update("jax_default_matmul_precision", "highest")
    small = K.FlashBlocks(block_q=16, block_k=16, block_q_dkv=16, block_k_dkv=16, block_q_dq=16,
                          block_k_dq=16)
    print("\n| interpret-mode check | kernel | dtype | max rel err out | max rel err dq, dk, dv |"
          " seconds |")
    print("|---|---|---|---|---|---|")
    cases = [("none (cross)", "none", 37, 21, 0, None), ("causal", "causal", 37, 37, 0, None),
             ("prefix_causal", "prefix_causal", 37, 37, 19, None),
             ("decode Lq=5", "decode", 5, 40, 0, (23, 40))]
    for dtype in (jnp.float32, jnp.bfloat16):
        for name, mask, lq, lk, prefix, lens in cases:
            for kernel in ("flash", "splash") if mask != "decode" else ("flash", "decode"):
                ks = jax.random.split(jax.random.key(0), 4)
                lq_, lk_ = (lq, lk) if kernel != "splash" else (lq + 100, lk + 100)
                q = jax.random.normal(ks[0], (2, lq_, 2, 32), jnp.float32).astype(dtype)
                k = jax.random.normal(ks[1], (2, lk_, 2, 32), jnp.float32).astype(dtype)
                v = jax.random.normal(ks[2], (2, lk_, 2, 32), jnp.float32).astype(dtype)
                do = jax.random.normal(ks[3], q.shape, jnp.float32).astype(dtype)
                kw = dict(mask=mask, prefix_len=prefix,
                          kv_len=None if lens is None else jnp.array(lens, jnp.int32))
                fn = {"flash": lambda q, k, v: K.flash_attention(q, k, v, blocks=small,
                                                                 interpret=True, **kw),
                      "splash": lambda q, k, v: K.splash_attention(
                          q, k, v, mask=mask, prefix_len=prefix, interpret=True),
                      "decode": lambda q, k, v: K.decode_attention(
                          q, k, v, kw["kv_len"], blocks=K.DecodeBlocks(block_k=16, num_splits=2),
                          interpret=True)}[kernel]
                t = time.perf_counter()
                out, vjp = jax.vjp(fn, q, k, v)
                grads = vjp(do)
                f32 = lambda x: x.astype(jnp.float32)
                ref, ref_vjp = jax.vjp(lambda *a: A.xla_attention(*a, **kw), f32(q), f32(k), f32(v))
                ref_g = ref_vjp(f32(do))
                rel = lambda x, r: float(np.abs(np.asarray(x, np.float32) - np.asarray(r)).max()
                                         / np.abs(np.asarray(r)).max())
                gerr = ", ".join(f"{rel(g, r):.1e}" for g, r in zip(grads, ref_g))
                label = "decode (grads: xla)" if kernel == "decode" else kernel
                print(f"| {name} {lq_}x{lk_} | {label} | {jnp.dtype(dtype).name} | "
                      f"{rel(out, ref):.1e} | {gerr} | {time.perf_counter() - t:.1f} |", flush=True)


def _lower_cases():
    import jax.numpy as jnp
    return [  # (name, mask, b, lq, lk, h, d, dtype, prefix)
        ("gpt-xl causal", "causal", 32, 257, 257, 20, 64, jnp.bfloat16, 0),
        ("tokenizer prefix", "prefix_causal", 32, 1024, 1024, 12, 64, jnp.bfloat16, 512),
        ("tokenizer self", "none", 32, 1024, 1024, 12, 64, jnp.bfloat16, 0),
        ("tokenizer cross", "none", 32, 1024, 32, 12, 64, jnp.bfloat16, 0),
        ("train target", "causal", 32, 1024, 1024, 12, 64, jnp.bfloat16, 0),
        ("head dim 128", "causal", 8, 1024, 1024, 8, 128, jnp.bfloat16, 0),
        ("float32", "causal", 8, 257, 257, 8, 64, jnp.float32, 0),
        ("float32 d128", "causal", 8, 1024, 1024, 8, 128, jnp.float32, 0),
        ("prefill decode", "decode", 64, 33, 257, 20, 64, jnp.bfloat16, 0),
    ]


def lower(args, dump_dir: str | None = None):
    """Lowers every kernel for 'cuda' (Triton modules, verified) and 'tpu' (Mosaic) on any host."""
    import jax
    import jax.numpy as jnp
    import dar_jax.kernels as K
    from jax._src.pallas.triton import lowering as tl
    original = tl.lower_jaxpr_to_triton_module
    names: list[str] = []

    def checked(*a, **kw):
        res = original(*a, **kw)
        ok = res.module.operation.verify()
        name = names.pop(0) if names else "kernel"
        if dump_dir:
            with open(os.path.join(dump_dir, f"{name}.ttir"), "w") as fh:
                fh.write(res.module.operation.get_asm(enable_debug_info=False))
        print(f"  triton module {name}: grid {res.grid}, verified {ok}")
        return res

    tl.lower_jaxpr_to_triton_module = checked
    if dump_dir:
        os.makedirs(dump_dir, exist_ok=True)
    try:
        for name, mask, b, lq, lk, h, d, dtype, prefix in _lower_cases():
            blocks = K.default_blocks(lq, lk, d, dtype)
            tag = re.sub(r"\W+", "_", name)
            # file names carry the launch parameters the compile step needs
            names.extend([f"{tag}__fwd__w{blocks.num_warps}s{blocks.num_stages}",
                          f"{tag}__dkv__w{blocks.num_warps_bwd}s{blocks.num_stages_bwd}",
                          f"{tag}__dq__w{blocks.num_warps_bwd}s{blocks.num_stages_bwd}"])
            q = jax.ShapeDtypeStruct((b, lq, h, d), dtype)
            k = jax.ShapeDtypeStruct((b, lk, h, d), dtype)
            n = jax.ShapeDtypeStruct((b,), jnp.int32)

            def loss(q, k, v, n):
                return K.flash_attention(q, k, v, mask=mask, prefix_len=prefix, interpret=False,
                                         kv_len=n if mask == "decode" else None
                                         ).astype(jnp.float32).sum()

            print(f"{name}: {blocks}")
            jax.jit(jax.grad(loss, argnums=(0, 1, 2))).trace(q, k, k, n).lower(
                lowering_platforms=("cuda",))
        for name, rows, h, hkv in [("decode gpt-xl", 64, 20, 20), ("decode gqa", 64, 16, 2)]:
            blocks = K.DecodeBlocks()
            tag = name.replace(" ", "_")
            names.append(f"{tag}__decode__w{blocks.num_warps}s{blocks.num_stages}")
            q = jax.ShapeDtypeStruct((rows, 1, h, 64), jnp.bfloat16)
            k = jax.ShapeDtypeStruct((rows, 257, hkv, 64), jnp.bfloat16)
            n = jax.ShapeDtypeStruct((rows,), jnp.int32)
            print(f"{name}:")
            jax.jit(lambda q, k, v, n: K.decode_attention(q, k, v, n, interpret=False)).trace(
                q, k, k, n).lower(lowering_platforms=("cuda",))
    finally:
        tl.lower_jaxpr_to_triton_module = original
    for name, mask, b, lq, lk, h, d, dtype, prefix in _lower_cases()[:4]:
        q = jax.ShapeDtypeStruct((b, lq, h, d), dtype)
        k = jax.ShapeDtypeStruct((b, lk, h, d), dtype)
        loss = lambda q, k, v: K.splash_attention(q, k, v, mask=mask, prefix_len=prefix,
                                                  interpret=False).astype(jnp.float32).sum()
        text = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).trace(q, k, k).lower(
            lowering_platforms=("tpu",)).as_text()
        print(f"splash {name}: {text.count('tpu_custom_call')} Mosaic kernels lowered for TPU")


def compile_ttir(directory: str):
    """Compiles dumped Triton modules for sm_90 with the `triton` package (no jax needed)."""
    import triton
    from triton.backends.compiler import GPUTarget
    bindir = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    print(f"| module (triton {triton.__version__}, sm_90) | warps | stages | shared KiB |"
          " registers | spill stack B |")
    print("|---|---|---|---|---|---|")
    for path in sorted(glob.glob(os.path.join(directory, "*.ttir"))):
        name = os.path.basename(path)[:-5]
        m = re.search(r"__w(\d+)s(\d+)$", name)
        warps, stages = (int(m.group(1)), int(m.group(2))) if m else (4, 2)
        kernel = triton.compile(path, target=GPUTarget("cuda", 90, 32),
                                options={"num_warps": warps, "num_stages": stages})
        cubin = os.path.join(directory, name + ".cubin")
        with open(cubin, "wb") as fh:
            fh.write(kernel.asm["cubin"])
        res = subprocess.run([os.path.join(bindir, "cuobjdump"), "-res-usage", cubin],
                             capture_output=True, text=True).stdout
        regs = re.search(r"REG:(\d+)", res)
        stack = re.search(r"STACK:(\d+)", res)
        print(f"| {name.split('__w')[0]} | {warps} | {stages} | {kernel.metadata.shared // 1024} |"
              f" {regs.group(1) if regs else '?'} | {stack.group(1) if stack else '?'} |",
              flush=True)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=None, help="default 32 (GPU/TPU), 1 (CPU)")
    p.add_argument("--heads", type=int, default=None, help="default 12 (GPU/TPU), 2 (CPU)")
    p.add_argument("--lengths", type=int, nargs="+", default=None,
                   help="default 256 512 1024 (GPU/TPU), 256 512 (CPU)")
    p.add_argument("--decode-rows", type=int, default=64)
    p.add_argument("--decode-heads", type=int, default=20)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--iters", type=int, default=None)
    p.add_argument("--check", action="store_true", help="interpret-mode correctness table")
    p.add_argument("--no-bench", action="store_true")
    p.add_argument("--lower", action="store_true", help="lower kernels for cuda and tpu")
    p.add_argument("--dump-ttir", metavar="DIR", help="with --lower: write the Triton modules")
    p.add_argument("--compile-ttir", metavar="DIR", help="compile dumped modules (needs triton)")
    args = p.parse_args()
    if args.compile_ttir:
        return compile_ttir(args.compile_ttir)
    import jax
    cpu = jax.default_backend() == "cpu"
    args.batch = args.batch or (1 if cpu else 32)
    args.heads = args.heads or (2 if cpu else 12)
    args.lengths = args.lengths or ([256, 512] if cpu else [256, 512, 1024])
    args.iters = args.iters or (3 if cpu else 20)
    if cpu:
        args.decode_rows, args.decode_heads = min(args.decode_rows, 8), min(args.decode_heads, 4)
    if not args.no_bench:
        bench(args)
    if args.check or (cpu and not args.no_bench):  # on CPU the kernels can only be checked
        check(args)
    if args.lower or args.dump_ttir:
        lower(args, args.dump_ttir)


if __name__ == "__main__":
    main()
