"""The trainer: sharding layouts, multi-process, kill/resume, SIGTERM, divergence, bad input."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from conftest import REPO, TESTS

WORKER = str(TESTS / "train_worker.py")


def run_worker(spec, env=None, timeout=600, check=True):
    res = subprocess.run([sys.executable, WORKER, json.dumps(spec)], cwd=REPO, capture_output=True,
                         text=True, timeout=timeout, env={**os.environ, **(env or {})})
    if check and res.returncode != 0:
        raise AssertionError(f"worker failed ({res.returncode}):\n{res.stderr[-4000:]}")
    lines = [l for l in res.stdout.splitlines() if l.startswith("RESULT ")]
    return (json.loads(lines[-1][7:]) if lines else None), res


def test_parallel_layouts_match_single_device_and_fsdp_shards(tmp_path):
    layouts = [("single", 1, {"data": 1}), ("dp", 8, {"data": 8}), ("fsdp", 8, {"data": 1, "fsdp": 8}),
               ("tp_dp", 8, {"data": 4, "tensor": 2})]
    runs = [{"workdir": str(tmp_path / n), "devices": d, "mesh": m, "report_shards": n == "fsdp"}
            for n, d, m in layouts]
    # the FSDP checkpoint restored on 1 device and under tensor parallel
    runs += [{"workdir": str(tmp_path / "fsdp"), "mode": "restore", "devices": d, "mesh": m}
             for d, m in [(1, {"data": 1}), (8, {"data": 2, "tensor": 4})]]
    # bad layouts: a mesh that does not divide the devices, a batch not divisible by the data axes
    runs += [{"workdir": str(tmp_path / "bad1"), "mode": "expect_error", "mesh": {"data": 3, "tensor": -1}},
             {"workdir": str(tmp_path / "bad2"), "mode": "expect_error", "mesh": {"data": 8}, "batch": 12}]
    out, _ = run_worker(dict(fake_devices=8, steps=5, batch=16, ckpt_every=5, runs=runs))
    single, dp, fsdp, tp_dp, restored_1, restored_tp, bad_mesh, bad_batch = out
    assert bad_mesh["error"] == "ConfigError" and "does not divide the 8 devices" in bad_mesh["message"]
    assert bad_batch["error"] == "ConfigError" and "global batch 12 is not divisible" in bad_batch["message"]
    for name, res in [("dp", dp), ("fsdp", fsdp), ("tp_dp", tp_dp)]:
        np.testing.assert_allclose(res["losses"], single["losses"], rtol=2e-4, err_msg=name)
    fracs = fsdp["shards"]
    assert fracs and all(abs(f - 1 / 8) < 1e-9 for f in fracs.values()), fracs
    for res in (restored_1, restored_tp):
        assert res["step"] == 5 and res["digest"] == fsdp["digest"]


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_match_one_process(tmp_path):
    single, _ = run_worker({"workdir": str(tmp_path / "one"), "steps": 3, "batch": 8})
    port = _free_port()
    procs = []
    for pid in range(2):
        spec = {"workdir": str(tmp_path / "two"), "steps": 3, "batch": 8, "num_processes": 2,
                "process_id": pid, "coordinator": f"127.0.0.1:{port}"}
        procs.append(subprocess.Popen([sys.executable, WORKER, json.dumps(spec)], cwd=REPO,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    outs = [p.communicate(timeout=600) for p in procs]
    assert all(p.returncode == 0 for p in procs), [o[1][-3000:] for o in outs]
    main = json.loads([l for l in outs[0][0].splitlines() if l.startswith("RESULT ")][-1][7:])
    np.testing.assert_allclose(main["losses"], single["losses"], rtol=2e-4)


def test_kill_after_async_save_then_resume_is_bit_exact(tmp_path):
    spec = dict(steps=12, batch=8, ckpt_every=4, report_shards=True)
    straight, _ = run_worker({**spec, "workdir": str(tmp_path / "straight")})
    killed, res = run_worker({**spec, "workdir": str(tmp_path / "killed")},
                             env={"DAR_DEBUG_KILL_AT_STEP": "9"}, check=False)
    assert res.returncode == -signal.SIGKILL and killed is None
    steps = sorted(int(d) for d in os.listdir(tmp_path / "killed" / "checkpoints") if d.isdigit())
    assert steps and max(steps) <= 8
    resumed, res = run_worker({**spec, "workdir": str(tmp_path / "killed")})
    assert resumed["result"]["start_step"] == max(steps)
    assert resumed["result"]["step"] == 12
    assert resumed["digest"] == straight["digest"]


def test_sigterm_saves_and_exits_cleanly(tmp_path):
    spec = {"workdir": str(tmp_path / "w"), "steps": 100000, "batch": 8, "ckpt_every": 100000}
    proc = subprocess.Popen([sys.executable, WORKER, json.dumps(spec)], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    metrics = tmp_path / "w" / "metrics.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and not (metrics.exists() and len(metrics.read_text().splitlines()) >= 3):
        time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    result = json.loads([l for l in out.splitlines() if l.startswith("RESULT ")][-1][7:])["result"]
    assert result["stopped"] is True
    steps = [int(d) for d in os.listdir(tmp_path / "w" / "checkpoints") if d.isdigit()]
    assert steps == [result["step"]]


def test_non_finite_loss_stops_naming_the_step(tmp_path):
    out, res = run_worker({"workdir": str(tmp_path / "nan"), "steps": 30, "batch": 8, "ckpt_every": 2,
                           "lr": 1e6}, check=False)
    assert res.returncode != 0
    assert "non-finite loss" in res.stderr and "at step" in res.stderr
    import re
    bad_step = int(re.search(r"at step (\d+)", res.stderr).group(1))
    steps = sorted(int(d) for d in os.listdir(tmp_path / "nan" / "checkpoints") if d.isdigit())
    assert all(s < bad_step for s in steps)


def test_corrupt_latest_checkpoint_falls_back_to_previous(tmp_path):
    work = tmp_path / "w"
    run_worker({"workdir": str(work), "steps": 4, "batch": 8, "ckpt_every": 2})
    latest = work / "checkpoints" / "4" / "state"
    for root, _, files in os.walk(latest):
        for f in files:
            if f not in ("_CHECKPOINT_METADATA",):
                with open(os.path.join(root, f), "wb") as fh:
                    fh.write(b"garbage")
    out, res = run_worker({"workdir": str(work), "steps": 6, "batch": 8, "ckpt_every": 2})
    assert "checkpoint step 4" in res.stderr and "trying the previous one" in res.stderr
    assert out["result"]["start_step"] == 2 and out["result"]["step"] == 6


def test_run_config_errors_name_the_problem(tmp_path):
    from dar_jax.config import ConfigError, load_config
    with pytest.raises(ConfigError, match="unknown config key 'optim.lrr'"):
        load_config(str(REPO / "configs" / "ar_gpt_b.py"), ["optim.lrr=3"])
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(str(tmp_path / "nope.py"))
    cfg = load_config(str(REPO / "configs" / "ar_gpt_l.py"), ["--config.optim.lr=2e-4", "train.steps=7"])
    assert cfg.optim.lr == 2e-4 and cfg.train.steps == 7 and cfg.model.size == "GPT-L"


def test_train_cli_reports_bad_input_in_one_line(tmp_path):
    cmd = [sys.executable, "train.py", "--config", "configs/ar_gpt_b.py", "--workdir", str(tmp_path / "w")]
    res = subprocess.run(cmd + ["--config.optim.lrr=1"], cwd=REPO, capture_output=True, text=True)
    assert res.returncode == 2 and "unknown config key 'optim.lrr'" in res.stderr
    assert "Traceback" not in res.stderr
    res = subprocess.run(cmd + ["--config.tokenizer.checkpoint=", "--config.data.kind=folder",
                                f"--config.data.data_dir={tmp_path / 'missing'}"],
                         cwd=REPO, capture_output=True, text=True)
    assert res.returncode == 2 and "missing" in res.stderr and "Traceback" not in res.stderr


def test_tiny_ar_config_learns_on_synthetic_shapes(tmp_path, model_dirs, inception_dir):
    """configs/tiny_ar.py through the real input pipeline, tokenized on the fly, with the cheap
    in-training FID / IS (fixture Inception weights) at the last step."""
    _, tokenizer_dir = model_dirs
    out, _ = run_worker({"task": "tiny_ar", "workdir": str(tmp_path / "w"), "steps": 60, "batch": 16,
                         "overrides": [f"tokenizer.checkpoint={tokenizer_dir}", "train.eval_every_steps=60",
                                       f"eval.inception={inception_dir / 'pt_inception_random.pth'}",
                                       "eval.fid_num_samples=4", "eval.batch_size=4"]})
    losses = out["losses"]
    assert len(losses) == 60
    assert np.mean(losses[-5:]) < np.mean(losses[:5]) - 0.5, losses
    rows = [json.loads(l) for l in (tmp_path / "w" / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in rows if "eval_inception_score" in r]
    assert [r["step"] for r in evals] == [0, 60]
    assert np.isfinite(evals[-1]["eval_inception_score"])
