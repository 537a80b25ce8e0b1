"""Class labels -> tokens -> images: what sample.py and notebooks call (no globals).

    models = pipeline.load_models("ckpt/gpt", "ckpt/tokenizer")
    keys = pipeline.sample_keys(seed=0, num=4)
    result = pipeline.sample(models, labels=[1, 2, 3, 4], keys=keys,
                             options=pipeline.SampleOptions(cfg_scale="1.2,8.0"))
    for event in pipeline.stream(models, labels, keys, options):   # preview after each group
        show(event.images)

Every sample has its own PRNG key (``sample_keys``: fold_in(seed key, sample index)); its tokens
come from ``fold_in(key, 0)`` and its decoder noise from ``fold_in(key, 1)``, so a sample does
not depend on its batch, its device or the number of hosts. The non-streaming pipeline runs the
very same compiled pieces, in the same order, as the streaming one, so their final images are
equal.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Iterator, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from dar_jax.errors import DarError
from dar_jax import ar, solvers
from dar_jax import tokenizer as tok
from dar_jax.family import Family


class PipelineError(DarError, ValueError):
    """Models or options that do not fit together (one line, for the CLI)."""


@dataclasses.dataclass(frozen=True)
class Models:
    gpt_cfg: ar.GPTConfig
    gpt_params: object
    tok_cfg: tok.TokenizerConfig
    tok_params: object

    @property
    def num_classes(self) -> int:
        return self.gpt_cfg.num_classes


def _is_int(x) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, (bool, np.bool_))


def _is_number(x) -> bool:
    return isinstance(x, (int, float, np.integer, np.floating)) and not isinstance(x, (bool, np.bool_))


@dataclasses.dataclass(frozen=True)
class SampleOptions:
    """Sampling options, checked when made (a bad value raises naming it, never samples garbage)."""
    cfg_scale: float | str = 4.0       # number or "a,b" (linear over tokens)
    cfg_interval: int = -1
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    solver: str = "adams2"             # euler | adams2 | heun | dpmpp_2m
    num_steps: int | None = None       # decoder steps (default: the tokenizer's)
    dtype: str | None = None           # compute dtype override (float32 | bfloat16)
    size: int | None = None            # decode resolution (default: sampling_resolution)

    def __post_init__(self):
        ar.parse_cfg_scale(self.cfg_scale)
        bad = []
        if not _is_int(self.cfg_interval) or self.cfg_interval < -1:
            bad.append(f"cfg_interval={self.cfg_interval!r} (an integer >= -1)")
        if not _is_number(self.temperature) or not 0 <= self.temperature < np.inf:
            bad.append(f"temperature={self.temperature!r} (a finite number >= 0)")
        if not _is_int(self.top_k) or self.top_k < 0:
            bad.append(f"top_k={self.top_k!r} (an integer >= 0)")
        if not _is_number(self.top_p) or not 0 < self.top_p <= 1:
            bad.append(f"top_p={self.top_p!r} (in (0, 1])")
        if self.num_steps is not None and (not _is_int(self.num_steps) or self.num_steps < 1):
            bad.append(f"num_steps={self.num_steps!r} (an integer >= 1, or None for the tokenizer's)")
        if self.dtype not in (None, "float32", "bfloat16"):
            bad.append(f"dtype={self.dtype!r} (float32, bfloat16 or None)")
        if self.size is not None and (not _is_int(self.size) or self.size < 1):
            bad.append(f"size={self.size!r} (a positive integer, or None for the tokenizer's)")
        if bad:
            raise PipelineError("bad sampling options: " + "; ".join(bad))
        solvers.canonical(self.solver)

    def check_for(self, tok_cfg: tok.TokenizerConfig) -> None:
        """Options that depend on the tokenizer (the decode size)."""
        if self.size is not None:
            tok.check_size(tok_cfg, self.size)


def check_compatible(gpt_cfg: ar.GPTConfig, tok_cfg: tok.TokenizerConfig) -> None:
    if gpt_cfg.vocab_size != tok_cfg.vq_codebook_size:
        raise PipelineError(f"the GPT's vocabulary ({gpt_cfg.vocab_size}) does not match the "
                            f"tokenizer's codebook ({tok_cfg.vq_codebook_size})")
    if gpt_cfg.block_size != tok_cfg.num_all_queries:
        raise PipelineError(f"the GPT's block size ({gpt_cfg.block_size}) does not match the "
                            f"tokenizer's number of tokens ({tok_cfg.num_all_queries})")


def make_models(gpt_cfg, gpt_params, tok_cfg, tok_params) -> Models:
    check_compatible(gpt_cfg, tok_cfg)
    return Models(gpt_cfg, gpt_params, tok_cfg, tok_params)


def _is_torch_file(path) -> bool:
    return str(path).endswith((".pt", ".pth"))


# every model family a model folder can hold (for loading a folder of either kind)
FAMILIES: tuple[Family, ...] = (ar.FAMILY, tok.FAMILY)


def model_config(path: str, family: Family):
    """The config of a model folder of ``family`` (``ar.FAMILY``, ``tokenizer.FAMILY``) without
    reading its parameters; None for a ``.pt``, whose config is only known once the file is read."""
    from dar_jax.checkpoint import store
    return None if _is_torch_file(path) else store.read_config(path, family)[1]


def load_tokenizer(path: str):
    """(cfg, params) of a tokenizer model folder or a reference ``.pt`` (converted on the fly)."""
    from dar_jax.checkpoint import load_model
    if _is_torch_file(path):
        return tok.load_reference_tokenizer(path, keep_repa=False)
    _, cfg, params = load_model(path, tok.FAMILY)
    return cfg, params


def load_gpt(path: str, *, default_block_size: int = 256, **size):
    """(cfg, params) of a GPT model folder or a reference ``.pt`` (converted on the fly).

    ``size``: the GPT size flags (``gpt_model``, ``dim``, ``n_layer``, ``n_head``, ``block_size``,
    ``num_classes``, ``vocab_size``), all optional: a .pt's config is inferred from its shapes
    (``n_head`` = dim / 64 and ``default_block_size`` unless given); for a folder they must agree
    with its config."""
    from dar_jax.ar import reference
    from dar_jax.checkpoint import load_model, load_torch_file
    from dar_jax.checkpoint.torch_pickle import find_state_dict
    unknown = sorted(set(size) - set(reference.GPT_SIZE_FLAGS))
    if unknown:
        raise PipelineError(f"unknown GPT size option(s) {unknown}; known: {list(reference.GPT_SIZE_FLAGS)}")
    if _is_torch_file(path):
        sd = find_state_dict(load_torch_file(path), reference.GPT_STATE_KEYS, path)
        cfg = reference.gpt_config_from_state_dict(sd, default_block_size=default_block_size,
                                                   where=f"GPT checkpoint {path}", **size)
        return cfg, reference.gpt_params_from_state_dict(sd, cfg, where=f"GPT checkpoint {path}")
    reference.check_size_flags(model_config(path, ar.FAMILY), f"the GPT model folder {path}", **size)
    _, cfg, params = load_model(path, ar.FAMILY)
    return cfg, params


def load_models(gpt: str, tokenizer: str, **size) -> Models:
    """Loads both models from dar-jax model directories (trainer exports or converted files) or
    from the reference's ``.pt`` files, converted on the fly. ``size``: see :func:`load_gpt` (a
    GPT .pt's block size defaults to the tokenizer's token count)."""
    tok_cfg, tok_params = load_tokenizer(tokenizer)
    gpt_cfg, gpt_params = load_gpt(gpt, default_block_size=tok_cfg.num_all_queries, **size)
    return make_models(gpt_cfg, gpt_params, tok_cfg, tok_params)


def with_dtype(models: Models, dtype: str | None) -> Models:
    if dtype is None:
        return models
    return dataclasses.replace(models, gpt_cfg=dataclasses.replace(models.gpt_cfg, dtype=dtype),
                               tok_cfg=dataclasses.replace(models.tok_cfg, dtype=dtype))


# ----------------------------------------------------------------------------------------------
# keys and conversions
# ----------------------------------------------------------------------------------------------
def sample_keys(seed: int | jax.Array = 0, num: int = 1, start: int = 0) -> jax.Array:
    """Per-sample keys for sample indices start .. start+num-1 (independent of batching)."""
    key = jax.random.key(seed) if isinstance(seed, int) else seed
    return ar.sample_keys(key, num, start)


def token_keys(keys: jax.Array) -> jax.Array:
    return jax.vmap(lambda k: jax.random.fold_in(k, 0))(keys)


def decode_noise(keys: jax.Array, height: int, width: int) -> jax.Array:
    """The decoder noise x0 (B, height, width, 3) of per-sample keys (B,): normal draws from
    ``fold_in(key, 1)`` (the AR model's token draws use the keys themselves)."""
    return jax.vmap(lambda k: jax.random.normal(jax.random.fold_in(k, 1), (height, width, 3),
                                                jnp.float32))(keys)


def noise_for(models: Models, keys: jax.Array, size: int | None = None) -> jax.Array:
    """Decoder noise x0 (B, H, W, 3) at the decode resolution (:func:`decode_noise`)."""
    return decode_noise(keys, *tok.resolution(models.tok_cfg, size))


def to_uint8(x):
    """[-1, 1] images -> uint8 as D-AR saves samples: ``clamp(127.5 x + 128, 0, 255)``, truncated.

    Works on NumPy and JAX arrays (returns the same kind).
    """
    if isinstance(x, jax.Array):
        return jnp.clip(127.5 * x.astype(jnp.float32) + 128.0, 0.0, 255.0).astype(jnp.uint8)
    return np.clip(127.5 * np.asarray(x, np.float32) + 128.0, 0.0, 255.0).astype(np.uint8)


def keys_for(seed: int | jax.Array, indices) -> jax.Array:
    """Per-sample keys for arbitrary sample indices (same as :func:`sample_keys` for a range)."""
    key = jax.random.key(seed) if isinstance(seed, int) else seed
    idx = jnp.asarray(np.asarray(indices), jnp.uint32)
    return jax.vmap(lambda i: jax.random.fold_in(key, i))(idx)


# ----------------------------------------------------------------------------------------------
# decoding group by group
# ----------------------------------------------------------------------------------------------
class StreamEvent(NamedTuple):
    group: int               # 1..G: token groups known
    tokens: jax.Array        # (B, N) tokens so far (later positions are 0)
    images: jax.Array        # (B, H, W, 3) preview in [-1, 1] (the final image when ``final``)
    final: bool


def _decode_schedule(cfg: tok.TokenizerConfig, num_steps: int) -> list[tuple[int, int, int]]:
    """(group, tokens known, steps ready) after each group."""
    return [(g, tok.tokens_in_groups(cfg, g),
             tok.steps_ready(cfg, tok.tokens_in_groups(cfg, g), num_steps))
            for g in range(1, cfg.num_query_groups + 1)]


class DecodeProgress(NamedTuple):
    """The group-by-group decode between token groups: the sampler state at time point ``done``
    and the latest preview (B, H, W, 3) in [-1, 1] (the noise / data_std before any step)."""
    state: tok.DecodeState
    done: int
    preview: jax.Array


def _start_decode(models: Models, noise, num_steps: int) -> DecodeProgress:
    cfg = models.tok_cfg
    return DecodeProgress(tok.init_state(cfg, noise, num_steps=num_steps), 0,
                          jnp.asarray(noise) / cfg.data_std)


def _advance_decode(models: Models, progress: DecodeProgress, tokens, ready: int, *, solver: str,
                    num_steps: int, target=None) -> DecodeProgress:
    """Runs the decode steps that the known ``tokens`` (B, N; zeros after them) make ready
    (state in, state out, like ``Generation.advance``; one compiled program for every range)."""
    if ready <= progress.done:
        return progress
    cfg, params = models.tok_cfg, models.tok_params
    # the decoder layers are causal: cond of the known tokens ignores the zeros after them
    cond = tok.codes_to_cond(cfg, params, tokens, check=False, target=target)
    kv = tok.cross_kv(cfg, params, cond, target)
    state, preview = tok.run_steps(cfg, params, kv, progress.state, progress.done, ready,
                                   solver=solver, num_steps=num_steps, target=target)
    return DecodeProgress(state, ready, tok.postprocess(cfg, preview))


def decode_groups(models: Models, codes, noise, *, solver: str = "adams2",
                  num_steps: int | None = None, target=None) -> Iterator[StreamEvent]:
    """Decodes known codes (B, N) group by group, yielding the preview after each group
    (the reference's preview-after-k semantics) and finally the full decode."""
    cfg = models.tok_cfg
    if num_steps is not None and (not _is_int(num_steps) or num_steps < 1):
        raise PipelineError(f"num_steps must be an integer >= 1 (or None), got {num_steps!r}")
    num_steps = int(num_steps or cfg.num_denoising_steps)
    tok.check_codes(cfg, codes)
    if np.shape(codes)[1] != cfg.num_all_queries:
        raise PipelineError(f"decode_groups needs all {cfg.num_all_queries} codes per image, got "
                            f"codes of shape {tuple(np.shape(codes))}")
    codes = jnp.asarray(codes, jnp.int32)
    shape = tuple(np.shape(noise))
    if len(shape) != 4 or shape[0] != codes.shape[0] or shape[-1] != 3:
        raise PipelineError(f"noise must be (B={codes.shape[0]}, H, W, 3), got shape {shape}")
    tok.check_size(cfg, shape[1:3])
    solver = solvers.canonical(solver)
    progress = _start_decode(models, noise, num_steps)
    sched = _decode_schedule(cfg, num_steps)
    for g, known, ready in sched:
        visible = jnp.where(jnp.arange(codes.shape[1]) < known, codes, 0)
        progress = _advance_decode(models, progress, visible, ready, solver=solver,
                                   num_steps=num_steps, target=target)
        yield StreamEvent(g, visible, progress.preview, g == len(sched))


# ----------------------------------------------------------------------------------------------
# the pipeline
# ----------------------------------------------------------------------------------------------
def _generation(models: Models, labels, keys, options: SampleOptions, prefix, prefix_len, target):
    return ar.prepare_generation(models.gpt_cfg, models.gpt_params, labels, token_keys(keys),
                      cfg_scale=options.cfg_scale, cfg_interval=options.cfg_interval,
                      temperature=options.temperature, top_k=options.top_k, top_p=options.top_p,
                      prefix=prefix, prefix_len=prefix_len, target=target)


def stream(models: Models, labels, keys, options: SampleOptions = SampleOptions(), *,
           prefix=None, prefix_len: int = 0, target=None) -> Iterator[StreamEvent]:
    """Interleaves AR generation and decoding: after each token group, yields the preview of
    the image so far; the last event is the final image (``final=True``).

    ``target`` (``dar_jax.parallel.Target``): the platform, mesh and rules of the programs
    (default: the first device); under a sharded target the labels, keys and prefix are
    global arrays sharded over the batch, and so are the events' arrays."""
    ar.check_labels(labels, models.num_classes)
    keys, single = ar.check_keys(keys)
    if single or keys.shape[0] != len(labels):
        raise PipelineError(f"need one key per label: got keys of shape {keys.shape} for "
                            f"{len(labels)} labels (pipeline.sample_keys makes them)")
    options.check_for(models.tok_cfg)
    models = with_dtype(models, options.dtype)
    cfg = models.tok_cfg
    num_steps = int(options.num_steps or cfg.num_denoising_steps)
    gen = _generation(models, labels, keys, options, prefix, prefix_len, target)
    solver = solvers.canonical(options.solver)
    progress = _start_decode(models, noise_for(models, keys, options.size), num_steps)
    state = gen.start()
    have = 1
    sched = _decode_schedule(cfg, num_steps)
    for g, known, ready in sched:
        if known > have:
            state = gen.advance(state, have, known)
            have = known
        progress = _advance_decode(models, progress, state.tokens, ready, solver=solver,
                                   num_steps=num_steps, target=target)
        yield StreamEvent(g, state.tokens, progress.preview, g == len(sched))


class SampleResult(NamedTuple):
    tokens: jax.Array            # (B, N) int32
    images: jax.Array            # (B, H, W, 3) float32 in [-1, 1]
    previews: jax.Array | None   # (B, G, H, W, 3) preview after each group (if asked)


def sample(models: Models, labels, keys, options: SampleOptions = SampleOptions(), *,
           prefix=None, prefix_len: int = 0, previews: bool = False, target=None) -> SampleResult:
    """labels (B,) + per-sample keys (B,) -> tokens and images (same values as ``stream``)."""
    shots = []
    event = None
    for event in stream(models, labels, keys, options, prefix=prefix, prefix_len=prefix_len,
                        target=target):
        if previews:
            shots.append(event.images)
    return SampleResult(event.tokens, event.images, jnp.stack(shots, 1) if previews else None)


def global_keys(seed: int | jax.Array, indices: np.ndarray, target=None) -> jax.Array:
    """Per-sample keys (:func:`keys_for`) of a batch, sharded over the target's batch axes; each
    process derives only the keys of the rows its devices hold."""
    from dar_jax import parallel
    indices = np.asarray(indices)
    data = lambda rows: np.asarray(jax.random.key_data(keys_for(seed, indices[rows])))
    shape = (len(indices),) + jax.random.key_data(keys_for(seed, indices[:1])).shape[1:]
    sharding = None if target is None else parallel.batch_sharding(target, shape)
    if sharding is None:
        return keys_for(seed, indices)
    raw = jax.make_array_from_callback(shape, sharding, lambda index: data(index[0]))
    return jax.random.wrap_key_data(raw)


def sample_global(models: Models, labels, indices, seed: int | jax.Array,
                  options: SampleOptions = SampleOptions(), *, target=None, prefix=None,
                  prefix_len: int = 0, previews: bool = False) -> SampleResult:
    """One batch sampled over the target's devices, which may span hosts; NumPy results.

    labels (B,) and the sample indices (B,) (keys: ``keys_for(seed, indices)``) are host
    values, the same on every process: each process places only the rows its devices hold,
    every process takes part in the programs, and the outputs are gathered to every process.
    B should be a multiple of the target's batch shards (``parallel.batch_divisor``). With an
    unsharded target this is :func:`sample` on one device.
    """
    from dar_jax import parallel
    labels = np.asarray(labels, np.int32)
    if target is not None and target.sharded:
        keys = global_keys(seed, indices, target)
        labels = parallel.put_batch(labels, target)
        if prefix is not None:
            prefix = parallel.put_batch(np.asarray(prefix, np.int32), target)
    else:
        keys = keys_for(seed, indices)
    res = sample(models, labels, keys, options, prefix=prefix, prefix_len=prefix_len,
                 previews=previews, target=target)
    tokens, images, shots = parallel.gather_to_host((res.tokens, res.images, res.previews))
    return SampleResult(tokens, images, shots)


def place(models: Models, target) -> Models:
    """Both models' parameters replicated over the target's mesh (unchanged when unsharded)."""
    from dar_jax import parallel
    return Models(models.gpt_cfg, parallel.put_replicated(models.gpt_params, target),
                  models.tok_cfg, parallel.put_replicated(models.tok_params, target))


def sample_many(models: Models, labels, seed: int | jax.Array,
                options: SampleOptions = SampleOptions(), *, batch_size: int, target=None,
                indices=None, prefix=None, prefix_len: int = 0, previews: bool = False,
                on_batch: Callable[[int, int], None] | None = None) -> SampleResult:
    """The one batched sampling loop (sample.py, evaluate, the trainer's samples): any number of
    labels (N,) -> uint8 NumPy results, the same on every process.

    Sample i uses the key ``keys_for(seed, indices[i])`` (``indices`` default ``arange(N)``), so
    the images do not depend on ``batch_size``. Batches are rounded up to a multiple of the
    target's batch shards and the last one is padded (one compiled shape); each batch runs over
    the target's devices, which may span hosts (:func:`sample_global`). ``prefix``: (1 or N, L)
    layout tokens. ``on_batch(done, total)`` is called after each batch. Returns tokens (N, L)
    int32, images (N, H, W, 3) uint8 and, with ``previews``, (N, G, H, W, 3) uint8.
    """
    from dar_jax import parallel
    labels = np.asarray(labels, np.int32).reshape(-1)
    n = len(labels)
    if n == 0:
        raise PipelineError("nothing to sample: no labels")
    if isinstance(batch_size, bool) or int(batch_size) < 1:
        raise PipelineError(f"batch_size must be a positive integer, got {batch_size!r}")
    indices = np.arange(n) if indices is None else np.asarray(indices).reshape(-1)
    if len(indices) != n:
        raise PipelineError(f"{len(indices)} sample indices for {n} labels")
    if prefix is not None:
        prefix = np.asarray(prefix, np.int32)
        if prefix.ndim != 2 or prefix.shape[0] not in (1, n):
            raise PipelineError(f"prefix must be (1 or {n}, L) tokens, got shape {prefix.shape}")
    div = parallel.batch_divisor(target.mesh, target.rules) if target is not None and target.sharded else 1
    bs = -(-int(batch_size) // div) * div
    tokens, images, shots = [], [], []
    for start in range(0, n, bs):
        rows = np.arange(start, min(start + bs, n))
        pad = bs - len(rows)
        lab = np.concatenate([labels[rows], np.full(pad, labels[0], np.int32)])
        idx = np.concatenate([indices[rows], indices[rows[-1]] + 1 + np.arange(pad)])
        pre = None
        if prefix is not None:
            pre = np.repeat(prefix, bs, 0) if len(prefix) == 1 else prefix[np.concatenate(
                [rows, np.full(pad, rows[0])])]
        res = sample_global(models, lab, idx, seed, options, target=target, prefix=pre,
                            prefix_len=prefix_len, previews=previews)
        tokens.append(np.asarray(res.tokens[:len(rows)]))
        images.append(to_uint8(res.images[:len(rows)]))
        if previews:
            shots.append(to_uint8(res.previews[:len(rows)]))
        if on_batch is not None:
            on_batch(start + len(rows), n)
    return SampleResult(np.concatenate(tokens), np.concatenate(images),
                        np.concatenate(shots) if previews else None)


def layout_prefix(models: Models, images, groups: int) -> tuple[jax.Array, int]:
    """Zero-shot layout control: the first ``groups`` token groups of the tokenizer's codes of
    ``images`` (B, H, W, 3) in [-1, 1]. Returns (prefix tokens (B, N), prefix length)."""
    cfg = models.tok_cfg
    if not 0 <= groups <= cfg.num_query_groups:
        raise PipelineError(f"layout groups must lie in [0, {cfg.num_query_groups}], got {groups}")
    codes = tok.encode(cfg, models.tok_params, images, check_range=True)
    return codes, tok.tokens_in_groups(cfg, groups)


def load_image(path: str, size: int) -> np.ndarray:
    """An image file -> (1, size, size, 3) float32 in [-1, 1] (ADM centre crop)."""
    from PIL import Image, UnidentifiedImageError
    from dar_jax.data.augment import center_crop_arr
    try:
        with Image.open(path) as im:
            im = im.convert("RGB")
            arr = np.asarray(center_crop_arr(np.asarray(im), size), np.float32)
    except (FileNotFoundError, IsADirectoryError):
        raise PipelineError(f"layout image not found: {path}") from None
    except (UnidentifiedImageError, OSError) as e:
        raise PipelineError(f"cannot read layout image {path}: {e}") from None
    return (arr / 127.5 - 1.0)[None]
