"""A tiny AR model on the built-in synthetic shapes, tokenized on the fly by a tiny tokenizer.

    python train.py --config configs/tiny_ar.py --workdir runs/tiny_ar \
        --config.tokenizer.checkpoint=runs/tiny_tokenizer/model
"""
from dar_jax.train.run_config import base_config


def get_config():
    c = base_config("ar")
    c.model.update(dict(size="", dim=128, n_layer=2, n_head=4, vocab_size=64, block_size=32,
                        num_classes=10))
    c.data.update(dict(kind="synthetic", image_size=32, num_classes=10))
    c.tokenizer.checkpoint = "runs/tiny_tokenizer/model"
    c.optim.update(dict(lr=1e-3, weight_decay=0.05, b1=0.9, b2=0.95, warmup_steps=20))
    c.train.update(dict(global_batch_size=32, steps=200))
    c.checkpoint.update(dict(every_steps=100))
    c.logging.update(dict(every_steps=10))
    return c
