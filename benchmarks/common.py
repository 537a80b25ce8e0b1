"""Shared helpers of the benchmark scripts: timing, tables, memory bandwidth, and timing the
PyTorch reference (../shared/bench/bench_reference.py) in the same run.

The reference runs in its own environment (torch never enters the project):
    --reference-python /tmp/venv_ref/bin/python --reference-dir /tmp/dar_ref
(see ../shared/bench/README.md for the set-up).
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import resource
import statistics
import subprocess
import time

import jax
import jax.numpy as jnp
import numpy as np

REPO = pathlib.Path(__file__).resolve().parent.parent
SHARED_BENCH = REPO.parent / "shared" / "bench" / "bench_reference.py"


def add_reference_args(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--reference-python", default=os.environ.get("DAR_REFERENCE_PYTHON", ""),
                    help="python with torch for the PyTorch reference (empty: skip the baseline)")
    ap.add_argument("--reference-dir", default=os.environ.get("DAR_REFERENCE_DIR", ""),
                    help="checkout of showlab/D-AR")
    ap.add_argument("--reference-script", default=str(SHARED_BENCH))


def time_reference(args, job: str, batch: int, model: str | None = None, timeout: int = 3600) -> float | None:
    """Seconds per call of the reference on ``job`` (None when not configured or failing).
    Idle-machine figures of shared/bench/README.md: encode 3.30, decode 55.2, gpt_sample (GPT-B)
    40.1, gpt_train (GPT-B) 13.7 seconds."""
    if not args.reference_python or not args.reference_dir:
        return None
    cmd = [args.reference_python, args.reference_script, job, "--batch", str(batch)]
    if model:
        cmd += ["--model", model]
    env = {**os.environ, "PYTHONPATH": args.reference_dir}
    print(f"# reference: {' '.join(cmd)} (cwd {args.reference_dir})", flush=True)
    try:
        res = subprocess.run(cmd, cwd=args.reference_dir, env=env, capture_output=True, text=True,
                             timeout=timeout)
    except subprocess.TimeoutExpired:
        print(f"reference {job} timed out")
        return None
    lines = [l for l in res.stdout.splitlines() if l.startswith("{")]
    if res.returncode != 0 or not lines:
        print(f"reference {job} failed: {res.stderr[-500:]}")
        return None
    return float(json.loads(lines[-1])["seconds"])


def _call_times(fn, reps: int) -> tuple[float, list[float]]:
    """(seconds of a first call, seconds of each of ``reps`` further calls) of ``fn()``, each
    blocked on its result."""
    t = time.perf_counter()
    jax.block_until_ready(fn())
    first = time.perf_counter() - t
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - t)
    return first, times


def timed(fn, reps: int = 3) -> tuple[float, float]:
    """(median seconds, first-call seconds incl. compilation) of ``fn()``, blocked on its result."""
    first, times = _call_times(fn, reps)
    return statistics.median(times), first


def timeit(fn, reps: int = 3) -> float:
    """Median seconds of ``fn()`` after one warm-up call."""
    return timed(fn, reps)[0]


def best_of(fn, reps: int = 5) -> float:
    """Fastest of ``reps`` timed calls of ``fn()`` after one warm-up call (a physical probe: the
    best call is the closest to the machine's limit)."""
    return min(_call_times(fn, reps)[1])


def memory_bandwidth_gbs(num_bytes: int = 1 << 30) -> float:
    """Read bandwidth of the default device: a sum over a 1 GiB float32 buffer, best of 5."""
    x = jax.device_put(np.ones(num_bytes // 4, np.float32))
    f = jax.jit(lambda a: a.sum())
    return num_bytes / best_of(lambda: f(x)) / 1e9


def matmul_peak_gflops(n: int = 4096) -> float:
    """Dense float32 matmul throughput of the default device: one n x n @ n x n, best of 5."""
    a = jax.device_put(np.random.default_rng(0).standard_normal((n, n), dtype=np.float32))
    f = jax.jit(lambda x: x @ x)
    return 2 * n ** 3 / best_of(lambda: f(a)) / 1e9


def probes() -> dict:
    """The pinned physical probes, printed by every benchmark that reports a fraction of a bound
    (XLA's CPU thread pool uses every core; the thread count is printed with them)."""
    out = dict(threads=os.cpu_count(), bandwidth_gbs=memory_bandwidth_gbs(), matmul_gflops=matmul_peak_gflops())
    print(f"probes ({out['threads']} threads): memory read bandwidth {out['bandwidth_gbs']:.1f} GB/s "
          f"(1 GiB buffer, best of 5); float32 matmul peak {out['matmul_gflops']:.1f} GFLOP/s "
          f"(4096^2, best of 5)", flush=True)
    return out


def peak_host_memory_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def resident_memory_gib() -> dict:
    """The process's resident memory now by kind (Linux: /proc/self/status): anonymous (heap,
    XLA buffers) and file-backed (mapped code, e.g. the pages of jaxlib the compiler touched)."""
    out = {}
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(("RssAnon", "RssFile")):
                    key, value = line.split(":")
                    out[key.lower().replace("rss", "rss_") + "_gib"] = int(value.split()[0]) / 2**20
    except OSError:
        pass
    return out


def machine() -> str:
    dev = jax.devices()[0]
    return (f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
            f"jax {jax.__version__} {dev.platform} ({dev.device_kind})")


def print_table(rows: list[dict], columns: list[str]) -> None:
    widths = {c: max(len(c), *(len(_fmt(r.get(c))) for r in rows)) for c in columns}
    print(" | ".join(c.ljust(widths[c]) for c in columns))
    print("-|-".join("-" * widths[c] for c in columns))
    for r in rows:
        print(" | ".join(_fmt(r.get(c)).ljust(widths[c]) for c in columns))


def _fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def random_params(abstract, seed: int = 0):
    """Random weights for an abstract params pytree, drawn with NumPy as the parity fixtures do
    (matrices N(0, 1/fan_in), vectors small): fast, and no output layer is zero."""
    rng = np.random.default_rng(seed)

    def draw(path, leaf):
        name = str(path[-1].key) if hasattr(path[-1], "key") else str(path[-1])
        shape = leaf.shape
        if len(shape) == 1:
            base = 1.0 if name == "scale" else 0.0
            return jnp.asarray(base + 0.1 * rng.standard_normal(shape, dtype=np.float32))
        fan_in = int(np.prod(shape[:-1]))
        return jnp.asarray(rng.standard_normal(shape, dtype=np.float32) / np.sqrt(fan_in))

    return jax.tree_util.tree_map_with_path(draw, abstract)
