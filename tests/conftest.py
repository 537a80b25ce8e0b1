"""Shared test set-up: fixture locations, float32 'highest' matmuls, models loaded once."""
from __future__ import annotations

import json
import os
import pathlib

import jax
import numpy as np
import pytest

jax.config.update("jax_default_matmul_precision", "highest")

pytest_plugins = ["conftest_tokenizer"]  # tokenizer fixtures (parametrised over fixture sets)

TESTS = pathlib.Path(__file__).resolve().parent
REPO = TESTS.parent
REFERENCE_DIR = pathlib.Path(os.environ.get("DAR_REFERENCE_FIXTURES",
                                            TESTS / "fixtures" / "dar_reference" / "tiny"))
OFFICIAL_SHAPES = TESTS / "fixtures" / "official_param_shapes.json"
# large fixtures read in place (../shared beside the clone, or set the variables)
INCEPTION_DIR = pathlib.Path(os.environ.get("DAR_INCEPTION_FIXTURES",
                                            REPO.parent / "shared" / "fixtures" / "inception"))
PERCEPTUAL_DIR = pathlib.Path(os.environ.get("DAR_PERCEPTUAL_FIXTURES",
                                             REPO.parent / "shared" / "fixtures" / "perceptual"))


@pytest.fixture(scope="session")
def ref_dir() -> pathlib.Path:
    if not (REFERENCE_DIR / "config.json").exists():
        pytest.fail(f"reference fixtures not found at {REFERENCE_DIR} (DAR_REFERENCE_FIXTURES)")
    return REFERENCE_DIR


@pytest.fixture(scope="session")
def inception_dir() -> pathlib.Path:
    if not INCEPTION_DIR.is_dir():
        pytest.skip(f"Inception fixtures not found at {INCEPTION_DIR} (set DAR_INCEPTION_FIXTURES); "
                    "they are large and read in place")
    return INCEPTION_DIR


@pytest.fixture(scope="session")
def ref_config(ref_dir) -> dict:
    return json.loads((ref_dir / "config.json").read_text())


@pytest.fixture(scope="session")
def gpt_io(ref_dir):
    return dict(np.load(ref_dir / "gpt_io.npz"))


@pytest.fixture(scope="session")
def ref_gpt(ref_dir, ref_config):
    """(cfg, params) of the fixture GPT, converted from the reference .pt."""
    from dar_jax import ar
    from dar_jax.checkpoint import reference
    cfg = ar.gpt_config(**ref_config["gpt"])
    return cfg, reference.load_reference_gpt(ref_dir / "gpt.pt", cfg)


@pytest.fixture(scope="session")
def ref_tokenizer(ref_dir):
    """(cfg, params) of the fixture tokenizer, converted from the reference .pt."""
    from dar_jax import tokenizer
    return tokenizer.load_reference_tokenizer(ref_dir / "tokenizer.pt")


@pytest.fixture(scope="session")
def ref_models(ref_gpt, ref_tokenizer):
    from dar_jax import pipeline
    return pipeline.make_models(ref_gpt[0], ref_gpt[1], *ref_tokenizer)


@pytest.fixture(scope="session")
def model_dirs(tmp_path_factory, ref_gpt, ref_tokenizer):
    """The fixture models saved as dar-jax model directories: (gpt_dir, tokenizer_dir)."""
    from dar_jax.checkpoint import save_model
    root = tmp_path_factory.mktemp("models")
    save_model(root / "gpt", "gpt", *ref_gpt)
    save_model(root / "tokenizer", "tokenizer", *ref_tokenizer)
    return root / "gpt", root / "tokenizer"
