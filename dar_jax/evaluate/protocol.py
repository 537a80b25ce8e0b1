"""Sample side of the evaluation protocol: labels, resumable npz shards, the ADM ``arr_0`` file.

    labels = sample_labels(50_000, 1000, "random", seed=0)         # D-AR: uniform random labels
    plan = prepare_shards("out/samples", labels, shard_size=1000, settings={...})
    generate_samples(plan, generate_fn)     # generate_fn(labels (n,), indices (n,)) -> uint8 (n, H, W, 3)
    assemble_npz(plan, "out/samples.npz")   # arr_0 (N, H, W, 3) uint8, arr_1 labels: the ADM input
    stats, logits = sample_features(plan, extract)

Shards are written atomically (temporary file, then rename), so a shard file that exists is
complete; an interrupted run restarted with the same plan regenerates only the missing shards.
Shards found on disk are verified (every member's CRC, indices, image shape) before they are
reused: a damaged one is named, moved aside to ``shard_NNNNN.npz.corrupt`` and regenerated.
``generate_fn`` should derive its randomness from the sample indices (e.g.
``jax.random.fold_in(key, index)``) so that a sample does not depend on how the run was split
or resumed. With several processes, shard ``i`` belongs to process ``i % process_count``.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import zipfile
from typing import Callable, Iterator

import jax
import numpy as np

from dar_jax import io
from dar_jax.errors import DarError
from dar_jax.evaluate import metrics
from dar_jax.pipeline import to_uint8  # noqa: F401  (re-exported: the protocol's conversion)

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
LABELS = "labels.npy"
LABEL_MODES = ("random", "balanced")


class ShardError(DarError, ValueError):
    """A shard directory or generated batch that does not fit the plan."""


def sample_labels(num_samples: int, num_classes: int, mode: str = "random", seed: int = 0) -> np.ndarray:
    """(num_samples,) int32 class labels.

    ``random``: i.i.d. uniform over the classes (D-AR's sampling script), from
    ``jax.random.key(seed)``. ``balanced``: every class equally often, interleaved
    (label = index % num_classes), so that every IS split of a multiple of ``num_classes``
    samples is balanced too; ``num_samples`` must be a multiple of ``num_classes``.
    """
    if num_samples < 1 or num_classes < 1:
        raise ShardError(f"need positive num_samples and num_classes, got {num_samples}, {num_classes}")
    if mode == "random":
        return np.asarray(jax.random.randint(jax.random.key(seed), (num_samples,), 0, num_classes), np.int32)
    if mode == "balanced":
        if num_samples % num_classes:
            raise ShardError(f"balanced labels need num_samples ({num_samples}) to be a multiple of "
                             f"num_classes ({num_classes})")
        return (np.arange(num_samples) % num_classes).astype(np.int32)
    raise ShardError(f"label mode {mode!r} not in {list(LABEL_MODES)}")


@dataclasses.dataclass(frozen=True)
class ShardPlan:
    """Where the samples go and which labels they have: shard i holds indices [i*S, (i+1)*S)."""
    directory: str
    labels: np.ndarray
    shard_size: int
    settings: dict

    @property
    def num_samples(self) -> int:
        return int(len(self.labels))

    @property
    def num_shards(self) -> int:
        return -(-self.num_samples // self.shard_size)

    def indices(self, shard: int) -> np.ndarray:
        return np.arange(shard * self.shard_size, min((shard + 1) * self.shard_size, self.num_samples))

    def path(self, shard: int) -> str:
        return os.path.join(self.directory, f"shard_{shard:05d}.npz")


def _shard_files(directory: str) -> list[str]:
    try:
        return sorted(f for f in os.listdir(directory) if f.startswith("shard_") and f.endswith(".npz"))
    except FileNotFoundError:
        return []


def prepare_shards(directory: str | os.PathLike, labels: np.ndarray, shard_size: int,
                   settings: dict | None = None) -> ShardPlan:
    """Creates (or reopens for resuming) a shard directory for ``labels``.

    The labels, the shard size and ``settings`` (JSON: everything that changes the samples,
    e.g. checkpoint, CFG, seed) are recorded; reopening a directory made with other values
    raises :class:`ShardError` naming them, instead of mixing samples of two runs.
    """
    directory = os.fspath(directory)
    labels = np.asarray(labels)
    if labels.ndim != 1 or len(labels) == 0 or not np.issubdtype(labels.dtype, np.integer):
        raise ShardError(f"labels must be a non-empty 1-D integer array, got {labels.dtype} {labels.shape}")
    if shard_size < 1:
        raise ShardError(f"shard_size must be positive, got {shard_size}")
    labels = labels.astype(np.int32)
    manifest = {"num_samples": int(len(labels)), "shard_size": int(shard_size),
                "settings": json.loads(json.dumps(settings or {}, sort_keys=True))}
    from dar_jax import io
    try:
        io.makedirs(directory, "shard folder")
    except io.PathError as e:
        raise ShardError(str(e)) from None
    mpath, lpath = os.path.join(directory, MANIFEST), os.path.join(directory, LABELS)
    # a plan without a single shard on disk holds nothing to mix up: it may be replaced
    have_samples = bool(_shard_files(directory))
    if have_samples and not os.path.exists(mpath):
        raise ShardError(f"{directory} holds shards but no {MANIFEST}, so they cannot be matched to "
                         "this run; use a new directory")
    if have_samples:
        try:
            with open(mpath) as f:
                old = json.load(f)
            if not isinstance(old, dict):
                raise ValueError("not a JSON object")
        except (OSError, ValueError) as e:
            raise ShardError(f"{mpath} is unreadable ({e}), so the samples beside it cannot be "
                             "matched to this run; use a new directory") from None
        diffs = [k for k in ("num_samples", "shard_size") if old.get(k) != manifest[k]]
        old_s, new_s = old.get("settings", {}), manifest["settings"]
        old_s = old_s if isinstance(old_s, dict) else {}
        diffs += [f"settings.{k}" for k in sorted(set(old_s) | set(new_s)) if old_s.get(k) != new_s.get(k)]
        if not diffs:
            try:
                same = np.array_equal(np.load(lpath, allow_pickle=False), labels)
            except (OSError, ValueError):
                same = False
            if not same:
                diffs.append("labels")
        if diffs:
            why = ""
            if any(d.endswith("_fingerprint") for d in diffs):
                why = ": the parameters of a model at the same path changed since these samples were made"
            raise ShardError(f"{directory} holds samples of another run (differs in {', '.join(diffs)}"
                             f"{why}); use a new directory or the same settings")
    else:
        io.write_file(lpath, lambda f: np.save(f, labels))
        io.write_json(mpath, manifest, sort_keys=True)
    return ShardPlan(directory, labels, int(shard_size), manifest["settings"])


def _shard_ok(plan: ShardPlan, shard: int, verify: bool = False) -> bool:
    """The shard file is complete and matches the plan; ``verify`` also checks every member's
    CRC (reading the whole file)."""
    path = plan.path(shard)
    if not os.path.exists(path):
        return False
    try:
        if verify:
            with zipfile.ZipFile(path) as zf:
                if zf.testzip() is not None:
                    return False
        with np.load(path, allow_pickle=False) as z:
            if not np.array_equal(z["indices"], plan.indices(shard)):
                return False
        shape, dtype = metrics.npz_member_header(path, "images")
    except Exception:  # any damage (zip, CRC, header, pickled members): not a usable shard
        return False
    return len(shape) == 4 and shape[0] == len(plan.indices(shard)) and dtype == np.uint8


def finished_shards(plan: ShardPlan) -> list[int]:
    """Indices of the shards whose files are complete and match the plan."""
    return [i for i in range(plan.num_shards) if _shard_ok(plan, i)]


def _check_batch(images, n: int, shard: int) -> np.ndarray:
    images = np.asarray(images)
    if images.dtype != np.uint8:
        raise ShardError(f"generate_fn returned {images.dtype} images for shard {shard}: return uint8 "
                         "(dar_jax.evaluate.protocol.to_uint8 converts [-1, 1] floats)")
    if images.ndim != 4 or images.shape[0] != n or images.shape[-1] != 3:
        raise ShardError(f"generate_fn returned shape {images.shape} for shard {shard}; expected ({n}, H, W, 3)")
    return images


def generate_samples(plan: ShardPlan, generate_fn: Callable[[np.ndarray, np.ndarray], np.ndarray], *,
                     process_index: int | None = None, process_count: int | None = None,
                     on_shard: Callable[[int, int], None] | None = None) -> dict:
    """Generates this process's missing shards; returns {"generated": [...], "skipped": [...]}.

    ``generate_fn(labels (n,), indices (n,)) -> uint8 (n, H, W, 3)``. ``on_shard(done, total)``
    is called after each shard (progress). Shards already on disk are not regenerated.
    """
    pi = jax.process_index() if process_index is None else process_index
    pc = jax.process_count() if process_count is None else process_count
    mine = [i for i in range(plan.num_shards) if i % pc == pi]
    done, corrupt = set(), []
    for i in mine:
        if _shard_ok(plan, i, verify=True):
            done.add(i)
        elif os.path.lexists(plan.path(i)):  # damaged: named, kept aside, regenerated
            moved = io.move_aside(plan.path(i), "corrupt")
            log.warning("shard %d (%s) is damaged: moved it aside to %s and regenerating it",
                        i, plan.path(i), moved)
            corrupt.append(i)
    report = {"generated": [], "skipped": [i for i in mine if i in done]}
    if corrupt:
        report["corrupt"] = corrupt
    for i in mine:
        if i in done:
            continue
        idx = plan.indices(i)
        labels = plan.labels[idx]
        images = _check_batch(generate_fn(labels, idx), len(idx), i)
        io.write_file(plan.path(i), lambda f: np.savez(f, images=images, labels=labels, indices=idx))
        report["generated"].append(i)
        if on_shard is not None:
            on_shard(len(report["generated"]) + len(report["skipped"]), len(mine))
    return report


def iter_shards(plan: ShardPlan) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """(indices, labels, images) of every shard in order; a missing shard raises ShardError."""
    missing = sorted(set(range(plan.num_shards)) - set(finished_shards(plan)))
    if missing:
        raise ShardError(f"{plan.directory}: {len(missing)} of {plan.num_shards} shards are missing "
                         f"(first: {missing[:5]}); run the generation again to complete them")
    for i in range(plan.num_shards):
        path = plan.path(i)
        try:
            with np.load(path, allow_pickle=False) as z:
                item = z["indices"], z["labels"], z["images"]
        except Exception as e:  # damaged after it was verified: never read garbage
            moved = io.move_aside(path, "corrupt")
            raise ShardError(f"shard {i} ({path}) is damaged ({type(e).__name__}: {e}); moved it aside "
                             f"to {moved}: run the same command again to regenerate it") from None
        yield item


def assemble_npz(plan: ShardPlan, path: str | os.PathLike, labels_key: str | None = "arr_1") -> str:
    """Writes the ADM evaluator's input: ``arr_0`` (N, H, W, 3) uint8 (and labels), streaming.

    The images are copied shard by shard into an uncompressed npz (as ``np.savez`` writes it),
    so memory stays at one shard.
    """
    path = os.fspath(path)
    first = next(iter_shards(plan))[2]
    shape = (plan.num_samples,) + first.shape[1:]

    def write(f):
        with zipfile.ZipFile(f, "w", zipfile.ZIP_STORED, allowZip64=True) as zf:
            with zf.open("arr_0.npy", "w", force_zip64=True) as member:
                np.lib.format.write_array_header_2_0(
                    member, {"descr": np.lib.format.dtype_to_descr(np.dtype(np.uint8)),
                             "fortran_order": False, "shape": shape})
                for i, (_, _, images) in enumerate(iter_shards(plan)):
                    if images.shape[1:] != shape[1:]:
                        raise ShardError(f"shard {i} has images of shape {images.shape[1:]}, shard 0 {shape[1:]}")
                    member.write(np.ascontiguousarray(images).tobytes())
            if labels_key:
                with zf.open(f"{labels_key}.npy", "w") as member:
                    np.lib.format.write_array(member, plan.labels)

    io.write_file(path, write)
    return path


def sample_features(plan: ShardPlan, extract: Callable, keep_activations: bool = True
                    ) -> tuple[metrics.ReferenceStats, np.ndarray]:
    """(statistics of the samples' pool3 features, logits (N, 1008)), shard by shard.

    ``extract``: images -> Features (``inception.feature_extractor``). The mean and covariance
    are accumulated in float64; pool3 features are kept as ``activations`` for precision/recall.
    """
    stats = metrics.RunningStats()
    pools, logits = [], []
    for _, _, images in iter_shards(plan):
        feats = extract(images)
        stats.update(feats.pool3)
        logits.append(feats.logits)
        if keep_activations:
            pools.append(feats.pool3)
    acts = np.concatenate(pools) if keep_activations else None
    meta = {"source": plan.directory, "settings": plan.settings}
    return stats.reference(acts, meta), np.concatenate(logits)
