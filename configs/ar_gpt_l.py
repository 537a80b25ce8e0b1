"""D-AR-L recipe (debug_train_c2i.sh): GPT-L on ImageNet 256 codes (AdamW 1e-4, wd 0.05, betas 0.9/0.95, clip 1, batch 256, 300 epochs, dropout 0.1, bf16).

Peak TFLOP/s per device is for an H100 SXM in bf16 (989); set it for your accelerator to get MFU."""
from dar_jax.train.run_config import base_config, epochs_to_steps


def get_config():
    c = base_config("ar")
    c.model.size = "GPT-L"
    c.model.vocab_size = 16384
    c.model.block_size = 256
    c.model.num_classes = 1000
    c.model.dtype = "bfloat16"
    c.model.resid_dropout_p = 0.1
    c.model.ffn_dropout_p = 0.1
    c.model.token_dropout_p = 0.1
    c.model.class_dropout_prob = 0.1
    c.data.kind = "tfds"
    c.data.name = "imagenet2012"
    c.data.image_size = 256
    c.data.num_classes = 1000
    c.tokenizer.checkpoint = "ckpt/tokenizer_v1"   # converted D-AR tokenizer (or use data.kind="codes")
    c.optim.lr = 1e-4
    c.optim.weight_decay = 0.05
    c.optim.b1, c.optim.b2 = 0.9, 0.95
    c.optim.grad_clip = 1.0
    c.train.global_batch_size = 256
    c.train.steps = epochs_to_steps(300, 1_281_167, 256)   # 300 ImageNet epochs
    c.checkpoint.every_steps = 5000
    c.checkpoint.keep_period = 50000
    c.logging.every_steps = 100
    c.logging.peak_tflops_per_device = 989.0
    return c
