"""The shape of a run config (every section and key a run may set), shared by ``configs/*.py``.

Config files start from :func:`base_config` and change values; because the returned ConfigDict
is locked by the loader, a key outside this shape is an error naming it. The sections the
trainer reads are typed dataclasses (``dar_jax.train.sections``), whose defaults are the
config's defaults.
"""
from __future__ import annotations

import dataclasses

import ml_collections

from dar_jax.config import typed_section
from dar_jax.data import DataConfig
from dar_jax.parallel.sharding import DEFAULT_RULES
from dar_jax.train.optim import OptimConfig
from dar_jax.train.sections import CheckpointConfig, LoggingConfig, TrainConfig


def _section(cls) -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(dataclasses.asdict(cls()))


def base_config(task: str = "ar") -> ml_collections.ConfigDict:
    """Every section and key a run of ``task`` ("ar" | "tokenizer") may set, at its default.
    Keys whose default is None are typed placeholders (overridable from the command line)."""
    c = ml_collections.ConfigDict()
    c.task = task
    c.model = typed_section(model_defaults(task), _model_class(task))  # every field of the model config
    c.data = _section(DataConfig)                     # keys: dar_jax.data.DataConfig
    if task == "ar":
        c.tokenizer = ml_collections.ConfigDict(dict(checkpoint=""))  # tokenize images on the fly
    c.optim = _section(OptimConfig)
    c.train = _section(TrainConfig)
    c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1))
    c.sharding_rules = tuple((name, axes) for name, axes in DEFAULT_RULES)
    c.checkpoint = _section(CheckpointConfig)
    c.logging = _section(LoggingConfig)
    c.distributed = ml_collections.ConfigDict(dict(coordinator_address="", num_processes=0,
                                                   process_id=-1, cpu_collectives=""))
    # optional cheap FID / IS every train.eval_every_steps (inception: pytorch-fid weights)
    c.eval = ml_collections.ConfigDict(dict(
        inception="", reference="", protocol="adm", fid_num_samples=0, cfg_scale="4.0",
        solver="adams2", steps=0, batch_size=16))
    if task == "tokenizer":
        from dar_jax.train.tokenizer_task import GanConfig, LossConfig
        c.loss = _section(LossConfig)
        c.gan = _section(GanConfig)
        # weight files users already have; empty = that loss is off (logged once)
        c.perceptual = ml_collections.ConfigDict(dict(lpips_vgg="", lpips_heads="", dinov2=""))
        c.eval.update(dict(num_images=8))   # held-out images for PSNR / SSIM / rFID / grids
    return c


def _model_class(task: str):
    """The model config dataclass of ``task``."""
    if task == "ar":
        from dar_jax.ar import GPTConfig
        return GPTConfig
    if task == "tokenizer":
        from dar_jax.tokenizer import TokenizerConfig
        return TokenizerConfig
    from dar_jax.config import ConfigError
    raise ConfigError(f"unknown task {task!r}; expected 'ar' or 'tokenizer'")


def model_defaults(task: str) -> dict:
    """All fields of the task's model config with their defaults (so each can be overridden)."""
    from dar_jax.config import to_dict
    fields = to_dict(_model_class(task)())
    if task == "ar":
        # dim / n_layer / n_head come from ``size`` unless set (None = take the size's)
        fields.update(size="", dim=None, n_layer=None, n_head=None)
    return fields


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
