"""End-to-end sampling speed at 256 px: tokenizer v1 + GPT-B/L (random weights of the full
sizes), images/s split into AR and decoder time, and peak host memory.

    python benchmarks/pipeline.py                          # GPT-B and GPT-L, batch 1/4/16
    python benchmarks/pipeline.py --memory-check           # GPT-XL + tokenizer v1, batch 16, bf16

The end-to-end figure is ``pipeline.sample`` (AR generation interleaved with the group-by-group
decode); AR and decoder times are measured separately on the same inputs (``ar.generate`` and
``tokenizer.decode``). Peak memory is the process's maximum resident set size.
"""
from __future__ import annotations

import argparse
import dataclasses
import sys

import numpy as np

sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parent))
import common  # noqa: E402

from dar_jax import ar, pipeline  # noqa: E402
from dar_jax import tokenizer as tok  # noqa: E402


def models_for(size: str, dtype: str) -> pipeline.Models:
    tcfg = dataclasses.replace(tok.TokenizerConfig(), dtype=dtype)
    gcfg = ar.gpt_config(size, vocab_size=tcfg.vq_codebook_size, block_size=tcfg.num_all_queries,
                         num_classes=1000, dtype=dtype)
    return pipeline.make_models(gcfg, common.random_params(ar.abstract_params(gcfg), 1),
                                tcfg, common.random_params(tok.abstract_params(tcfg), 2))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["GPT-B", "GPT-L"])
    ap.add_argument("--batches", nargs="+", type=int, default=[1, 4, 16])
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--cfg-scale", default="4.0")
    ap.add_argument("--reps", type=int, default=1)
    ap.add_argument("--memory-check", action="store_true",
                    help="only GPT-XL + tokenizer v1 at batch 16 in bfloat16, reporting peak memory")
    a = ap.parse_args()
    if a.memory_check:
        a.models, a.batches, a.dtype = ["GPT-XL"], [16], "bfloat16"
    print(f"machine: {common.machine()}")
    rows = []
    for size in a.models:
        m = models_for(size, a.dtype)
        opts = pipeline.SampleOptions(cfg_scale=a.cfg_scale)
        for b in a.batches:
            labels = np.arange(b) % m.num_classes
            keys = pipeline.sample_keys(0, b)
            e2e, first = common.timed(lambda: pipeline.sample(m, labels, keys, opts).images, a.reps)
            tokens = ar.generate(m.gpt_cfg, m.gpt_params, labels, pipeline.token_keys(keys), cfg_scale=a.cfg_scale)
            ar_s = common.timeit(lambda: ar.generate(m.gpt_cfg, m.gpt_params, labels, pipeline.token_keys(keys),
                                                     cfg_scale=a.cfg_scale), a.reps)
            noise = pipeline.noise_for(m, keys)
            dec_s = common.timeit(lambda: tok.decode(m.tok_cfg, m.tok_params, tokens, noise), a.reps)
            row = dict(model=size, dtype=a.dtype, batch=b, end_to_end_s=e2e, images_per_s=b / e2e,
                       ar_s=ar_s, decode_s=dec_s, first_call_s=first, peak_rss_gib=common.peak_host_memory_gib())
            rows.append(row)
            print(row, flush=True)
    print()
    common.print_table(rows, ["model", "dtype", "batch", "end_to_end_s", "images_per_s", "ar_s", "decode_s",
                              "first_call_s", "peak_rss_gib"])


if __name__ == "__main__":
    main()
