"""The benchmark scripts run: a smoke run of benchmarks/tokenizer.py on the tiny tokenizer (its
stale module names broke it twice without any test noticing)."""
from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

REPO = pathlib.Path(__file__).resolve().parents[2]


def test_tokenizer_benchmark_quick_run(tmp_path):
    out = tmp_path / "tok.json"
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    res = subprocess.run([sys.executable, str(REPO / "benchmarks" / "tokenizer.py"), "--quick", "--batches", "2",
                          "--dtypes", "float32", "--solvers", "euler", "--reps", "1", "--batch-chunks", "auto,1",
                          "--json", str(out)], capture_output=True, text=True, env=env, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    rows = json.loads(out.read_text())["rows"]
    kinds = {r["kind"] for r in rows}
    assert kinds == {"throughput", "solver", "accuracy"}
    chunks = [r["batch_chunk"] for r in rows if r["kind"] == "throughput"]
    assert chunks == ["auto", 1]
    assert all(r["decode_s"] > 0 and r["encode_s"] > 0 for r in rows if r["kind"] == "throughput")
