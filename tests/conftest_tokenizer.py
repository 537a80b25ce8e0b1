"""Session fixtures of the tokenizer / sampling tests (imported by their modules): the reference
fixture folders they run on.

The default folder (``ref_dir``: ``DAR_REFERENCE_FIXTURES`` or the repo's ``tiny``) plus this repo's
variant folders (other patch sizes, group and step counts, data_std, time shift, MLP head with a
shared time embedding, full-rank queries, no decoder layers, no REPA weights in the file).
Everything about a case comes from its config.json / checkpoint.
"""
from __future__ import annotations

import json
import pathlib
from typing import NamedTuple

import numpy as np
import pytest

from conftest import REFERENCE_DIR, TESTS

VARIANTS = ("p16_mlp", "p4_g2")
VARIANT_ROOT = TESTS / "fixtures" / "dar_reference"


def case_ids():
    ids = ["default"]
    for name in VARIANTS:
        if (VARIANT_ROOT / name).resolve() != REFERENCE_DIR.resolve():
            ids.append(name)
    return ids


class Case(NamedTuple):
    name: str
    path: pathlib.Path
    config: dict
    cfg: object          # TokenizerConfig
    params: dict
    io: dict             # tokenizer_io.npz with images as NHWC


def nhwc(a):
    a = np.asarray(a)
    return np.transpose(a, (0, 2, 3, 1)) if a.ndim == 4 else a


_CACHE: dict = {}


def load_case(name: str, ref_dir: pathlib.Path) -> Case:
    path = ref_dir if name == "default" else VARIANT_ROOT / name
    key = str(path.resolve())
    if key not in _CACHE:
        from dar_jax import tokenizer
        if not (path / "tokenizer.pt").exists():
            pytest.fail(f"fixture folder {path} has no tokenizer.pt")
        config = json.loads((path / "config.json").read_text())
        cfg, params = tokenizer.load_reference_tokenizer(path / "tokenizer.pt")
        io = {k: nhwc(v) for k, v in np.load(path / "tokenizer_io.npz").items()}
        _CACHE[key] = Case(name, path, config, cfg, params, io)
    return _CACHE[key]


@pytest.fixture(scope="session", params=case_ids())
def tok_case(request, ref_dir) -> Case:
    """One reference fixture folder (parametrised over the default folder and the variants)."""
    return load_case(request.param, ref_dir)


@pytest.fixture(scope="session")
def tok_default(ref_dir) -> Case:
    """The default fixture folder only (tests that need one case)."""
    return load_case("default", ref_dir)
