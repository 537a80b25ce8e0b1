"""dar_jax.aot: TPU topologies, reading compiled programs, and (with libtpu, the tpu extra) the
real TPU compiler on the tiny programs for a v5e-8 slice."""
from __future__ import annotations

import importlib.util
import json

import numpy as np
import pytest

from conftest import REPO
from dar_jax import aot, hardware

HAVE_LIBTPU = importlib.util.find_spec("libtpu") is not None
needs_libtpu = pytest.mark.skipif(not HAVE_LIBTPU, reason="libtpu is not installed (the tpu "
                                  "extra: pip install -e '.[tpu]'); the TPU compiler comes with it")
REPORT_KEYS = {"topology", "num_chips", "program", "global_batch", "per_chip_batch",
               "hbm_per_chip_gib", "hbm_capacity_gib", "fits", "xla_flops_per_chip",
               "model_flops_per_chip", "remat_overhead", "attention_kernels",
               "attention_sites_on_xla", "hbm_bytes_per_step", "collectives", "est_step_s",
               "est_mfu"}


def test_topology_names():
    t = hardware.parse_topology("v5p-32")   # v5p counts cores: 16 chips
    assert (t.num_chips, t.jax_name, t.name) == (16, "v5p:2x2x4", "v5p-32")
    assert hardware.parse_topology("v5e-256").jax_name == "v5e:16x16"
    assert hardware.parse_topology("v5e-8").jax_name == "v5e:2x4"
    assert hardware.parse_topology("v4-8").jax_name == "v4:2x2x1"
    assert hardware.parse_topology("v5p-128").jax_name == "v5p:4x4x4"
    assert hardware.parse_topology("v6e:4x4").num_chips == 16
    for bad, match in [("v9-8", "unknown TPU generation"), ("v5p-3", "count cores"),
                       ("v5e-12", "power of two"), ("gpu", "unknown topology")]:
        with pytest.raises(hardware.TopologyError, match=match):
            hardware.parse_topology(bad)


HLO = """
ENTRY %main {
  %p0 = f32[80,1280]{1,0} parameter(0), metadata={op_name="jit(step)/x"}
  %all-gather-start.1 = (f32[80,1280]{1,0}, f32[1280,1280]{1,0}) all-gather-start(f32[80,1280]{1,0} %p0), replica_groups=[1,16]<=[16], dimensions={0}
  %all-gather-done.1 = f32[1280,1280]{1,0} all-gather-done(%all-gather-start.1)
  %reduce-scatter.2 = f32[80,1280]{1,0} reduce-scatter(f32[1280,1280]{1,0} %x), replica_groups={{0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15}}, dimensions={0}
  %all-reduce.3 = f32[] all-reduce(f32[] %l), replica_groups=[1,16]<=[16], to_apply=%add
  %pad.7 = bf16[4,128,64]{2,1,0} pad(%q, %z), metadata={op_name="jit(step)/attention[gpt.causal]/shard_map/pad"}
  %constant.9 = s32[4]{0} constant({0,0,0,0}), metadata={op_name="jit(step)/attention[encoder.prefix_causal]/x"}
  %splash_mha_fwd_residuals.2 = (f32[4,128,64]{2,1,0}) custom-call(%constant.9, %pad.7), custom_call_target="tpu_custom_call", backend_config={}
  %fusion.4 = f32[8]{0} fusion(%a), kind=kLoop, metadata={op_name="jit(step)/attention[decoder.cross]/dot_general"}
  %copy.5 = bf16[4,128,2,64]{3,1,2,0} copy(%q2), metadata={op_name="jit(step)/while/body/attention[decoder.self]/shard_map/mul"}
  %bitcast.6 = bf16[4,2,128,64]{3,2,1,0} bitcast(%copy.5)
  %copy-done.8 = s8[1,2,2]{2,1,0} copy-done(%copy-start.8)
  %splash_mha_fwd_no_residuals.3 = (f32[4,128,64]{2,1,0}) custom-call(%copy-done.8, %bitcast.6), custom_call_target="tpu_custom_call", backend_config={}
}
"""


def test_collective_bytes_and_attention_sites_from_hlo():
    coll = aot.collective_bytes(HLO, 16)
    mb = 1280 * 1280 * 4
    assert coll["all-gather"] == pytest.approx(mb * 15 / 16)       # async pair counted once
    assert coll["reduce-scatter"] == pytest.approx(80 * 1280 * 4 * 15)
    assert coll["all-reduce"] == pytest.approx(2 * 4 * 15 / 16)
    sites = aot.attention_kernels(HLO)
    # the kernel's site comes from its nearest scoped (non-constant) operands, looking back
    # through bitcasts and copies; a site without one is on XLA
    assert sites == {"gpt.causal": "splash_mha_fwd_residuals", "encoder.prefix_causal": "xla",
                     "decoder.cross": "xla", "decoder.self": "splash_mha_fwd_no_residuals"}
    msg = "the total memory required for HLO temporaries (785.88G) exceeds available HBM (95.74G)."
    assert aot._gib_from(aot._HBM_AVAILABLE, msg) == pytest.approx(95.74)
    assert aot._gib_from(aot._HBM_REQUIRED, msg) == pytest.approx(785.88)


def test_fsdp_train_programs_on_tpu_are_compiled_without_windowed_einsum():
    """A TPU program sharded without a tensor axis turns off XLA's collective-matmul rewrite of
    the FSDP matmuls (partial products over slices of the contracting dimension, each added into
    the whole output in HBM); other targets keep the compiler's defaults."""
    import jax
    from jax.sharding import Mesh
    from dar_jax.parallel.target import Target
    devs = np.array(jax.devices()[:1] * 4).reshape(1, 2, 2)
    fsdp = Mesh(devs.reshape(1, 4, 1), ("data", "fsdp", "tensor"))
    tp = Mesh(devs.reshape(1, 2, 2), ("data", "fsdp", "tensor"))
    off = {"xla_tpu_enable_windowed_einsum_for_all_gather": False,
           "xla_tpu_enable_windowed_einsum_for_reduce_scatter": False}
    assert Target("tpu", fsdp).compiler_options() == off
    assert Target("tpu", tp).compiler_options() == {}      # tensor parallel: XLA decides
    assert Target("tpu").compiler_options() == {} and Target("gpu", fsdp).compiler_options() == {}
    assert Target("cpu", fsdp).compiler_options() == {}
    loop = ("  %while.3 = (bf16[2]) while(%t), condition=%wide.windowed_dot_general_cond_ag.1, "
            "body=%wide.windowed_dot_general_body_ag.1.sunk\n")
    assert aot.windowed_einsum_loops(HLO) == 0 and aot.windowed_einsum_loops(loop * 3) == 3


def test_cli_errors_name_the_fix(monkeypatch, capsys):
    assert aot.main(["--topology", "v9-8", "--config", "configs/tiny_ar.py"]) == 2
    assert "unknown TPU generation" in capsys.readouterr().err
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "libtpu" else
                        importlib.machinery.PathFinder.find_spec(name))
    assert aot.main(["--topology", "v5e-8", "--config", "configs/tiny_ar.py"]) == 2
    assert "pip install -e '.[tpu]'" in capsys.readouterr().err


# ------------------------------------------------------------------ the real TPU compiler
def _compile(tmp_path, name, *args):
    out = tmp_path / f"{name}.json"
    assert aot.main([*args, "--topology", "v5e-8", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert REPORT_KEYS <= set(report), REPORT_KEYS - set(report)
    assert report["topology"] == "v5e-8" and report["num_chips"] == 8
    assert report["hbm_capacity_source"] == "compiler" and 15 < report["hbm_capacity_gib"] < 16.5
    assert report["fits"] is True and 0 < report["hbm_per_chip_gib"] < report["hbm_capacity_gib"]
    assert report["attention_sites_on_xla"] == 0, report["attention_kernels"]
    assert report["xla_flops_per_chip"] > 0 and report["est_step_s"] > 0
    return report


@needs_libtpu
def test_tiny_ar_train_step_for_v5e_8(tmp_path):
    r = _compile(tmp_path, "ar", "--config", str(REPO / "configs" / "tiny_ar.py"),
                 "--tokenizer-config", str(REPO / "configs" / "tiny_tokenizer.py"),
                 "--config.model.remat=full")
    assert set(r["attention_kernels"]) == {"gpt.causal", "encoder.prefix_causal"}
    assert all("splash" in k for k in r["attention_kernels"].values())
    assert r["global_batch"] == 32 and r["per_chip_batch"] == 4
    assert r["collectives"]["all-reduce"] > 0          # data parallel: gradients all-reduced
    assert r["remat_overhead"] > 1.0                   # full remat recomputes the forward pass


@needs_libtpu
def test_tiny_tokenizer_train_step_for_v5e_8(tmp_path):
    # one block of each kind keeps every attention site (the TPU compiler takes ~20 s a block here)
    r = _compile(tmp_path, "tok", "--config", str(REPO / "configs" / "tiny_tokenizer.py"),
                 "--config.mesh.data=1", "--config.mesh.fsdp=-1", "--config.model.num_encoder_layers=1",
                 "--config.model.num_decoder_layers=1", "--config.model.diff_decoder.depth=1")
    assert r["command"].endswith("--config.model.diff_decoder.depth=1 --topology v5e-8 --json "
                                 + str(tmp_path / "tok.json"))
    assert set(r["attention_kernels"]) == {"encoder.prefix_causal", "decoder_layers.causal",
                                           "decoder.self", "decoder.cross"}
    assert r["collectives"]["all-gather"] > 0 and r["collective_ratio"] > 0   # FSDP
    assert r["compiler_options"]["xla_tpu_enable_windowed_einsum_for_all_gather"] is False
    assert r["windowed_einsum_loops"] == 0 and len(r["hbm_top"]) == 5


@needs_libtpu
def test_sampling_pipeline_for_v5e_8(tmp_path):
    r = _compile(tmp_path, "sample", "--program", "sample", "--gpt-config",
                 str(REPO / "configs" / "tiny_ar.py"), "--tokenizer-config",
                 str(REPO / "configs" / "tiny_tokenizer.py"), "--batch", "16")
    assert r["attention_kernels"]["gpt.decode"] == "dar_decode_tpu"
    assert {"decoder_layers.causal", "decoder.self", "decoder.cross"} <= set(r["attention_kernels"])
    assert r["est_images_per_s"] > 0
