"""Code shards: pre-extracted tokenizer codes of a dataset, for training the AR model.

Layout of a code directory::

  index.json                      {"format": "dar-jax-code-shards", "version": 1,
                                   "num_examples", "num_crops", "seq_len", "num_classes",
                                   "dtype", "shards": [{"codes", "labels", "num_examples"}...],
                                   "meta": {...}}
  codes-w00000-s00000.npy         (n, num_crops, seq_len) uint16 / int32
  labels-w00000-s00000.npy        (n,) int32

``num_crops`` is 10 for the reference's ten-crop extraction, 2 for (image, flip), 1 for none.
Several writers (one per process, ``writer_index``) write their shards and a part file each;
:func:`finalize_code_shards` (one process, after all writers closed) joins the parts into
``index.json``. Files are written to a temporary name and renamed, and ``index.json`` is written
last, so a directory with an index is complete. :class:`CodeShards` reads it by random access
(memory-mapped).
"""
from __future__ import annotations

import glob
import json
import os
from typing import Any, Mapping

import numpy as np

from dar_jax import io
from dar_jax.data.sources import DataError

FORMAT = "dar-jax-code-shards"
VERSION = 1
INDEX = "index.json"


def _code_dtype(vocab_size: int | None) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size is not None and vocab_size <= 2 ** 16 \
        else np.dtype(np.int32)


class CodeShardWriter:
    """Streams (codes, labels) into shards of ``shard_size`` examples.

    Args:
      out_dir: the code directory (created).
      num_crops: crops per example (10, 2 or 1).
      seq_len: tokens per crop, T.
      vocab_size: codebook size; codes must lie in [0, vocab_size); stored as uint16 when it
        fits, else int32 (None: int32, codes only checked to be >= 0).
      shard_size: examples per shard file.
      writer_index: this writer's number (the process index when several processes write).
    """

    def __init__(self, out_dir: str, *, num_crops: int, seq_len: int,
                 vocab_size: int | None = None, shard_size: int = 16384, writer_index: int = 0):
        if num_crops < 1 or seq_len < 1 or shard_size < 1 or writer_index < 0:
            raise DataError(f"code shards: bad writer settings num_crops={num_crops}, "
                            f"seq_len={seq_len}, shard_size={shard_size}, "
                            f"writer_index={writer_index}")
        os.makedirs(out_dir, exist_ok=True)
        self.out_dir = os.fspath(out_dir)
        self.num_crops, self.seq_len, self.vocab_size = num_crops, seq_len, vocab_size
        self.shard_size, self.writer_index = shard_size, writer_index
        self.dtype = _code_dtype(vocab_size)
        self._codes: list[np.ndarray] = []
        self._labels: list[np.ndarray] = []
        self._buffered = 0
        self._shards: list[dict] = []
        self._closed = False

    def add(self, codes, labels) -> None:
        """codes: (n, num_crops, T) (or (n, T) when num_crops == 1) ints; labels: (n,) ints."""
        if self._closed:
            raise DataError("code shards: add() after close()")
        codes = np.asarray(codes)
        labels = np.asarray(labels).reshape(-1)
        if codes.ndim == 2 and self.num_crops == 1:
            codes = codes[:, None, :]
        expect = (len(labels), self.num_crops, self.seq_len)
        if codes.shape != expect:
            raise DataError(f"code shards: codes of shape {codes.shape} do not match (n, num_crops,"
                            f" seq_len) = {expect} for {len(labels)} labels")
        if not (np.issubdtype(codes.dtype, np.integer) and np.issubdtype(labels.dtype, np.integer)):
            raise DataError(f"code shards: codes and labels must be integers, got {codes.dtype} "
                            f"and {labels.dtype}")
        if codes.size and (codes.min() < 0 or (self.vocab_size is not None
                                               and codes.max() >= self.vocab_size)):
            raise DataError(f"code shards: codes outside [0, {self.vocab_size}) "
                            f"(min {codes.min()}, max {codes.max()})")
        if labels.size and labels.min() < 0:
            raise DataError(f"code shards: negative label {labels.min()}")
        self._codes.append(codes.astype(self.dtype))
        self._labels.append(labels.astype(np.int32))
        self._buffered += len(labels)
        while self._buffered >= self.shard_size:
            self._flush(self.shard_size)

    def _flush(self, n: int) -> None:
        codes = np.concatenate(self._codes)
        labels = np.concatenate(self._labels)
        stem = f"w{self.writer_index:05d}-s{len(self._shards):05d}"
        shard = {"codes": f"codes-{stem}.npy", "labels": f"labels-{stem}.npy", "num_examples": n}
        io.write_file(os.path.join(self.out_dir, shard["codes"]), lambda f: np.save(f, codes[:n]))
        io.write_file(os.path.join(self.out_dir, shard["labels"]), lambda f: np.save(f, labels[:n]))
        self._shards.append(shard)
        self._codes, self._labels = [codes[n:]], [labels[n:]]
        self._buffered -= n

    def close(self) -> str:
        """Writes the last shard and this writer's part file; returns the part file's path."""
        if not self._closed:
            if self._buffered:
                self._flush(self._buffered)
            part = {"num_crops": self.num_crops, "seq_len": self.seq_len,
                    "dtype": self.dtype.name, "shards": self._shards}
            io.write_json(self._part_path(), part)
            self._closed = True
        return self._part_path()

    def _part_path(self) -> str:
        return os.path.join(self.out_dir, f"part-w{self.writer_index:05d}.json")

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if exc[0] is None:
            self.close()


def finalize_code_shards(out_dir: str, *, num_classes: int | None = None,
                         meta: Mapping[str, Any] | None = None) -> dict:
    """Joins the writers' part files (in writer order) into ``index.json``; returns the index.

    ``num_classes`` defaults to the largest label + 1; ``meta`` is free JSON-able information
    (tokenizer checkpoint, image size, crop ratio, source dataset).
    """
    parts = sorted(glob.glob(os.path.join(out_dir, "part-w*.json")))
    if not parts:
        raise DataError(f"code shards: no writer part files (part-w*.json) in {out_dir!r}")
    shards, specs = [], set()
    for path in parts:
        with open(path) as f:
            part = json.load(f)
        specs.add((part["num_crops"], part["seq_len"], part["dtype"]))
        shards += part["shards"]
    if len(specs) != 1:
        raise DataError(f"code shards: writers in {out_dir!r} disagree on (num_crops, seq_len, "
                        f"dtype): {sorted(specs)}")
    num_crops, seq_len, dtype = specs.pop()
    max_label = -1
    for shard in shards:
        labels = np.load(os.path.join(out_dir, shard["labels"]), mmap_mode="r")
        if len(labels):
            max_label = max(max_label, int(labels.max()))
    if num_classes is not None and max_label >= num_classes:
        raise DataError(f"code shards: label {max_label} >= num_classes {num_classes}")
    index = {"format": FORMAT, "version": VERSION,
             "num_examples": int(sum(s["num_examples"] for s in shards)),
             "num_crops": num_crops, "seq_len": seq_len,
             "num_classes": int(num_classes if num_classes is not None else max_label + 1),
             "dtype": dtype, "shards": shards, "meta": dict(meta or {})}
    io.write_json(os.path.join(out_dir, INDEX), index)
    for path in parts:
        os.remove(path)
    return index


def write_code_shards(out_dir: str, codes, labels, *, vocab_size: int | None = None,
                      shard_size: int = 16384, num_classes: int | None = None,
                      meta: Mapping[str, Any] | None = None) -> dict:
    """One-process convenience: codes (N, num_crops, T), labels (N,) -> a complete code dir."""
    codes = np.asarray(codes)
    if codes.ndim != 3:
        raise DataError(f"code shards: codes must be (N, num_crops, T), got shape {codes.shape}")
    with CodeShardWriter(out_dir, num_crops=codes.shape[1], seq_len=codes.shape[2],
                         vocab_size=vocab_size, shard_size=shard_size) as writer:
        writer.add(codes, labels)
    return finalize_code_shards(out_dir, num_classes=num_classes, meta=meta)


class CodeShards:
    """Random-access source over a code directory: ``ds[i] == {"codes": (num_crops, T) int32,
    "label": int}``. Shards are memory-mapped on first use (per process)."""

    def __init__(self, path: str):
        path = os.fspath(path)
        if not os.path.isdir(path):
            raise DataError(f"code directory {path!r} does not exist")
        index_path = os.path.join(path, INDEX)
        if not os.path.exists(index_path):
            raise DataError(f"code directory {path!r} has no {INDEX} (not extracted, or the "
                            "extraction did not finish)")
        with open(index_path) as f:
            index = json.load(f)
        if index.get("format") != FORMAT or index.get("version") != VERSION:
            raise DataError(f"{index_path!r} is not a {FORMAT} v{VERSION} index")
        missing = [s[k] for s in index["shards"] for k in ("codes", "labels")
                   if not os.path.exists(os.path.join(path, s[k]))]
        if missing:
            raise DataError(f"code directory {path!r}: missing shard files {missing[:5]}")
        self.path = path
        self.index = index
        self.num_crops = int(index["num_crops"])
        self.seq_len = int(index["seq_len"])
        self.num_classes = int(index["num_classes"])
        self.meta = index.get("meta", {})
        self._ends = np.cumsum([s["num_examples"] for s in index["shards"]])
        self._arrays: list | None = None

    def _open(self) -> list:
        if self._arrays is None:
            self._arrays = [
                (np.load(os.path.join(self.path, s["codes"]), mmap_mode="r"),
                 np.load(os.path.join(self.path, s["labels"])))
                for s in self.index["shards"]]
        return self._arrays

    def __getstate__(self):  # picklable for worker processes: re-open the maps there
        state = dict(self.__dict__)
        state["_arrays"] = None
        return state

    def __len__(self) -> int:
        return int(self._ends[-1]) if len(self._ends) else 0

    def __getitem__(self, index: int) -> dict:
        index = int(index)
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} examples")
        shard = int(np.searchsorted(self._ends, index, side="right"))
        local = index - (int(self._ends[shard - 1]) if shard else 0)
        codes, labels = self._open()[shard]
        return {"codes": np.asarray(codes[local], dtype=np.int32), "label": int(labels[local])}

    def __repr__(self) -> str:
        return (f"CodeShards({self.path!r}, {len(self)} examples, num_crops={self.num_crops}, "
                f"seq_len={self.seq_len})")
