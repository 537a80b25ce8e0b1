"""Converts the reference's PyTorch checkpoints into dar-jax model directories.

    python -m dar_jax.checkpoint.convert gpt D-AR-L.pt ckpt/dar_l --model GPT-L
    python -m dar_jax.checkpoint.convert gpt my.pt ckpt/my --dim 512 --n-layer 8 --n-head 8 \
        --block-size 256 --num-classes 1000
    python -m dar_jax.checkpoint.convert tokenizer tokenizer_v1.pt ckpt/tokenizer_v1

GPT files hold no config: give the size (``--model`` or explicit dims), block size and class
count (defaults 256 / 1000; vocabulary size is read from the file). Tokenizer files carry their
config.
"""
from __future__ import annotations

import argparse
import sys

from dar_jax import ar
from dar_jax.checkpoint import reference, store
from dar_jax.checkpoint.torch_pickle import CheckpointError, find_state_dict, load_torch_file
from dar_jax.config import ConfigError


def gpt_config_for_file(state_dict, model: str | None = None, dim: int | None = None,
                        n_layer: int | None = None, n_head: int | None = None,
                        block_size: int = 256, num_classes: int | None = None,
                        vocab_size: int | None = None) -> ar.GPTConfig:
    """The GPT config of a reference state dict given the size the user names."""
    seen = reference.infer_gpt_sizes(state_dict)
    if model is None and (dim is None or n_layer is None or n_head is None):
        raise ConfigError("a GPT checkpoint holds no config: pass --model GPT-B|GPT-L|GPT-XL "
                          "or --dim, --n-layer and --n-head")
    cfg = ar.gpt_config(model, dim=dim, n_layer=n_layer, n_head=n_head, block_size=block_size,
                        num_classes=num_classes if num_classes is not None else 1000,
                        vocab_size=vocab_size if vocab_size is not None else seen["vocab_size"])
    for key in ("dim", "n_layer", "num_classes", "vocab_size"):
        if getattr(cfg, key) != seen[key]:
            raise CheckpointError(f"the file has {key}={seen[key]} but the requested config has "
                                  f"{key}={getattr(cfg, key)}")
    return cfg


def convert_gpt(src: str, dst: str, **size) -> str:
    sd = find_state_dict(load_torch_file(src), reference.GPT_STATE_KEYS, src)
    cfg = gpt_config_for_file(sd, **size)
    params = reference.gpt_params_from_state_dict(sd, cfg, where=f"GPT checkpoint {src}")
    return store.save_model(dst, "gpt", cfg, params, extra={"converted_from": src})


def convert_tokenizer(src: str, dst: str) -> str:
    from dar_jax.tokenizer import load_reference_tokenizer
    cfg, params = load_reference_tokenizer(src)
    return store.save_model(dst, "tokenizer", cfg, params, extra={"converted_from": src})


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m dar_jax.checkpoint.convert", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="what", required=True)
    g = sub.add_parser("gpt", help="LlamaGen / D-AR GPT checkpoint")
    g.add_argument("src")
    g.add_argument("dst")
    g.add_argument("--model", choices=sorted(ar.GPT_SIZES))
    g.add_argument("--dim", type=int)
    g.add_argument("--n-layer", type=int)
    g.add_argument("--n-head", type=int)
    g.add_argument("--block-size", type=int, default=256)
    g.add_argument("--num-classes", type=int, default=1000)
    g.add_argument("--vocab-size", type=int)
    t = sub.add_parser("tokenizer", help="D-AR tokenizer checkpoint (config inside)")
    t.add_argument("src")
    t.add_argument("dst")
    a = ap.parse_args(argv)
    try:
        if a.what == "gpt":
            out = convert_gpt(a.src, a.dst, model=a.model, dim=a.dim, n_layer=a.n_layer,
                              n_head=a.n_head, block_size=a.block_size,
                              num_classes=a.num_classes, vocab_size=a.vocab_size)
        else:
            out = convert_tokenizer(a.src, a.dst)
    except (CheckpointError, ConfigError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
