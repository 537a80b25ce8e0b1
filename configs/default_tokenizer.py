"""The shipped default tokenizer: synthetic coloured shapes, 32 px, 10 classes, trained on CPU.

    python train.py --config configs/default_tokenizer.py --workdir runs/default_tokenizer

(scripts/train_default.sh runs this and configs/default_ar.py and copies the exported models to
models/default/.) Small-scale training needs two dar-jax additions to the reference recipe:
adaLN modulation initialised with a small std instead of zeros, a short phase without
quantisation (loss.vq_warmup_steps) and random restarts of unused codes; see README.
"""
from dar_jax.train.run_config import base_config


def get_config():
    c = base_config("tokenizer")
    c.model.update(dict(
        encoder_patch_size=4, num_encoder_layers=4, num_decoder_layers=2, query_low_rank=True,
        encoder_dim=128, decoder_dim=128, vq_dim=8, vq_codebook_size=128, num_denoising_steps=8,
        num_query_groups=4, num_all_queries=32, queries_per_step=8, vq_enable=True,
        sampling_resolution=32, adaln_init_std=0.02,
        diff_decoder=dict(in_dim=3, out_dim=3, dim=128, cond_dim=128, patch_size=4, depth=4,
                          data_std=0.6, time_shift=2.0, mlp_head=False, share_time_encoding=False)))
    c.data.update(dict(kind="synthetic", image_size=32, num_classes=10))
    c.loss.update(dict(vq_warmup_steps=300, dead_code_restart_every=100))
    c.optim.update(dict(lr=1e-3, weight_decay=0.0, b1=0.9, b2=0.95, grad_clip=1.0, warmup_steps=200,
                        schedule="cosine", min_lr_ratio=0.1))
    c.train.update(dict(global_batch_size=32, steps=7000, ema_decay=0.999, eval_every_steps=1000))
    c.eval.update(dict(num_images=16))
    c.checkpoint.update(dict(every_steps=1000, keep=2, export_dtype="bfloat16"))   # ships at half size
    c.logging.update(dict(every_steps=100))
    return c
