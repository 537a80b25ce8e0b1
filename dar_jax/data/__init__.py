"""Input data: sources (synthetic shapes, image folders, tfds array_record, code shards), the
reference's augmentation, and deterministic, resumable grain pipelines.

Config-facing entry point::

  pipeline = make_dataset(cfg.data, split=None, global_batch_size=256, seed=0, purpose="ar")
  it = pipeline.iterator()             # or pipeline.iterator(saved_state)
  batch = next(it)                     # {"image": (B, S, S, 3) float32 in [-1, 1], "label": (B,)}
  state = it.get_state()               # JSON-able, identical on all processes

``cfg.data`` keys are the fields of :class:`DataConfig` (unknown keys are an error).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import numpy as np

from dar_jax.config import ConfigError, as_plain, from_mapping
from dar_jax.data import augment
from dar_jax.data.codes import (CodeShards, CodeShardWriter, finalize_code_shards,
                                write_code_shards)
from dar_jax.data.pipeline import DataIterator, Pipeline, collate, steps_for_epochs
from dar_jax.data.sources import DataError, ImageFolder, TfdsSource, decode_image
from dar_jax.data.synthetic import SyntheticShapes

KINDS = ("synthetic", "folder", "tfds", "codes")
PURPOSES = ("ar", "tokenizer", "eval", "extract")

__all__ = [
    "DataConfig", "make_dataset", "make_source", "Pipeline", "DataIterator", "DataError",
    "SyntheticShapes", "ImageFolder", "TfdsSource", "CodeShards", "CodeShardWriter",
    "finalize_code_shards", "write_code_shards", "decode_image", "augment", "collate",
    "steps_for_epochs", "KINDS", "PURPOSES",
]


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """The ``data`` section of a run config.

    kind: "synthetic" | "folder" | "tfds" | "codes".
    name: tfds dataset name (kind "tfds"), e.g. "imagenet2012".
    data_dir: folder / code directory, may contain "{split}" (e.g. "/data/imagenet/{split}");
      tfds data_dir ("" = tfds' default). Unused by "synthetic".
    image_size: output resolution S.
    num_classes: classes of the synthetic set (0 = 10); for other kinds an upper bound checked
      against the dataset (0 = take the dataset's).
    train_split, eval_split: split names used when make_dataset gets no split.
    crop_ratio: AR centre crop to int(S * crop_ratio) before the ten crops (reference 1.1).
    min_crop_frac: tokenizer random crop: short side resized into [S, ceil(S / min_crop_frac)].
    extract_crops: crops per image for code extraction (purpose "extract"): 10 (ten crops of the
      int(S * crop_ratio) centre crop), 2 (centre crop and its flip) or 1.
    num_train_examples, num_eval_examples: synthetic set size of the "train" split and of the
      held-out "validation"/"test" splits (0 = 50_000 / 10_000).
    seed: synthetic drawing seed (the content; independent of make_dataset's shuffle seed).
    image_key, label_key: tfds feature names.
    prepare: tfds: prepare the dataset if it is not (array_record; ImageNet from manual_dir).
    manual_dir: tfds manual-download dir ("" = <data_dir>/downloads/manual).
    num_threads, prefetch, worker_count: grain reader threads, prefetched batches, worker
      processes (0 = none).
    """
    kind: str = "synthetic"
    name: str = ""
    data_dir: str = ""
    image_size: int = 256
    num_classes: int = 0
    train_split: str = "train"
    eval_split: str = "validation"
    crop_ratio: float = 1.1
    min_crop_frac: float = 0.8
    extract_crops: int = 10
    num_train_examples: int = 0
    num_eval_examples: int = 0
    seed: int = 0
    image_key: str = "image"
    label_key: str = "label"
    prepare: bool = False
    manual_dir: str = ""
    num_threads: int = 8
    prefetch: int = 16
    worker_count: int = 0


def data_config(data_cfg: Mapping[str, Any] | DataConfig) -> DataConfig:
    """Mapping / ConfigDict -> :class:`DataConfig` (unknown keys raise ``ConfigError``)."""
    if isinstance(data_cfg, DataConfig):
        cfg = data_cfg
    else:
        cfg = from_mapping(DataConfig, as_plain(data_cfg), where="data")
    if cfg.kind not in KINDS:
        raise ConfigError(f"unknown data kind {cfg.kind!r}; kinds: {list(KINDS)}")
    if cfg.image_size < 1:
        raise ConfigError(f"data.image_size must be >= 1, got {cfg.image_size}")
    if cfg.kind in ("folder", "codes") and not cfg.data_dir:
        raise ConfigError(f"data.kind={cfg.kind!r} needs data.data_dir")
    if cfg.extract_crops not in (1, 2, 10):
        raise ConfigError(f"data.extract_crops must be 10, 2 or 1, got {cfg.extract_crops}")
    if cfg.crop_ratio < 1.0 or not 0.0 < cfg.min_crop_frac <= 1.0:
        raise ConfigError(f"data.crop_ratio must be >= 1 and data.min_crop_frac in (0, 1], got "
                          f"{cfg.crop_ratio} and {cfg.min_crop_frac}")
    return cfg


def _path(cfg: DataConfig, split: str) -> str:
    return cfg.data_dir.format(split=split) if "{split}" in cfg.data_dir else cfg.data_dir


def make_source(data_cfg: Mapping[str, Any] | DataConfig, split: str):
    """The random-access source of ``split`` for a data config (no augmentation)."""
    cfg = data_config(data_cfg)
    if cfg.kind == "synthetic":
        return SyntheticShapes(
            num_classes=cfg.num_classes or 10, image_size=cfg.image_size, split=split,
            num_examples=(cfg.num_train_examples or 50_000) if split == "train"
            else (cfg.num_eval_examples or 10_000), seed=cfg.seed)
    if cfg.kind == "folder":
        source = ImageFolder(_path(cfg, split))
    elif cfg.kind == "tfds":
        source = TfdsSource(cfg.name, split=split, data_dir=cfg.data_dir or None,
                            image_key=cfg.image_key, label_key=cfg.label_key,
                            prepare=cfg.prepare, manual_dir=cfg.manual_dir or None)
    else:
        source = CodeShards(_path(cfg, split))
        size = source.meta.get("image_size")
        if size is not None and int(size) != cfg.image_size:
            raise DataError(f"codes in {source.path!r} were extracted at image_size {size}, "
                            f"data.image_size is {cfg.image_size}")
    n = getattr(source, "num_classes", None)
    if cfg.num_classes and n is not None and n > cfg.num_classes:
        raise DataError(f"{source!r} has {n} classes, more than data.num_classes="
                        f"{cfg.num_classes}")
    return source


class _ImageTransform:
    def __init__(self, purpose: str, size: int, crop_ratio: float, min_crop_frac: float,
                 extract_crops: int):
        self.purpose, self.size = purpose, size
        self.crop_ratio, self.min_crop_frac = crop_ratio, min_crop_frac
        self.extract_crops = extract_crops

    def __call__(self, record: dict, rng: np.random.Generator) -> dict:
        image = record["image"]
        if self.purpose == "ar":
            image = augment.ar_train(image, self.size, rng, self.crop_ratio)
        elif self.purpose == "tokenizer":
            image = augment.tokenizer_train(image, self.size, rng, self.min_crop_frac)
        elif self.purpose == "extract":
            image = augment.extract_crops(image, self.size, self.extract_crops, self.crop_ratio)
        else:
            image = augment.eval_center(image, self.size)
        return {"image": image, "label": record["label"]}


class _PickCrop:
    """Codes (num_crops, T) -> tokens of one crop (T,), chosen by the example's rng."""

    def __call__(self, record: dict, rng: np.random.Generator) -> dict:
        codes = record["codes"]
        return {"tokens": codes[int(rng.integers(codes.shape[0]))], "label": record["label"]}


def make_dataset(data_cfg: Mapping[str, Any] | DataConfig, *, global_batch_size: int, seed: int,
                 split: str | None = None, purpose: str = "ar",
                 process_index: int | None = None, process_count: int | None = None,
                 num_epochs: int | None = None, shuffle: bool | None = None) -> Pipeline:
    """The input pipeline of one process.

    Args:
      data_cfg: the ``data`` config (see :class:`DataConfig`).
      global_batch_size: examples per step over all processes.
      seed: shuffle / augmentation seed, in [0, 2**32).
      split: dataset split (default: ``train_split``, or ``eval_split`` for purpose "eval").
      purpose: "ar" (AR augmentation, or code shards), "tokenizer" (random crop), "eval"
        (centre crop, source order, every example once per epoch, padded last batch + ``mask``)
        or "extract" (as "eval", with ``extract_crops`` crops per image, for code extraction).
      process_index, process_count: default ``jax.process_index()`` / ``jax.process_count()``.
      num_epochs: None = forever (default for "ar"/"tokenizer"; "eval"/"extract": 1).
      shuffle: default True except for "eval"/"extract".

    Returns:
      a :class:`Pipeline`; ``pipeline.iterator(state=None)`` yields local batches
      ``{"image": (B, S, S, 3) float32 in [-1, 1], "label": (B,) int32}`` (kind "codes":
      ``{"tokens": (B, T) int32, "label"}``; "eval" adds ``"mask": (B,) bool``; "extract" gives
      ``"image": (B, extract_crops, S, S, 3)`` and ``mask``), B = global batch / process count.
    """
    cfg = data_config(data_cfg)
    if purpose not in PURPOSES:
        raise DataError(f"unknown data purpose {purpose!r}; purposes: {list(PURPOSES)}")
    if cfg.kind == "codes" and purpose != "ar":
        raise DataError(f"code shards feed the AR model only (purpose 'ar'), not {purpose!r}")
    if process_index is None or process_count is None:
        import jax
        process_index = jax.process_index() if process_index is None else process_index
        process_count = jax.process_count() if process_count is None else process_count
    is_eval = purpose in ("eval", "extract")
    split = split or (cfg.eval_split if purpose == "eval" else cfg.train_split)
    source = make_source(cfg, split)
    if cfg.kind == "codes":
        transform = _PickCrop()
        spec = {"tokens": ((source.seq_len,), np.int32), "label": ((), np.int32)}
    else:
        transform = _ImageTransform(purpose, cfg.image_size, cfg.crop_ratio, cfg.min_crop_frac,
                                    cfg.extract_crops)
        crops = (cfg.extract_crops,) if purpose == "extract" else ()
        spec = {"image": ((*crops, cfg.image_size, cfg.image_size, 3), np.float32),
                "label": ((), np.int32)}
    return Pipeline(
        source, transform, global_batch_size=global_batch_size, seed=seed,
        process_index=process_index, process_count=process_count,
        shuffle=(not is_eval) if shuffle is None else shuffle, drop_remainder=not is_eval,
        num_epochs=(1 if is_eval else None) if num_epochs is None else num_epochs,
        num_threads=cfg.num_threads, prefetch=cfg.prefetch, num_workers=cfg.worker_count,
        fingerprint={"kind": cfg.kind, "name": cfg.name, "split": split, "purpose": purpose,
                     "image_size": cfg.image_size},
        num_classes=getattr(source, "num_classes", None), example_spec=spec)
