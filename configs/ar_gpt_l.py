"""D-AR-L: GPT-L on ImageNet 256 codes with the reference's recipe (see run_config.ar_imagenet_recipe).

    python train.py --config configs/ar_gpt_l.py --workdir runs/ar_l --config.optim.lr=2e-4
"""
from dar_jax.train.run_config import ar_imagenet_recipe


def get_config():
    return ar_imagenet_recipe("GPT-L")
