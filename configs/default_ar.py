"""The shipped default AR model: a small class-conditional GPT on the default tokenizer's codes
of the synthetic shapes (tokenized on the fly), trained on CPU.

    python train.py --config configs/default_ar.py --workdir runs/default_ar \
        --config.tokenizer.checkpoint=runs/default_tokenizer/model
"""
from dar_jax.train.run_config import base_config


def get_config():
    c = base_config("ar")
    c.model.update(dict(size="", dim=256, n_layer=4, n_head=4, vocab_size=128, block_size=32,
                        num_classes=10, token_dropout_p=0.1, resid_dropout_p=0.1, ffn_dropout_p=0.1,
                        class_dropout_prob=0.1))
    c.data.update(dict(kind="synthetic", image_size=32, num_classes=10))
    c.tokenizer.checkpoint = "runs/default_tokenizer/model"
    c.optim.update(dict(lr=1e-3, weight_decay=0.05, b1=0.9, b2=0.95, grad_clip=1.0, warmup_steps=100,
                        schedule="cosine", min_lr_ratio=0.1))
    c.train.update(dict(global_batch_size=64, steps=3000, ema_decay=0.999))
    c.checkpoint.update(dict(every_steps=500, keep=2, export_dtype="bfloat16"))   # ships at half size
    c.logging.update(dict(every_steps=100))
    return c
