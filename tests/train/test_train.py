"""The trainer: sharding layouts, multi-process, kill/resume, SIGTERM, divergence, bad input."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys

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
    """kill -9 after step 10 (checkpoint 8 saved asynchronously, rows up to step 9 logged): the
    resumed run replays steps 9-12 bit for bit and metrics.jsonl keeps one row per step."""
    spec = dict(steps=12, batch=8, ckpt_every=4, report_shards=True)
    straight, _ = run_worker({**spec, "workdir": str(tmp_path / "straight")})
    killed, res = run_worker({**spec, "workdir": str(tmp_path / "killed"), "kill_at": 10}, check=False)
    assert res.returncode == -signal.SIGKILL and killed is None
    steps = sorted(int(d) for d in os.listdir(tmp_path / "killed" / "checkpoints") if d.isdigit())
    assert steps and max(steps) <= 8
    resumed, res = run_worker({**spec, "workdir": str(tmp_path / "killed")})
    assert resumed["result"]["start_step"] == max(steps)
    assert resumed["result"]["step"] == 12
    assert resumed["digest"] == straight["digest"]
    assert resumed["loss_steps"] == list(range(1, 13))
    assert resumed["losses"] == straight["losses"]


def test_sigterm_at_every_moment_exits_cleanly_and_resumes_bit_exact(tmp_path):
    """SIGTERM mid-run, right after a periodic save and while a resumed run compiles: each run
    stops cleanly (no duplicate save), and the resumed runs match an uninterrupted one bit for bit
    (losses of every step, final parameters)."""
    common = dict(steps=8, batch=8, ckpt_every=4)
    a, b, c = (str(tmp_path / n) for n in "abc")
    runs = [{"workdir": a, "report_shards": True},
            {"workdir": b, "signals": [["step", 5, "SIGTERM"]]},         # mid-run, between checkpoints
            {"workdir": b, "report_shards": True},
            {"workdir": c, "signals": [["checkpoint", 4, "SIGTERM"]]},   # right after a periodic save
            {"workdir": c, "signals": [["compile", 4, "SIGTERM"]]},      # while the resumed run compiles
            {"workdir": c, "report_shards": True}]
    out, res = run_worker(dict(common, runs=runs))
    straight, b_stop, b_done, c_stop, c_stop2, c_done = out
    assert (b_stop["result"]["stopped"], b_stop["result"]["step"]) == (True, 5)
    assert (c_stop["result"]["stopped"], c_stop["result"]["step"]) == (True, 4)
    assert (c_stop2["result"]["stopped"], c_stop2["result"]["step"], c_stop2["result"]["start_step"]) == (True, 4, 4)
    assert "already saved step 4" in res.stderr
    for done in (b_done, c_done):
        assert done["result"]["stopped"] is False and done["result"]["step"] == 8
        assert done["loss_steps"] == list(range(1, 9))
        assert done["losses"] == straight["losses"]
        assert done["digest"] == straight["digest"]
    data = json.loads((tmp_path / "b" / "checkpoints" / "5" / "data" / "metadata").read_text())
    assert data["step"] == 5


def test_divergence_is_never_checkpointed_and_a_sane_rerun_finishes(tmp_path):
    """lr 1e30: step 2 has a finite loss but a NaN grad norm and NaN parameters. It is not
    checkpointed; the stop names the step (exit 2). Step 1 is finite but poisoned (its own
    gradient is NaN, whatever the learning rate): a rerun with a sane lr finds that at its first
    step, moves step 1 aside to 1.diverged and finishes from the previous state."""
    w = str(tmp_path / "w")
    runs = [{"workdir": w, "mode": "cli", "lr": 1e30, "ckpt_every": 1},
            {"workdir": w, "mode": "restore"},
            {"workdir": w, "lr": 3e-3, "ckpt_every": 1}]
    out, res = run_worker(dict(steps=6, batch=8, runs=runs))
    diverged, latest, rerun = out
    assert diverged["rc"] == 2
    err = [l for l in res.stderr.splitlines() if l.startswith("error: ")]
    assert len(err) == 1 and "non-finite grad norm" in err[0] and "at step 2" in err[0], res.stderr[-2000:]
    assert latest["step"] == 1 and latest["finite"] is True
    assert "moving checkpoint step 1 aside" in res.stderr
    assert rerun["result"]["start_step"] == 0 and rerun["result"]["step"] == 6
    assert rerun["loss_steps"] == list(range(1, 7)) and all(np.isfinite(rerun["losses"]))
    assert "1.diverged" in os.listdir(tmp_path / "w" / "checkpoints")


def test_corrupt_checkpoints_fall_back_and_are_moved_aside(tmp_path):
    """A data iterator state at the wrong step and garbage state files both count as corruption:
    the run falls back to the previous checkpoint with a warning, moves the bad one to
    <step>.corrupt (it takes no keep slot) and replays the steps exactly. Another model shape
    is not corruption: one line naming the first differing key with both shapes."""
    w = tmp_path / "w"
    ck = w / "checkpoints"
    runs = [{"workdir": str(w), "steps": 4},
            {"mode": "set_json", "path": str(ck / "4" / "data" / "metadata"), "set": {"step": 3}},
            {"workdir": str(w), "steps": 6},
            {"mode": "garble", "path": str(ck / "6" / "state")},
            {"workdir": str(w), "steps": 8},
            {"workdir": str(w), "steps": 8, "mode": "expect_error", "model": {"dim": 32, "n_head": 2}}]
    out, res = run_worker(dict(batch=8, ckpt_every=2, runs=runs))
    first, _, fell_back, _, fell_back2, wrong_shape = out
    assert "checkpoint step 4" in res.stderr and "data iterator state is at step 3" in res.stderr
    assert "trying the previous one" in res.stderr and "checkpoint step 6" in res.stderr
    assert fell_back["result"]["start_step"] == 2 and fell_back["result"]["step"] == 6
    assert fell_back["losses"][:4] == first["losses"] and fell_back["loss_steps"] == list(range(1, 7))
    assert fell_back2["result"]["start_step"] == 4 and fell_back2["result"]["step"] == 8
    assert fell_back2["losses"][:6] == fell_back["losses"]
    assert sorted(os.listdir(ck)) == ["4", "4.corrupt", "6", "6.corrupt", "8"]
    msg = wrong_shape["message"]
    assert wrong_shape["error"] == "CheckpointError" and "\n" not in msg and len(msg) < 400, msg
    assert "params." in msg and "64) in the checkpoint" in msg and "32) in this run" in msg, msg


def test_run_config_errors_name_the_problem(tmp_path):
    from dar_jax.config import ConfigError, load_config
    with pytest.raises(ConfigError, match="unknown config key 'optim.lrr'"):
        load_config(str(REPO / "configs" / "ar_gpt_b.py"), ["optim.lrr=3"])
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(str(tmp_path / "nope.py"))
    cfg = load_config(str(REPO / "configs" / "ar_gpt_l.py"), ["--config.optim.lr=2e-4", "train.steps=7"])
    assert cfg.optim.lr == 2e-4 and cfg.train.steps == 7 and cfg.model.size == "GPT-L"
    with pytest.raises(ConfigError, match="optim.lr=abc.*float"):
        load_config(str(REPO / "configs" / "ar_gpt_b.py"), ["optim.lr=abc"])
    with pytest.raises(ConfigError, match="unknown variant 'huge'"):
        load_config(str(REPO / "configs" / "shapes_ar.py:huge"))
    bad = tmp_path / "broken.py"
    bad.write_text("def get_config():\n    return undefined_name\n")
    with pytest.raises(ConfigError, match="broken.py failed to load: NameError"):
        load_config(str(bad))


def test_config_variants_placeholders_and_typed_sections():
    """tiny/default are variants of one file (the old paths name the same configs); keys that
    default to None are typed placeholders, overridable from the command line; the trainer's
    sections are typed dataclasses whose defaults are the config's."""
    import dataclasses
    from dar_jax.config import ConfigError, as_plain, load_config
    from dar_jax.train.optim import OptimConfig
    from dar_jax.train.run_config import base_config
    from dar_jax.train.sections import run_sections
    for kind in ("ar", "tokenizer"):
        for variant in ("tiny", "default"):
            assert (as_plain(load_config(str(REPO / "configs" / f"{variant}_{kind}.py")))
                    == as_plain(load_config(str(REPO / "configs" / f"shapes_{kind}.py:{variant}"))))
    assert as_plain(load_config(str(REPO / "configs" / "shapes_ar.py"))) == as_plain(
        load_config(str(REPO / "configs" / "default_ar.py")))
    cfg = load_config(str(REPO / "configs" / "ar_gpt_b.py"))
    assert cfg.model.dim is None and cfg.model.ffn_dim_multiplier is None
    cfg = load_config(str(REPO / "configs" / "ar_gpt_b.py"),
                      ["model.dim=512", "model.n_layer=3", "model.ffn_dim_multiplier=1.5"])
    assert (cfg.model.dim, cfg.model.n_layer, cfg.model.ffn_dim_multiplier) == (512, 3, 1.5)
    with pytest.raises(ConfigError, match="model.dim=wide"):
        load_config(str(REPO / "configs" / "ar_gpt_b.py"), ["model.dim=wide"])
    sections = run_sections(base_config("ar"))
    assert sections.optim == OptimConfig() and OptimConfig().b2 == 0.95
    assert dataclasses.asdict(sections.train) == dict(base_config("ar").train)
    with pytest.raises(ConfigError, match="checkpoint.keep must be >= 1.*export_dtype"):
        run_sections(load_config(str(REPO / "configs" / "tiny_ar.py"),
                                 ["checkpoint.keep=0", "checkpoint.export_dtype=int8"]))


def test_train_cli_reports_bad_input_in_one_line(tmp_path):
    cmd = [sys.executable, "train.py", "--config", "configs/ar_gpt_b.py", "--workdir", str(tmp_path / "w")]
    res = subprocess.run(cmd + ["--config.optim.lrr=1"], cwd=REPO, capture_output=True, text=True)
    assert res.returncode == 2 and "unknown config key 'optim.lrr'" in res.stderr
    assert "Traceback" not in res.stderr
    res = subprocess.run(cmd + ["--config.tokenizer.checkpoint=", "--config.data.kind=folder",
                                f"--config.data.data_dir={tmp_path / 'missing'}"],
                         cwd=REPO, capture_output=True, text=True)
    assert res.returncode == 2 and "missing" in res.stderr and "Traceback" not in res.stderr


def _train_main():
    import importlib.util
    spec = importlib.util.spec_from_file_location("dar_train_script", REPO / "train.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


def test_train_cli_refuses_bad_workdirs_and_optimizer_values_before_anything(tmp_path, capsys):
    main = _train_main()
    a_file = tmp_path / "a_file"
    a_file.write_text("mine")
    foreign = tmp_path / "run"
    (foreign / "model").mkdir(parents=True)
    (foreign / "model" / "thesis.txt").write_text("mine")
    ok = tmp_path / "w"
    cases = [(a_file, [], "is a file"), (a_file / "sub", [], "is a file"),
             (foreign, [], "not a dar-jax model"),
             (ok, ["--config.optim.lr=-1"], "optim.lr=-1.0 must be a finite number > 0"),
             (ok, ["--config.optim.lr=nan"], "optim.lr"),
             (ok, ["--config.optim.b2=1.5"], "optim.b2=1.5"),
             (ok, ["--config.train.steps=0"], "train.steps must be positive"),
             (ok, ["--config.checkpoint.every_steps=0"], "checkpoint.every_steps must be >= 1")]
    before = sorted(str(p) for p in tmp_path.rglob("*"))
    for workdir, extra, message in cases:
        rc = main(["--config", str(REPO / "configs" / "ar_gpt_b.py"), "--workdir", str(workdir), *extra])
        err = capsys.readouterr().err
        assert rc == 2 and message in err and "Traceback" not in err, (workdir, extra, err)
        assert sorted(str(p) for p in tmp_path.rglob("*")) == before
    assert a_file.read_text() == "mine" and (foreign / "model" / "thesis.txt").read_text() == "mine"


def test_tiny_ar_config_learns_on_synthetic_shapes(tmp_path, model_dirs, ref_tokenizer, inception_dir):
    """configs/tiny_ar.py through the real input pipeline, tokenized on the fly, with the cheap
    in-training FID / IS (fixture Inception weights) at the last step. The GPT's vocabulary and
    length and the images' size follow the fixture's tokenizer."""
    from dar_jax import tokenizer as tok
    _, tokenizer_dir = model_dirs
    tok_cfg = ref_tokenizer[0]
    sizes = [f"model.vocab_size={tok_cfg.vq_codebook_size}", f"model.block_size={tok_cfg.num_all_queries}",
             f"data.image_size={tok.resolution(tok_cfg)[0]}"]
    out, _ = run_worker({"task": "tiny_ar", "workdir": str(tmp_path / "w"), "steps": 60, "batch": 16,
                         "overrides": sizes + [f"tokenizer.checkpoint={tokenizer_dir}", "train.eval_every_steps=60",
                                       f"eval.inception={inception_dir / 'pt_inception_random.pth'}",
                                       "eval.fid_num_samples=4", "eval.batch_size=4"]})
    losses = out["losses"]
    assert len(losses) == 60
    assert np.mean(losses[-5:]) < np.mean(losses[:5]) - 0.5, losses
    rows = [json.loads(l) for l in (tmp_path / "w" / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in rows if "eval_inception_score" in r]
    assert [r["step"] for r in evals] == [0, 60]
    assert np.isfinite(evals[-1]["eval_inception_score"])
