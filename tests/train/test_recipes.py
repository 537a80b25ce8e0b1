"""Pod-scale recipes: remat policies, the paper's learning-rate schedule, the shipped configs."""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import REPO
from dar_jax import ar
from dar_jax.config import ConfigError, load_config
from dar_jax.nn import remat as R
from dar_jax.train.optim import lr_schedule
from dar_jax.train.run_config import IMAGENET_TRAIN, epochs_to_steps


def test_remat_policy_names():
    assert R.canonical(True) == "full" and R.canonical(False) == "none" and R.canonical("") == "none"
    assert R.canonical("qkv, mlp_hidden,qkv") == "mlp_hidden,qkv"
    with pytest.raises(ValueError, match="unknown remat policy 'qkvv'"):
        R.canonical("qkvv")
    with pytest.raises(ConfigError, match="GPT unknown remat policy"):
        ar.gpt_config("GPT-B", remat="every")
    # configs written before policies (remat: true/false) still load
    assert ar.GPTConfig(remat=True).remat == "full" and ar.GPTConfig(remat=False).remat == "none"


@pytest.mark.parametrize("policy", ["full", "dots", "attn_out,context,mlp_hidden,qkv"])
def test_gpt_remat_policies_keep_the_gradients(policy):
    cfg = ar.gpt_config(dim=64, n_layer=2, n_head=4, vocab_size=64, block_size=16, num_classes=5)
    params = ar.init_params(cfg, jax.random.key(0))
    params = jax.tree.map(lambda p: p + 0.02 * jax.random.normal(jax.random.key(1), p.shape), params)
    tokens = jax.random.randint(jax.random.key(2), (3, 16), 0, 64)
    labels = jnp.array([0, 3, 4])

    def loss(p, c):
        logits = ar.forward(c, p, tokens[:, :-1], labels, dropout_key=jax.random.key(5))
        return jnp.mean(jax.nn.logsumexp(logits, -1))

    ref = jax.jit(jax.grad(lambda p: loss(p, cfg)))(params)
    rc = dataclasses.replace(cfg, remat=policy)
    got = jax.jit(jax.grad(lambda p: loss(p, rc)))(params)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(ref)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-7)


def test_linear_tail_schedule():
    s = lr_schedule({"lr": 4e-4, "schedule": "linear_tail", "min_lr_ratio": 1e-5 / 4e-4,
                     "decay_steps": 50}, 300)
    assert float(s(0)) == pytest.approx(4e-4) and float(s(249)) == pytest.approx(4e-4)
    assert float(s(275)) == pytest.approx((4e-4 + 1e-5) / 2, rel=1e-6)
    assert float(s(300)) == pytest.approx(1e-5) and float(s(299)) > 1e-5
    warm = lr_schedule({"lr": 1.0, "schedule": "linear_tail", "decay_steps": 10,
                        "warmup_steps": 5}, 30)
    assert float(warm(0)) == pytest.approx(0.2) and float(warm(10)) == 1.0
    assert float(warm(25)) == pytest.approx(0.5)
    with pytest.raises(ConfigError, match="decay_steps"):
        lr_schedule({"lr": 1.0, "schedule": "linear_tail", "decay_steps": 0}, 30)


@pytest.mark.parametrize("name,size,fsdp", [("ar_gpt_b", "GPT-B", False), ("ar_gpt_l", "GPT-L", True),
                                            ("ar_gpt_xl", "GPT-XL", True),
                                            ("ar_gpt_xxl", "GPT-XXL", True)])
def test_ar_configs_at_the_paper_recipe(name, size, fsdp):
    c = load_config(str(REPO / "configs" / f"{name}.py"))
    assert c.model.size == size and c.train.global_batch_size == 1024
    assert c.optim.lr == 4e-4 and c.optim.schedule == "linear_tail"
    assert c.optim.lr * c.optim.min_lr_ratio == pytest.approx(1e-5)
    assert c.train.steps == epochs_to_steps(300, IMAGENET_TRAIN, 1024)
    assert c.optim.decay_steps == epochs_to_steps(50, IMAGENET_TRAIN, 1024)
    assert (dict(c.mesh) == {"data": 1, "fsdp": -1, "tensor": 1}) == fsdp
    R.canonical(c.model.remat)   # a valid policy
    s = lr_schedule(dict(c.optim), c.train.steps)
    assert float(s(c.train.steps - c.optim.decay_steps - 1)) == pytest.approx(4e-4)


def test_gpt_xxl_is_d_ar_xxl():
    cfg = ar.gpt_config("GPT-XXL", vocab_size=16384, block_size=256, num_classes=1000)
    n = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(ar.abstract_params(cfg)))
    assert 1.3e9 < n < 1.5e9 and cfg.head_dim == 64


def test_tokenizer_v1_config_at_the_paper_recipe():
    c = load_config(str(REPO / "configs" / "tokenizer_v1.py"))
    assert c.train.global_batch_size == 1024 and c.optim.lr == 2e-4 and c.train.steps == 210_000
    assert c.train.ema_decay == 0.999 and not c.gan.enabled
    assert c.loss.perceptual_weight == 0.5 and c.loss.repa_weight == 0.5
    assert dict(c.mesh) == {"data": 1, "fsdp": -1, "tensor": 1}
    R.canonical(c.model.remat)


def test_remat_lowers_the_compiled_train_steps_memory_on_cpu():
    """XLA's default CPU scheduler runs every block's recomputation at the start of the backward
    pass, which keeps as much as no remat; the trainer compiles remat programs with the
    memory-optimized scheduler (nn.remat.compiler_options), so remat saves memory on CPU too."""
    from dar_jax.aot import train_program
    assert R.compiler_options("none", "cpu") is None and R.compiler_options("full", "tpu") is None
    assert R.compiler_options("qkv", "cpu") == R.compiler_options("full", "cpu") is not None
    temp = {}
    for policy in ("none", "full"):
        cfg = load_config(str(REPO / "configs" / "tiny_tokenizer.py"),
                          [f"model.remat={policy}", "mesh.data=1", "mesh.fsdp=1",
                           "model.num_encoder_layers=1", "model.num_decoder_layers=1"])
        program = train_program(cfg, jax.devices()[:1])
        temp[policy] = program.lowered.compile().memory_analysis().temp_size_in_bytes
    assert temp["full"] < 0.6 * temp["none"], temp
