"""Arrays spanning hosts: 2 processes x 4 CPU devices (jax.distributed on 127.0.0.1, gloo).

One run of two processes trains, evaluates and exports the AR task with FSDP over all 8 devices
and with a (data 2, fsdp 2, tensor 2) mesh, and the tokenizer task with FSDP (its evaluation
writes the reconstruction grids); the checkpoints are then restored and trained on by one
process on another device count (after sample.py on two processes gave the images of one).
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest

from conftest import REPO, TESTS

WORKER = str(TESTS / "train_worker.py")
DEFAULT_TOKENIZER = REPO / "models" / "default" / "tokenizer"
# a GPT that fits the shipped tokenizer (codebook 128, 32 tokens, 10 classes)
GPT = {"vocab_size": 128, "block_size": 32, "num_classes": 10}
ENV = {"JAX_PLATFORMS": "cpu"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _two_processes(cmd_for, env=None, timeout=900):
    """Runs cmd_for(process_id, coordinator) for processes 0 and 1 together; their outputs."""
    coordinator = f"127.0.0.1:{_free_port()}"
    procs = [subprocess.Popen(cmd_for(i, coordinator), cwd=REPO, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env={**os.environ, **ENV, **(env or {})})
             for i in range(2)]
    outs = []
    try:
        for p in procs:
            outs.append(p.communicate(timeout=timeout))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert all(p.returncode == 0 for p in procs), "\n---\n".join(o[1][-3000:] for o in outs)
    return outs


def _result(stdout: str):
    return json.loads([l for l in stdout.splitlines() if l.startswith("RESULT ")][-1][7:])


def _worker(spec, timeout=900):
    res = subprocess.run([sys.executable, WORKER, json.dumps(spec)], cwd=REPO, capture_output=True,
                         text=True, timeout=timeout, env={**os.environ, **ENV})
    assert res.returncode == 0, res.stderr[-3000:]
    return _result(res.stdout)


@pytest.fixture(scope="module")
def two_process_runs(tmp_path_factory, inception_dir):
    root = tmp_path_factory.mktemp("mp")
    ar_eval = [f"tokenizer.checkpoint={DEFAULT_TOKENIZER}", "train.eval_every_steps=3",
               f"eval.inception={inception_dir / 'pt_inception_random.pth'}",
               "eval.fid_num_samples=8", "eval.batch_size=8", "eval.steps=2"]
    runs = [
        {"workdir": str(root / "fsdp"), "mesh": {"data": 1, "fsdp": 8}, "model": GPT,
         "overrides": ar_eval},
        {"workdir": str(root / "dft"), "mesh": {"data": 2, "fsdp": 2, "tensor": 2}, "model": GPT},
        {"task": "tokenizer", "workdir": str(root / "tok"), "mesh": {"data": 1, "fsdp": 8},
         "steps": 2, "batch": 8, "ema": 0.0, "eval_every": 2,
         # one block of each kind: the sharding and the gathers are those of any depth
         "overrides": ["eval.num_images=4", "eval.steps=2", "model.num_encoder_layers=1",
                       "model.num_decoder_layers=1", "model.diff_decoder.depth=1"]},
    ]
    common = dict(fake_devices=4, num_processes=2, steps=3, batch=16, ckpt_every=3,
                  report_shards=True, report_export=True, runs=runs)
    outs = _two_processes(lambda i, c: [sys.executable, WORKER, json.dumps(
        {**common, "process_id": i, "coordinator": c})])
    return root, [_result(o[0]) for o in outs]


def test_two_processes_train_evaluate_and_export(two_process_runs):
    root, (main, other) = two_process_runs
    for name, res in zip(("fsdp", "dft", "tokenizer"), main):
        assert res["result"]["step"] == (2 if name == "tokenizer" else 3), name
        assert np.isfinite(res["losses"]).all() and len(res["losses"]) >= 2, name
        # the export (gathered from both processes) holds the final parameters
        assert res["export_digest"] == res["digest"], name
    fsdp, dft, tok = main
    # FSDP over both processes: each device holds 1/8 of every large parameter
    assert all(abs(f - 1 / 8) < 1e-9 for f in fsdp["shards"].values())
    assert all(f < 1 for f in dft["shards"].values())
    # in-training evaluation on the sharded params: FID / IS of samples, reconstructions + grids
    assert [r["step"] for r in fsdp["evals"]] == [0, 3]
    assert np.isfinite(fsdp["evals"][-1]["eval_inception_score"])
    assert [r["step"] for r in tok["evals"]] == [0, 2] and np.isfinite(tok["evals"][-1]["eval_psnr"])
    assert (root / "tok" / "samples" / "recon_0000002.png").exists()
    assert (root / "tok" / "samples" / "preview_0000002.png").exists()
    # metrics come from process 0 only; the other process computed the same digests
    assert [r["digest"] for r in other] == [r["digest"] for r in main]
    assert all("losses" not in r for r in other)
    assert sum(1 for _ in open(root / "fsdp" / "metrics.jsonl")) == len(main[0]["losses"]) + 2


def test_sample_py_on_two_processes_matches_one(two_process_runs, tmp_path):
    root, _ = two_process_runs
    args = ["--gpt", str(root / "fsdp" / "model"), "--tokenizer", str(DEFAULT_TOKENIZER),
            "--num-images", "6", "--batch-size", "8", "--steps", "2", "--seed", "3", "--npz",
            "--no-images", "--no-previews", "--quiet"]
    one = subprocess.run([sys.executable, "sample.py", *args, "--out", str(tmp_path / "one")],
                         cwd=REPO, capture_output=True, text=True, env={**os.environ, **ENV},
                         timeout=600)
    assert one.returncode == 0, one.stderr[-3000:]
    _two_processes(lambda i, c: [sys.executable, "sample.py", *args, "--out", str(tmp_path / "two"),
                                 "--coordinator-address", c, "--num-processes", "2",
                                 "--process-id", str(i), "--cpu-collectives", "gloo"],
                   env={"XLA_FLAGS": "--xla_force_host_platform_device_count=4"})
    a, b = np.load(tmp_path / "one" / "samples.npz"), np.load(tmp_path / "two" / "samples.npz")
    assert a["arr_0"].shape == (6, 32, 32, 3)
    np.testing.assert_array_equal(a["arr_1"], b["arr_1"])
    np.testing.assert_array_equal(a["tokens"], b["tokens"])
    # the same tokens and noise; the decoder ran 8 rows on one device vs one row on each of 8,
    # so float32 rounding may move a pixel across a uint8 step
    diff = np.abs(a["arr_0"].astype(int) - b["arr_0"].astype(int))
    assert diff.max() <= 1 and (diff > 0).mean() < 1e-3, (diff.max(), (diff > 0).mean())


def test_evaluate_on_two_processes(two_process_runs, inception_dir, tmp_path):
    """Each process generates its own shards; process 0 alone computes and writes the metrics."""
    root, _ = two_process_runs
    out = tmp_path / "eval"
    outs = _two_processes(lambda i, c: [
        sys.executable, "-m", "dar_jax.evaluate", "--gpt", str(root / "fsdp" / "model"),
        "--tokenizer", str(DEFAULT_TOKENIZER), "--inception",
        str(inception_dir / "pt_inception_random.pth"), "--num-samples", "4", "--shard-size", "2",
        "--batch-size", "2", "--inception-batch-size", "4", "--steps", "2", "--quiet",
        "--out", str(out), "--coordinator-address", c, "--num-processes", "2",
        "--process-id", str(i), "--cpu-collectives", "gloo"],
        env={"XLA_FLAGS": "--xla_force_host_platform_device_count=2"})
    res = json.loads((out / "results.json").read_text())
    assert res["num_samples"] == 4 and np.isfinite(res["inception_score"])
    assert res["shards"]["generated"] == [0]              # process 0's shard; 1 made the other
    assert sorted(f for f in os.listdir(out / "samples") if f.startswith("shard")) == [
        "shard_00000.npz", "shard_00001.npz"]
    assert "wrote" in outs[0][0] and "wrote" not in outs[1][0]


def test_restore_onto_another_process_count(two_process_runs):
    root, (main, _) = two_process_runs
    fsdp, dft, _ = main
    common = dict(steps=4, batch=16, ckpt_every=4, model=GPT, report_shards=True)
    out = _worker({**common, "fake_devices": 8, "runs": [
        # FSDP over 2 x 4 devices -> FSDP over 1 x 8, then trained on
        {"workdir": str(root / "fsdp"), "mode": "restore", "mesh": {"data": 1, "fsdp": 8}},
        {"workdir": str(root / "fsdp"), "mesh": {"data": 1, "fsdp": 8}},
        # (2, 2, 2) over 2 x 4 devices -> (1, 2, 1) over 2 devices of one process
        {"workdir": str(root / "dft"), "mode": "restore", "devices": 2,
         "mesh": {"data": 1, "fsdp": 2, "tensor": 1}},
        {"workdir": str(root / "dft"), "devices": 2, "mesh": {"data": 1, "fsdp": 2, "tensor": 1}},
    ]})
    restored_fsdp, resumed_fsdp, restored_dft, resumed_dft = out
    assert restored_fsdp == {"step": 3, "digest": fsdp["digest"], "finite": True}
    assert restored_dft == {"step": 3, "digest": dft["digest"], "finite": True}
    for res in (resumed_fsdp, resumed_dft):
        assert res["result"]["start_step"] == 3 and res["result"]["step"] == 4
        assert np.isfinite(res["losses"]).all()
