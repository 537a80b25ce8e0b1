"""Shared test set-up: fixture locations, float32 'highest' matmuls, models loaded once, and one
XLA compilation cache for the session (this process and the CLIs the tests start)."""
from __future__ import annotations

import atexit
import json
import os
import pathlib
import shutil
import tempfile

import jax
import numpy as np
import pytest

jax.config.update("jax_default_matmul_precision", "highest")

# Many tests start train.py / sample.py / evaluate in subprocesses that compile the same programs;
# a persistent compilation cache shared by the session compiles each once (same executables, so
# results are unchanged). The directory is made here and removed at exit; an existing
# JAX_COMPILATION_CACHE_DIR is used as it is, and DAR_TEST_XLA_CACHE=0 turns the cache off.
if os.environ.get("DAR_TEST_XLA_CACHE", "1") != "0":
    if not os.environ.get("JAX_COMPILATION_CACHE_DIR"):
        _cache = tempfile.mkdtemp(prefix="dar-jax-test-xla-cache-")
        atexit.register(shutil.rmtree, _cache, ignore_errors=True)
        os.environ["JAX_COMPILATION_CACHE_DIR"] = _cache
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.3")
    jax.config.update("jax_compilation_cache_dir", os.environ["JAX_COMPILATION_CACHE_DIR"])
    jax.config.update("jax_persistent_cache_min_compile_time_secs",
                      float(os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"]))

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
    from dar_jax.ar import reference
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
    from dar_jax import ar
    from dar_jax import tokenizer as tok
    from dar_jax.checkpoint import save_model
    root = tmp_path_factory.mktemp("models")
    save_model(root / "gpt", ar.FAMILY, *ref_gpt)
    save_model(root / "tokenizer", tok.FAMILY, *ref_tokenizer)
    return root / "gpt", root / "tokenizer"
