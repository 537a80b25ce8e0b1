"""D-AR-XL: GPT-XL (775M) on ImageNet 256 at the D-AR paper's recipe (run_config.ar_imagenet_recipe).

FSDP over all devices; remat keeps the projections' and MLP inputs' outputs (recomputing only
element-wise work: see BENCHMARKS.md, "Pod scale").

    python train.py --config configs/ar_gpt_xl.py --workdir runs/ar_xl
    python -m dar_jax.aot --config configs/ar_gpt_xl.py --topology v5p-32
"""
from dar_jax.train.run_config import ar_imagenet_recipe


def get_config():
    return ar_imagenet_recipe("GPT-XL", remat="attn_out,context,mlp_hidden,qkv")
