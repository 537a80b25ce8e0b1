"""D-AR tokenizer v1 on ImageNet 256 at the D-AR paper's recipe.

Global batch 1024, 210K iterations, AdamW lr 2e-4 (500 warmup steps, then constant), weight
decay 0, betas 0.9/0.95, grad clip 1, EMA 0.999, bf16, flow matching + VQ (codebook 1.0,
commitment 0.25) + 0.5 LPIPS + 0.5 REPA (DINOv2-B/14), no GAN (the released script,
debug_train_tokenizer.sh, uses batch 512 for 1000 epochs). FSDP over all devices; remat keeps
the projections' and MLP inputs' outputs of every block (see BENCHMARKS.md, "Pod scale").
Point perceptual.* at the weight files you have (torchvision VGG16 + LPIPS heads, official
DINOv2 ViT-B/14); without them those losses are off (logged once).

    python train.py --config configs/tokenizer_v1.py --workdir runs/tok_v1
    python -m dar_jax.aot --config configs/tokenizer_v1.py --topology v5p-32
"""
from dar_jax.hardware import H100_SXM_BF16_TFLOPS
from dar_jax.train.run_config import PAPER_BATCH, base_config, fsdp_mesh


def get_config():
    c = base_config("tokenizer")
    c.model.update(dict(
        encoder_patch_size=16, num_encoder_layers=8, num_decoder_layers=8, query_low_rank=True,
        encoder_dim=768, decoder_dim=768, vq_dim=8, vq_codebook_size=16384,
        num_denoising_steps=8, num_query_groups=8, num_all_queries=256, queries_per_step=32,
        vq_enable=True, sampling_resolution=256, dtype="bfloat16", repa_projector=True,
        remat="adaln,attn_out,context,mlp_hidden,qkv",
        diff_decoder=dict(in_dim=3, out_dim=3, dim=768, cond_dim=768, patch_size=8, depth=12,
                          data_std=0.6, time_shift=2.0, mlp_head=False, share_time_encoding=False)))
    c.data.update(dict(kind="tfds", name="imagenet2012", image_size=256))
    c.optim.update(dict(lr=2e-4, weight_decay=0.0, b1=0.9, b2=0.95, grad_clip=1.0, warmup_steps=500,
                        schedule="constant"))
    c.loss.update(dict(codebook_weight=1.0, commit_beta=0.25, entropy_weight=0.0,
                       perceptual_weight=0.5, repa_weight=0.5))
    c.perceptual.update(dict(lpips_vgg="weights/vgg16-397923af.pth", lpips_heads="weights/vgg.pth",
                             dinov2="weights/dinov2_vitb14_pretrain.pth"))
    c.train.update(dict(global_batch_size=PAPER_BATCH, steps=210_000, ema_decay=0.999,
                        eval_every_steps=10000))
    fsdp_mesh(c)
    c.eval.update(dict(num_images=16, solver="adams2", steps=0))
    c.checkpoint.update(dict(every_steps=10000, keep=3, keep_period=100000))
    c.logging.update(dict(every_steps=100, peak_tflops_per_device=H100_SXM_BF16_TFLOPS))
    return c
