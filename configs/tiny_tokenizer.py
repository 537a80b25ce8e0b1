"""The ``tiny`` variant of configs/shapes_tokenizer.py (this path is kept: the README, scripts and tests
name it). See that file.

    python train.py --config configs/tiny_tokenizer.py --workdir runs/tiny_tokenizer
"""
import os
import runpy


def get_config(arg=None):
    variants = runpy.run_path(os.path.join(os.path.dirname(os.path.abspath(__file__)), "shapes_tokenizer.py"))
    return variants["get_config"]("tiny")
