"""grain input pipeline: deterministic, shuffled per epoch, sharded per process, resumable.

Every batch is a pure function of (seed, step):

- epoch ``e`` visits the source in the order of grain's per-epoch shuffle (``MapDataset.range(N)
  .shuffle(seed).repeat()``, reseeded each epoch), ``steps_per_epoch = N // G`` global batches of
  G examples (the rest of the epoch is dropped, as the reference's ``drop_last=True``);
- global batch ``s`` is positions ``[s' * G, (s' + 1) * G)`` of epoch ``s // steps_per_epoch``
  (``s' = s % steps_per_epoch``); process ``p`` of ``P`` gets the contiguous rows
  ``[p * G / P, (p + 1) * G / P)``, so the processes' batches stacked in process order are exactly
  the global batch of a one-process run, whatever P is;
- each example's augmentation draws from ``np.random.default_rng([seed, epoch, index])``.

Hence the iterator state is just the number of batches consumed (plus a fingerprint that
refuses a state from a different pipeline): it is the same on every process, JSON-able, and
restores exactly onto any process count. The batches come from grain (``MapDataset`` ->
``batch`` -> ``to_iter_dataset`` with reader threads, and optionally ``mp_prefetch`` worker
processes); resuming slices the batch dataset at the saved step.

Evaluation pipelines (``drop_remainder=False``, ``shuffle=False``) cover every example once per
epoch in order; the last batch is padded (with example ``k % N``) and carries ``mask`` (False on
padding).
"""
from __future__ import annotations

import math
import sys
from typing import Any, Callable, Mapping

import grain
import numpy as np

from dar_jax.data.augment import to_float
from dar_jax.data.sources import DataError

Transform = Callable[[dict, np.random.Generator], dict]


class _Locate:
    """Local position j of process p -> (epoch, source index, valid)."""

    def __init__(self, order, num_examples, global_batch, local_batch, steps_per_epoch,
                 process_index):
        self.order, self.n = order, num_examples
        self.g, self.l, self.spe, self.p = global_batch, local_batch, steps_per_epoch, process_index

    def __call__(self, j: int) -> tuple[int, int, bool]:
        step, row = divmod(int(j), self.l)
        epoch, step_in_epoch = divmod(step, self.spe)
        k = step_in_epoch * self.g + self.p * self.l + row
        valid = k < self.n
        index = int(self.order[epoch * self.n + (k if valid else k % self.n)])
        return epoch, index, valid


class _Load:
    """(epoch, index, valid) -> transform(source[index], rng(seed, epoch, index))."""

    def __init__(self, source, transform: Transform, seed: int, with_mask: bool):
        self.source, self.transform, self.seed, self.with_mask = source, transform, seed, with_mask

    def __call__(self, located) -> dict:
        epoch, index, valid = located
        rng = np.random.default_rng([self.seed, epoch, index])
        out = dict(self.transform(self.source[index], rng))
        if self.with_mask:
            out["mask"] = np.bool_(valid)
        return out


def collate(examples) -> dict[str, np.ndarray]:
    """Stacks examples; uint8 ``image`` -> float32 in [-1, 1]; ``label``/``tokens`` -> int32."""
    out = {}
    for key in examples[0]:
        x = np.stack([np.asarray(e[key]) for e in examples])
        if key == "image":
            x = to_float(x)
        elif key in ("label", "tokens", "codes"):
            x = x.astype(np.int32)
        out[key] = x
    return out


class Pipeline:
    """A source, a per-example transform and the batching plan of one process.

    Args:
      source: random-access source (``len``, ``[i] -> dict``).
      transform: ``(record, rng) -> dict`` of per-example arrays (e.g. uint8 image, label).
      global_batch_size: G, examples per step over all processes.
      seed: shuffle and augmentation seed, in [0, 2**32).
      process_index, process_count: this process and the number of processes (P must divide G).
      shuffle: per-epoch shuffle (False: source order).
      drop_remainder: drop each epoch's last partial global batch (False: pad it, add ``mask``).
      num_epochs: None = repeat forever.
      num_threads, prefetch: grain reader threads and prefetched batches.
      num_workers: grain worker processes (``mp_prefetch``); 0 = none.
      fingerprint: extra JSON-able facts checked when a state is restored.
      num_classes: number of classes of the labels (information for the caller).
      example_spec: {key: (shape, dtype)} of one collated example (for :meth:`batch_spec`).
    """

    def __init__(self, source, transform: Transform, *, global_batch_size: int, seed: int,
                 process_index: int, process_count: int, shuffle: bool = True,
                 drop_remainder: bool = True, num_epochs: int | None = None,
                 num_threads: int = 8, prefetch: int = 16, num_workers: int = 0,
                 fingerprint: Mapping[str, Any] | None = None, num_classes: int | None = None,
                 example_spec: Mapping[str, tuple[tuple[int, ...], Any]] | None = None):
        n = len(source)
        if n == 0:
            raise DataError(f"dataset {source!r} is empty")
        if global_batch_size < 1 or process_count < 1:
            raise DataError(f"global_batch_size ({global_batch_size}) and process_count "
                            f"({process_count}) must be >= 1")
        if global_batch_size % process_count:
            raise DataError(f"global batch size {global_batch_size} is not divisible by the "
                            f"number of processes {process_count}")
        if not 0 <= process_index < process_count:
            raise DataError(f"process_index {process_index} not in [0, {process_count})")
        if not 0 <= seed < 2 ** 32:
            raise DataError(f"data seed must be in [0, 2**32), got {seed}")
        if num_epochs is not None and num_epochs < 1:
            raise DataError(f"num_epochs must be >= 1 or None, got {num_epochs}")
        steps_per_epoch = n // global_batch_size if drop_remainder else -(-n // global_batch_size)
        if steps_per_epoch == 0:
            raise DataError(f"dataset {source!r} has {n} examples, fewer than one global batch "
                            f"of {global_batch_size}")
        self.source = source
        self.num_examples = n
        self.global_batch_size = global_batch_size
        self.local_batch_size = global_batch_size // process_count
        self.process_index, self.process_count = process_index, process_count
        self.seed, self.shuffle, self.drop_remainder = seed, shuffle, drop_remainder
        self.steps_per_epoch = steps_per_epoch
        self.num_epochs = num_epochs
        self.num_classes = num_classes
        self.example_spec = dict(example_spec or {})
        if not drop_remainder:
            self.example_spec.setdefault("mask", ((), np.bool_))
        self.num_steps = steps_per_epoch * num_epochs if num_epochs else None
        self.num_threads, self.prefetch, self.num_workers = num_threads, prefetch, num_workers
        self.fingerprint = {
            "num_examples": n, "global_batch_size": global_batch_size, "seed": seed,
            "shuffle": shuffle, "drop_remainder": drop_remainder, **dict(fingerprint or {})}

        order = grain.MapDataset.range(n)
        if shuffle:
            order = order.shuffle(seed=seed)
        order = order.repeat(None)  # epoch e: order[e * n + k], reshuffled each epoch
        num_steps = self.num_steps if self.num_steps is not None else sys.maxsize // (
            4 * global_batch_size)
        locate = _Locate(order, n, global_batch_size, self.local_batch_size, steps_per_epoch,
                         process_index)
        elements = (grain.MapDataset.range(num_steps * self.local_batch_size)
                    .map(locate)
                    .map(_Load(source, transform, seed, with_mask=not drop_remainder)))
        self.batches = elements.batch(self.local_batch_size, drop_remainder=True,
                                      batch_fn=collate)

    def batch_spec(self, global_batch: bool = False) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
        """{key: (shape, dtype)} of this process's batches (or of the global batch)."""
        b = self.global_batch_size if global_batch else self.local_batch_size
        return {k: ((b, *shape), np.dtype(dtype)) for k, (shape, dtype) in self.example_spec.items()}

    def iterator(self, state: Mapping[str, Any] | None = None) -> "DataIterator":
        """A new iterator from the start, or from ``state`` (from :meth:`DataIterator.get_state`)."""
        it = DataIterator(self)
        if state is not None:
            it.set_state(state)
        return it

    def __iter__(self):
        return self.iterator()

    def _grain_iter(self, step: int):
        ds = self.batches[step:].to_iter_dataset(
            grain.ReadOptions(num_threads=self.num_threads, prefetch_buffer_size=self.prefetch))
        if self.num_workers > 0:
            from absl import flags  # grain's worker processes read absl flags (defaults here)
            if not flags.FLAGS.is_parsed():
                flags.FLAGS.mark_as_parsed()
            ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=self.num_workers))
        return iter(ds)


class DataIterator:
    """Iterator of local batches (dicts of NumPy arrays) with an exact, JSON-able state.

    ``get_state() -> {"step": s, "fingerprint": {...}}``: the same on every process; restoring
    it (on any process count) yields exactly the batches an uninterrupted run would have.
    """

    def __init__(self, pipeline: Pipeline):
        self.pipeline = pipeline
        self.step = 0
        self._it = None

    @property
    def epoch(self) -> int:
        """Epoch of the next batch."""
        return self.step // self.pipeline.steps_per_epoch

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        if self.pipeline.num_steps is not None and self.step >= self.pipeline.num_steps:
            raise StopIteration
        if self._it is None:
            self._it = self.pipeline._grain_iter(self.step)
        batch = next(self._it)
        if self.pipeline.num_workers > 0:  # out of grain's shared memory, which may be reused
            batch = {k: np.array(v) for k, v in batch.items()}
        self.step += 1
        return batch

    def get_state(self) -> dict[str, Any]:
        return {"step": self.step, "fingerprint": dict(self.pipeline.fingerprint)}

    def set_state(self, state: Mapping[str, Any]) -> None:
        if "step" not in state:
            raise DataError(f"not a data iterator state (no 'step'): {dict(state)!r}")
        saved = dict(state.get("fingerprint", {}))
        ours = self.pipeline.fingerprint
        diff = {k: (saved.get(k), ours.get(k)) for k in set(saved) | set(ours)
                if saved.get(k) != ours.get(k)}
        if diff:
            raise DataError("data iterator state is from a different input pipeline: "
                            + ", ".join(f"{k}: saved {a!r}, now {b!r}"
                                        for k, (a, b) in sorted(diff.items())))
        step = int(state["step"])
        if step < 0:
            raise DataError(f"data iterator state has a negative step {step}")
        self.close()
        self.step = step

    def close(self) -> None:
        """Stops reader threads / worker processes (a later ``next`` restarts them)."""
        if self._it is not None:
            close = getattr(self._it, "close", None)
            if close is not None:
                close()
            self._it = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def steps_for_epochs(pipeline: Pipeline, epochs: float) -> int:
    """Number of steps in ``epochs`` epochs (rounded down)."""
    return int(math.floor(epochs * pipeline.steps_per_epoch))
