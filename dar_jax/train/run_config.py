"""The shape of a run config (every section and key a run may set), shared by ``configs/*.py``.

Config files start from :func:`base_config` and change values; because the returned ConfigDict
is locked by the loader, a key outside this shape is an error naming it.
"""
from __future__ import annotations

import dataclasses

import ml_collections

from dar_jax.data import DataConfig

from dar_jax.parallel.sharding import DEFAULT_RULES


def base_config(task: str = "ar") -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.task = task                       # "ar" | "tokenizer"
    c.model = ml_collections.ConfigDict(model_defaults(task))  # every field of the model config
    c.data = ml_collections.ConfigDict(dataclasses.asdict(DataConfig()))  # keys: dar_jax.data.DataConfig
    c.tokenizer = ml_collections.ConfigDict(dict(checkpoint=""))  # AR: tokenize images on the fly
    c.optim = ml_collections.ConfigDict(dict(
        name="adamw", lr=1e-4, weight_decay=0.05, b1=0.9, b2=0.95, eps=1e-8, grad_clip=1.0,
        warmup_steps=0, schedule="constant", min_lr_ratio=0.0, decay_steps=0))
    c.train = ml_collections.ConfigDict(dict(
        global_batch_size=256, steps=1000, seed=0, ema_decay=0.0, eval_every_steps=0))
    c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1))
    c.sharding_rules = [list(r) for r in DEFAULT_RULES]
    # export_dtype: storage of the exported <workdir>/model ("bfloat16" halves it; loads as float32)
    c.checkpoint = ml_collections.ConfigDict(dict(every_steps=1000, keep=3, keep_period=0, async_save=True,
                                                  export_dtype="float32"))
    c.logging = ml_collections.ConfigDict(dict(every_steps=50, tensorboard=True, progress=True,
                                               peak_tflops_per_device=0.0))
    c.distributed = ml_collections.ConfigDict(dict(coordinator_address="", num_processes=0,
                                                   process_id=-1, cpu_collectives=""))
    # optional cheap FID / IS every train.eval_every_steps (inception: pytorch-fid weights)
    c.eval = ml_collections.ConfigDict(dict(
        inception="", reference="", protocol="adm", fid_num_samples=0, cfg_scale="4.0",
        solver="adams2", steps=0, batch_size=16))
    if task == "tokenizer":
        from dar_jax.train.tokenizer_task import GanConfig, LossConfig
        c.loss = ml_collections.ConfigDict(dataclasses.asdict(LossConfig()))
        c.gan = ml_collections.ConfigDict(dataclasses.asdict(GanConfig()))
        # weight files users already have; empty = that loss is off (logged once)
        c.perceptual = ml_collections.ConfigDict(dict(lpips_vgg="", lpips_heads="", dinov2=""))
        c.eval.update(dict(num_images=8))   # held-out images for PSNR / SSIM / rFID / grids
        del c["tokenizer"]
    return c


def model_defaults(task: str) -> dict:
    """All fields of the task's model config with their defaults (so each can be overridden)."""
    from dar_jax.config import to_dict
    if task == "ar":
        from dar_jax.ar import GPTConfig
        # dim / n_layer / n_head come from ``size`` unless set (None = take the size's)
        return {**to_dict(GPTConfig()), "size": "", "dim": None, "n_layer": None, "n_head": None}
    if task == "tokenizer":
        from dar_jax.tokenizer import TokenizerConfig
        return to_dict(TokenizerConfig())
    from dar_jax.config import ConfigError
    raise ConfigError(f"unknown task {task!r}; expected 'ar' or 'tokenizer'")


def epochs_to_steps(epochs: float, num_examples: int, global_batch: int) -> int:
    return max(1, int(round(epochs * num_examples / global_batch)))


IMAGENET_TRAIN = 1_281_167
PAPER_BATCH = 1024   # D-AR (arXiv 2505.23660): AR and tokenizer global batch


def fsdp_mesh(c: ml_collections.ConfigDict) -> None:
    """Parameters, gradients and optimizer state sharded over every device (ZeRO-3 style): the
    pod-scale configs. Over several slices, set ``mesh.data`` to the number of slices."""
    c.mesh.update(dict(data=1, fsdp=-1, tensor=1))


def ar_imagenet_recipe(size: str, remat: str = "none", fsdp: bool = True) -> ml_collections.ConfigDict:
    """The D-AR paper's class-conditional recipe for a GPT size on ImageNet 256.

    Global batch 1024, 300 epochs, AdamW lr 4e-4 held, then linear decay to 1e-5 over the last
    50 epochs, weight decay 0.05, betas 0.9/0.95, grad clip 1.0, class/residual/FFN/token
    dropout 0.1, bfloat16 compute; images tokenized in the step by the frozen tokenizer v1.
    ``remat``: the block remat policy (``dar_jax.nn.remat``); ``fsdp``: an FSDP mesh
    (:func:`fsdp_mesh`) instead of data parallelism. ``logging.peak_tflops_per_device`` is an
    H100 SXM in bf16; set it for your accelerator (``dar_jax.hardware``) for an honest MFU.
    """
    from dar_jax.hardware import H100_SXM_BF16_TFLOPS
    c = base_config("ar")
    c.model.update(dict(size=size, vocab_size=16384, block_size=256, num_classes=1000, dtype="bfloat16",
                        resid_dropout_p=0.1, ffn_dropout_p=0.1, token_dropout_p=0.1, class_dropout_prob=0.1,
                        remat=remat))
    c.data.update(dict(kind="tfds", name="imagenet2012", image_size=256, num_classes=1000))
    c.tokenizer.checkpoint = "ckpt/tokenizer_v1"   # converted D-AR tokenizer (or use data.kind="codes")
    steps = epochs_to_steps(300, IMAGENET_TRAIN, PAPER_BATCH)
    c.optim.update(dict(lr=4e-4, weight_decay=0.05, b1=0.9, b2=0.95, grad_clip=1.0,
                        schedule="linear_tail", min_lr_ratio=1e-5 / 4e-4,
                        decay_steps=epochs_to_steps(50, IMAGENET_TRAIN, PAPER_BATCH)))
    c.train.global_batch_size = PAPER_BATCH
    c.train.steps = steps
    if fsdp:
        fsdp_mesh(c)
    c.checkpoint.update(dict(every_steps=5000, keep_period=50000))
    c.logging.update(dict(every_steps=100, peak_tflops_per_device=H100_SXM_BF16_TFLOPS))
    return c
