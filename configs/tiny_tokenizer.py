"""A tiny tokenizer on the built-in synthetic shapes (32 px, 10 classes): trains on CPU in minutes.

    python train.py --config configs/tiny_tokenizer.py --workdir runs/tiny_tokenizer
"""
from dar_jax.train.run_config import base_config


def get_config():
    c = base_config("tokenizer")
    c.model.update(dict(
        encoder_patch_size=4, num_encoder_layers=2, num_decoder_layers=2, query_low_rank=True,
        encoder_dim=128, decoder_dim=128, vq_dim=8, vq_codebook_size=64, num_denoising_steps=4,
        num_query_groups=4, num_all_queries=32, queries_per_step=8, vq_enable=True,
        sampling_resolution=32, adaln_init_std=0.02,
        diff_decoder=dict(in_dim=3, out_dim=3, dim=128, cond_dim=128, patch_size=4, depth=2,
                          data_std=0.6, time_shift=2.0, mlp_head=False, share_time_encoding=False)))
    c.data.update(dict(kind="synthetic", image_size=32, num_classes=10))
    c.loss.update(dict(vq_warmup_steps=80, dead_code_restart_every=40))
    c.optim.update(dict(lr=1e-3, weight_decay=0.0, b2=0.95, warmup_steps=50))
    c.train.update(dict(global_batch_size=16, steps=300, ema_decay=0.99, eval_every_steps=100))
    c.eval.update(dict(num_images=16))
    c.checkpoint.update(dict(every_steps=100))
    c.logging.update(dict(every_steps=25))
    return c
