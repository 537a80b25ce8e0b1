"""D-AR-XXL: GPT-XXL (1.4B; FID 2.00 in D-AR's ICLR 2026 version) on ImageNet 256 at the paper's
recipe (run_config.ar_imagenet_recipe).

FSDP over all devices; remat keeps the projections' and MLP inputs' outputs (recomputing only
element-wise work: see BENCHMARKS.md, "Pod scale").

    python train.py --config configs/ar_gpt_xxl.py --workdir runs/ar_xxl
    python -m dar_jax.aot --config configs/ar_gpt_xxl.py --topology v5p-32
"""
from dar_jax.train.run_config import ar_imagenet_recipe


def get_config():
    return ar_imagenet_recipe("GPT-XXL", remat="attn_out,context,mlp_hidden,qkv")
