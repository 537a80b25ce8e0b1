"""D-AR-B: GPT-B on ImageNet 256 at the D-AR paper's recipe (see run_config.ar_imagenet_recipe).

111M parameters: data parallel (replicated parameters) and no remat.

    python train.py --config configs/ar_gpt_b.py --workdir runs/ar_b
"""
from dar_jax.train.run_config import ar_imagenet_recipe


def get_config():
    return ar_imagenet_recipe("GPT-B", remat="none", fsdp=False)
