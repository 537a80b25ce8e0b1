"""Sample images with D-AR: class labels -> tokens (AR model) -> images (tokenizer decoder).

    python sample.py                                  # the shipped default model, every class
    python sample.py --gpt ckpt/dar_l --tokenizer ckpt/tokenizer_v1 --classes 207,360,387 \
        --cfg-scale 1.2,8.0 --num-images 8 --out samples/l
    python sample.py --gpt D-AR-L-360K.pt --gpt-model GPT-L --tokenizer tokenizer_v1.pt ...
    python sample.py --layout-from photo.jpg --layout-groups 2 --classes 88 --num-images 4
    python sample.py --per-class 50 --npz --no-images --out samples/fid   # ADM evaluator batch

Writes grid.png, one PNG per image, previews.png and each image's preview strip (the image
after each token group; --no-previews to skip), and with --npz samples.npz (uint8 NHWC under
arr_0, labels under arr_1). Batches are spread over all local devices (and hosts); a sample's
result depends only on --seed and its index.
"""
import sys

from dar_jax.sample_cli import main

if __name__ == "__main__":
    sys.exit(main())
