"""Converts the reference's PyTorch checkpoints into dar-jax model directories.

    python -m dar_jax.checkpoint.convert gpt D-AR-L.pt ckpt/dar_l
    python -m dar_jax.checkpoint.convert gpt my.pt ckpt/my --n-head 8 --block-size 256
    python -m dar_jax.checkpoint.convert tokenizer tokenizer_v1.pt ckpt/tokenizer_v1

GPT files hold no config: dim, layers, FFN width, vocabulary and classes are read from the
shapes; the heads default to dim / 64 (true of GPT-B/L/XL/XXL; --n-head otherwise) and the block
size to 256 (--block-size). --gpt-model and the other size flags are checked against the file.
Tokenizer files carry their config. The destination must be new or an empty folder; an existing
dar-jax model folder is replaced only with --overwrite; nothing else is ever replaced.
"""
from __future__ import annotations

import argparse
import sys

from dar_jax import ar, tokenizer
from dar_jax.ar import reference
from dar_jax.checkpoint import store
from dar_jax.checkpoint.torch_pickle import find_state_dict, load_torch_file


def convert_gpt(src: str, dst: str, *, overwrite: bool = False, **size) -> str:
    """``size``: the GPT size flags (:data:`reference.GPT_SIZE_FLAGS`), all optional."""
    store.check_destination(dst, overwrite=overwrite, sources=(src,))
    sd = find_state_dict(load_torch_file(src), reference.GPT_STATE_KEYS, src)
    cfg = reference.gpt_config_from_state_dict(sd, where=f"GPT checkpoint {src}", **size)
    params = reference.gpt_params_from_state_dict(sd, cfg, where=f"GPT checkpoint {src}")
    return store.save_model(dst, ar.FAMILY, cfg, params, extra={"converted_from": src},
                            overwrite=overwrite, sources=(src,))


def convert_tokenizer(src: str, dst: str, *, overwrite: bool = False) -> str:
    store.check_destination(dst, overwrite=overwrite, sources=(src,))
    cfg, params = tokenizer.load_reference_tokenizer(src)
    return store.save_model(dst, tokenizer.FAMILY, cfg, params, extra={"converted_from": src},
                            overwrite=overwrite, sources=(src,))


def main(argv=None) -> int:
    from dar_jax.cli import add_gpt_size_flags, gpt_size_flags, guarded_main
    ap = argparse.ArgumentParser(prog="python -m dar_jax.checkpoint.convert", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="what", required=True)
    g = sub.add_parser("gpt", help="LlamaGen / D-AR GPT checkpoint")
    t = sub.add_parser("tokenizer", help="D-AR tokenizer checkpoint (config inside)")
    for p in (g, t):
        p.add_argument("src")
        p.add_argument("dst")
        p.add_argument("--overwrite", action="store_true", help="replace an existing dar-jax model at dst")
    add_gpt_size_flags(g, "--model")
    a = ap.parse_args(argv)

    def run():
        if a.what == "gpt":
            out = convert_gpt(a.src, a.dst, overwrite=a.overwrite, **gpt_size_flags(a))
        else:
            out = convert_tokenizer(a.src, a.dst, overwrite=a.overwrite)
        print(f"wrote {out}")

    return guarded_main(run)


if __name__ == "__main__":
    sys.exit(main())
