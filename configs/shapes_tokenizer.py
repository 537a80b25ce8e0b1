"""Tokenizers on the built-in synthetic shapes (32 px, 10 classes), trained on CPU.

Variants (``--config=configs/shapes_tokenizer.py:<variant>``):
  tiny     2 encoder / 2 decoder layers, 64 codes, 4 denoising steps: minutes on CPU (tests, CI)
  default  the shipped default tokenizer's recipe (4 encoder layers, 128 codes, 8 steps, 7000
           steps; scripts/train_default.sh runs it and configs/shapes_ar.py:default and copies
           the exported models to models/default/)

    python train.py --config configs/shapes_tokenizer.py:tiny --workdir runs/tiny_tokenizer

Small-scale training needs two dar-jax additions to the reference recipe: adaLN modulation
initialised with a small std instead of zeros, a short phase without quantisation
(loss.vq_warmup_steps) and random restarts of unused codes; see README. (configs/tiny_tokenizer.py
and configs/default_tokenizer.py name the same variants.)
"""
from dar_jax.config import ConfigError
from dar_jax.train.run_config import base_config

VARIANTS = ("tiny", "default")


def get_config(arg: str = "default"):
    if arg not in VARIANTS:
        raise ConfigError(f"unknown variant {arg!r} of configs/shapes_tokenizer.py; known: {list(VARIANTS)}")
    tiny = arg == "tiny"
    c = base_config("tokenizer")
    c.model.update(dict(
        encoder_patch_size=4, num_encoder_layers=2 if tiny else 4, num_decoder_layers=2,
        query_low_rank=True, encoder_dim=128, decoder_dim=128, vq_dim=8,
        vq_codebook_size=64 if tiny else 128, num_denoising_steps=4 if tiny else 8,
        num_query_groups=4, num_all_queries=32, queries_per_step=8, vq_enable=True,
        sampling_resolution=32, adaln_init_std=0.02,
        diff_decoder=dict(in_dim=3, out_dim=3, dim=128, cond_dim=128, patch_size=4,
                          depth=2 if tiny else 4, data_std=0.6, time_shift=2.0, mlp_head=False,
                          share_time_encoding=False)))
    c.data.update(dict(kind="synthetic", image_size=32, num_classes=10))
    c.eval.update(dict(num_images=16))
    if tiny:
        c.loss.update(dict(vq_warmup_steps=80, dead_code_restart_every=40))
        c.optim.update(dict(lr=1e-3, weight_decay=0.0, b2=0.95, warmup_steps=50))
        c.train.update(dict(global_batch_size=16, steps=300, ema_decay=0.99, eval_every_steps=100))
        c.checkpoint.update(dict(every_steps=100))
        c.logging.update(dict(every_steps=25))
    else:
        c.loss.update(dict(vq_warmup_steps=300, dead_code_restart_every=100))
        c.optim.update(dict(lr=1e-3, weight_decay=0.0, b1=0.9, b2=0.95, grad_clip=1.0,
                            warmup_steps=200, schedule="cosine", min_lr_ratio=0.1))
        c.train.update(dict(global_batch_size=32, steps=7000, ema_decay=0.999, eval_every_steps=1000))
        c.checkpoint.update(dict(every_steps=1000, keep=2, export_dtype="bfloat16"))  # ships at half size
        c.logging.update(dict(every_steps=100))
    return c
