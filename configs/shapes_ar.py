"""AR models on the built-in synthetic shapes (32 px, 10 classes), tokenized on the fly.

Variants (``--config=configs/shapes_ar.py:<variant>``):
  tiny     a 2-layer GPT on the tiny tokenizer's 64 codes: trains on CPU in minutes (tests, CI)
  default  the shipped default model's recipe (4 layers, dim 256, 128 codes, EMA, bfloat16 export)

    python train.py --config configs/shapes_ar.py:tiny --workdir runs/tiny_ar \
        --config.tokenizer.checkpoint=runs/tiny_tokenizer/model
    python train.py --config configs/shapes_ar.py:default --workdir runs/default_ar \
        --config.tokenizer.checkpoint=runs/default_tokenizer/model

(configs/tiny_ar.py and configs/default_ar.py name the same variants.)
"""
from dar_jax.config import ConfigError
from dar_jax.train.run_config import base_config

VARIANTS = ("tiny", "default")


def get_config(arg: str = "default"):
    if arg not in VARIANTS:
        raise ConfigError(f"unknown variant {arg!r} of configs/shapes_ar.py; known: {list(VARIANTS)}")
    c = base_config("ar")
    c.data.update(dict(kind="synthetic", image_size=32, num_classes=10))
    c.tokenizer.checkpoint = f"runs/{arg}_tokenizer/model"
    if arg == "tiny":
        c.model.update(dict(size="", dim=128, n_layer=2, n_head=4, vocab_size=64, block_size=32,
                            num_classes=10))
        c.optim.update(dict(lr=1e-3, weight_decay=0.05, b1=0.9, b2=0.95, warmup_steps=20))
        c.train.update(dict(global_batch_size=32, steps=200))
        c.checkpoint.update(dict(every_steps=100))
        c.logging.update(dict(every_steps=10))
    else:
        c.model.update(dict(size="", dim=256, n_layer=4, n_head=4, vocab_size=128, block_size=32,
                            num_classes=10, token_dropout_p=0.1, resid_dropout_p=0.1,
                            ffn_dropout_p=0.1, class_dropout_prob=0.1))
        c.optim.update(dict(lr=1e-3, weight_decay=0.05, b1=0.9, b2=0.95, grad_clip=1.0,
                            warmup_steps=100, schedule="cosine", min_lr_ratio=0.1))
        c.train.update(dict(global_batch_size=64, steps=3000, ema_decay=0.999))
        c.checkpoint.update(dict(every_steps=500, keep=2, export_dtype="bfloat16"))  # ships at half size
        c.logging.update(dict(every_steps=100))
    return c
