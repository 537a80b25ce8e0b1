"""The sequential decode of D-AR: condition group i drives denoising step i.

Schedule (the reference's): steps i = 0..S-1 at u_i = i / S plus the end point 1; step i uses the
condition window of the **unshifted** u_i (``window_starts``), while the ODE and the time
embedding use the shifted times t_i = shift(u_i) (``time_points``). A preview after k steps (the
reference's ``clip_steps=k``) keeps the first k time points and lets step k-1 jump straight to
t = 1, so it shares steps 0..k-2 and the network evaluation of step k-1 with the full decode.

Everything runs in one compiled function per (config, solver, step count, shapes): the step
loop is a ``lax`` loop whose bounds are traced, so previews after any k, the final image, a
partial decode from a start step and group-by-group streaming (``run_steps`` with a growing
``stop``) reuse the same program. Images are NHWC; the sampler state ``x`` lives in the
data-times-std space of the flow, images returned to callers are divided by ``data_std``.
"""
from __future__ import annotations

import functools
import math
from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from dar_jax.errors import DarError
from dar_jax.nn.resize import resize_bicubic
from dar_jax.parallel.target import default_target
from dar_jax import solvers
from dar_jax.tokenizer.config import TokenizerConfig
from dar_jax.tokenizer.core import codes_to_cond, encode
from dar_jax.tokenizer.model import bind


class DecodeError(DarError, ValueError):
    """Decode arguments that cannot be served (shapes, step ranges, solver)."""


# ----------------------------------------------------------------------------------------------
# schedule
# ----------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=None)
def time_points(num_steps: int, shift: float) -> np.ndarray:
    """Shifted time points (S + 1,) float32: shift(i / S) for i < S, then 1.0 (float32 ops as the
    reference: t / (t + s (1 - t)))."""
    t = np.asarray([i / num_steps for i in range(num_steps)] + [1.0], np.float32)
    one, s = np.float32(1.0), np.float32(shift)
    out = t / (t + s * (one - t))
    out.setflags(write=False)
    return out


@functools.lru_cache(maxsize=None)
def _windows(num_steps: int, groups: int, queries: int, per_step: int) -> np.ndarray:
    out = []
    for i in range(num_steps):
        g = math.floor((i / num_steps) * groups + 0.5) / groups
        out.append(min(queries - per_step, int(g * queries)))
    arr = np.asarray(out, np.int32)
    arr.setflags(write=False)
    return arr


def window_starts(cfg: TokenizerConfig, num_steps: int | None = None) -> np.ndarray:
    """First condition token of each step's window (S,) int32 (Python float maths as the reference)."""
    return _windows(num_steps or cfg.num_denoising_steps, cfg.num_query_groups,
                    cfg.num_all_queries, cfg.queries_per_step)


def steps_ready(cfg: TokenizerConfig, num_tokens: int, num_steps: int | None = None) -> int:
    """How many leading steps can run when the first ``num_tokens`` condition tokens are known."""
    n = 0
    for w in window_starts(cfg, num_steps):
        if w + cfg.queries_per_step > num_tokens:
            break
        n += 1
    return n


def tokens_in_groups(cfg: TokenizerConfig, groups: int) -> int:
    """Condition tokens covered by the first ``groups`` query groups."""
    return min(cfg.num_all_queries, (groups * cfg.num_all_queries) // cfg.num_query_groups)


# ----------------------------------------------------------------------------------------------
# the compiled step loop
# ----------------------------------------------------------------------------------------------
class DecodeState(NamedTuple):
    """Sampler state between calls of :func:`run_steps`: x at time point ``step`` (flow space)."""
    x: jax.Array              # (B, H, W, 3) float32
    hist: solvers.History


def init_state(cfg: TokenizerConfig, noise: jax.Array, *, num_steps: int | None = None,
               start_step: int = 0, start_image: jax.Array | None = None) -> DecodeState:
    """State before step ``start_step``: the noise, or for a partial decode
    x = noise (1 - t_j) + start_image std t_j (t_j the shifted time point of step j)."""
    noise = jnp.asarray(noise, jnp.float32)
    x = noise
    if start_image is not None:
        t = time_points(num_steps or cfg.num_denoising_steps, cfg.time_shift)[start_step]
        x = noise * (1.0 - t) + jnp.asarray(start_image, jnp.float32) * cfg.data_std * t
    return DecodeState(x, solvers.init_history(x))


@functools.partial(jax.jit, static_argnames=("cfg", "target"))
def cross_kv(cfg: TokenizerConfig, params, cond: jax.Array, target=None):
    """Per-block cross-attention keys/values of every condition token (computed once per cond).
    cond: (B, N', D) -> tuple over blocks of (k, v), each (B, N', heads, 64)."""
    return bind(cfg, params).diff.prepare_cond(cond, target)


def _slice_window(kv, start, length):
    return tuple((jax.lax.dynamic_slice_in_dim(k, start, length, axis=1),
                  jax.lax.dynamic_slice_in_dim(v, start, length, axis=1)) for k, v in kv)


# On a single CPU device the decode integrates the batch in chunks (a lax.map over chunks of
# images inside the compiled program) so that one chunk's decoder activations, about
# tokens x decoder dim x 4 bytes per image, stay within this many bytes and in cache (#18 item
# 3: tokenizer v1 at 256 px, 3 MiB per image, decodes 8 images 10% faster per image one at a
# time than all at once; the tiny configs' 32 KiB images keep their whole batch).
# Accelerators and sharded programs always decode the whole batch by default.
CPU_DECODE_CHUNK_BYTES = 4 << 20


def _batch_chunk(target, cfg: TokenizerConfig, x_shape, rows: int | None = None) -> int:
    """Images decoded at a time for a batch of images of shape ``x_shape`` (B, H, W, C) on
    ``target``: ``rows`` (None: the platform's default; 0: the whole batch), rounded down to a
    divisor of the batch."""
    target = target or default_target()
    batch = x_shape[0]
    if rows is None:
        rows = 0
        if target.platform == "cpu" and not target.sharded:
            p = cfg.diff_decoder.patch_size
            per_image = (x_shape[1] // p) * (x_shape[2] // p) * cfg.diff_decoder.dim * 4
            rows = max(1, CPU_DECODE_CHUNK_BYTES // per_image)
    if rows < 0:
        raise DecodeError(f"batch_chunk must be >= 0 (0: the whole batch), got {rows}")
    if rows == 0 or rows >= batch:
        return batch
    return max(r for r in range(1, rows + 1) if batch % r == 0)


@functools.partial(jax.jit, static_argnames=("cfg", "solver", "num_steps", "with_state", "chunk", "target"))
def _integrate(params, kv, x, hist, start, stop, *, cfg, solver, num_steps, with_state, chunk=0,
               target=None):
    """Solver steps ``start`` .. ``stop - 1`` of the decode from ``x`` (with the solver history),
    ``chunk`` images at a time (0: the whole batch at once)."""
    batch = x.shape[0]
    if not chunk or chunk >= batch:
        return _integrate_rows(params, kv, x, hist, start, stop, cfg=cfg, solver=solver,
                               num_steps=num_steps, with_state=with_state, target=target)
    n = batch // chunk
    split = lambda a: a.reshape(n, chunk, *a.shape[1:])  # noqa: E731
    merge = lambda a: a.reshape(batch, *a.shape[2:])  # noqa: E731

    def rows(args):
        kv_c, x_c, prev_c = args
        out = _integrate_rows(params, kv_c, x_c, hist._replace(prev=prev_c), start, stop, cfg=cfg,
                              solver=solver, num_steps=num_steps, with_state=with_state, target=target)
        if with_state:
            state, preview = out
            return (state.x, state.hist.prev, preview), (state.hist.prev_t, state.hist.has_prev)
        return (out,), ()

    batched, scalars = jax.lax.map(rows, jax.tree.map(split, (kv, x, hist.prev)))
    batched = tuple(merge(a) for a in batched)
    if not with_state:
        return batched[0]
    x, prev, preview = batched
    # the history's times are the same for every chunk: the first chunk's
    prev_t, has_prev = (a[0] for a in scalars)
    return DecodeState(x, solvers.History(prev, prev_t, has_prev)), preview


def _integrate_rows(params, kv, x, hist, start, stop, *, cfg, solver, num_steps, with_state, target):
    """:func:`_integrate` of the whole batch at once (traced inside it)."""
    net = bind(cfg, params).diff
    times = jnp.asarray(time_points(num_steps, cfg.time_shift))
    wins = jnp.asarray(window_starts(cfg, num_steps))
    qps = cfg.queries_per_step
    batch = x.shape[0]

    def evaluator(i):
        window = _slice_window(kv, wins[i], qps)
        return lambda xx, t: net(xx, jnp.full((batch,), t, jnp.float32), window, target=target)

    def body(i, carry):
        xx, hh = carry
        ev = evaluator(i)
        t = times[i]
        return solvers.step(solver, ev, xx, ev(xx, t), hh, t, times[i + 1])

    x, hist = jax.lax.fori_loop(start, stop - 1, body, (x, hist))
    last = stop - 1
    ev = evaluator(last)
    t = times[last]
    v = ev(x, t)
    preview, _ = solvers.step(solver, ev, x, v, hist, t, jnp.float32(1.0))
    preview = postprocess(cfg, preview / cfg.data_std)
    if with_state:
        x, hist = solvers.step(solver, ev, x, v, hist, t, times[last + 1])
        return DecodeState(x, hist), preview
    return preview


def _check_range(start, stop, num_steps):
    if isinstance(start, jax.core.Tracer) or isinstance(stop, jax.core.Tracer):
        return
    start, stop = int(start), int(stop)
    if not 0 <= start < stop <= num_steps:
        raise DecodeError(f"steps [{start}, {stop}) are not a non-empty range inside "
                          f"[0, {num_steps}]")


def run_steps(cfg: TokenizerConfig, params, kv, state: DecodeState, start, stop, *,
              solver: str = "adams2", num_steps: int | None = None, batch_chunk: int | None = None,
              target=None):
    """Runs steps [start, stop) from ``state`` (at time point ``start``).

    kv: :func:`cross_kv` of the condition (only the windows of these steps must be final).
    Returns (state at time point ``stop``, preview (B, H', W', 3) in data space): the preview is
    the reference's ``clip_steps=stop`` image, i.e. step stop-1 jumping to t = 1 (for
    ``stop == num_steps`` it is the final image), resized to ``output_resolution`` if set.
    ``start``/``stop`` may be Python or traced ints: one compiled program serves every range.
    ``target``: the ``dar_jax.parallel.Target`` of the program (default: the first device);
    ``batch_chunk``: images integrated at a time (0: all; None: the platform's, see
    CPU_DECODE_CHUNK_BYTES).
    """
    num_steps = num_steps or cfg.num_denoising_steps
    solver = solvers.canonical(solver)
    _check_range(start, stop, num_steps)
    chunk = _batch_chunk(target, cfg, state.x.shape, batch_chunk)
    return _integrate(params, kv, state.x, state.hist, jnp.int32(start), jnp.int32(stop), cfg=cfg,
                      solver=solver, num_steps=num_steps, with_state=True, chunk=chunk, target=target)


# ----------------------------------------------------------------------------------------------
# output resizing (the reference's bicubic, torch semantics: A = -0.75, no antialiasing)
# ----------------------------------------------------------------------------------------------
def postprocess(cfg: TokenizerConfig, images: jax.Array) -> jax.Array:
    """The reference's ``output_resolution`` resize (only when the image is larger)."""
    r = cfg.output_resolution
    if r and (images.shape[1] > r or images.shape[2] > r):
        return resize_bicubic(images, (r, r))
    return images


# ----------------------------------------------------------------------------------------------
# the public decode
# ----------------------------------------------------------------------------------------------
@functools.partial(jax.jit, static_argnames=("cfg", "solver", "num_steps", "chunk", "target"))
def _decode(params, cond, x, start, stop, *, cfg, solver, num_steps, chunk=0, target=None):
    kv = bind(cfg, params).diff.prepare_cond(cond, target)
    return _integrate(params, kv, x, solvers.init_history(x), start, stop, cfg=cfg, solver=solver,
                      num_steps=num_steps, with_state=False, chunk=chunk, target=target)


def resolution(cfg: TokenizerConfig, size: int | Sequence[int] | None = None) -> tuple[int, int]:
    """Decode resolution: max(sampling_resolution, requested size) per side."""
    if size is None:
        h = w = cfg.sampling_resolution
    elif isinstance(size, int):
        h = w = size
    else:
        h, w = size
    return max(cfg.sampling_resolution, int(h)), max(cfg.sampling_resolution, int(w))


def check_size(cfg: TokenizerConfig, size: int | Sequence[int]) -> tuple[int, int]:
    """A requested decode size (int or (H, W)) as (H, W); raises :class:`DecodeError` naming the
    sizes that work (multiples of the decoder patch size, at least ``sampling_resolution``)
    instead of silently decoding another size."""
    hw = (size, size) if isinstance(size, (int, np.integer)) else tuple(size)
    p, lo = cfg.diff_decoder.patch_size, cfg.sampling_resolution
    if len(hw) != 2 or any(isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < lo or v % p
                           for v in hw):
        raise DecodeError(f"cannot decode at size {size}: sizes must be multiples of {p} (the decoder "
                          f"patch size) of at least {lo} (e.g. {lo}, {lo + p}, {2 * lo})")
    return int(hw[0]), int(hw[1])


def decode(cfg: TokenizerConfig, params, codes_or_cond: jax.Array, noise_or_key: jax.Array, *,
           solver: str = "adams2", num_steps: int | None = None,
           preview_steps: int | None = None, preview_groups: int | None = None,
           start_step: int | None = None, start_image: jax.Array | None = None,
           size: int | Sequence[int] | None = None, check: bool = True,
           batch_chunk: int | None = None, target=None) -> jax.Array:
    """Codes (B, N) int or cond (B, N, D) float -> images (B, H, W, 3) in data space ([-1, 1]).

    noise_or_key: initial noise x0 (B, H, W, 3), or a PRNG key (noise drawn at
    :func:`resolution` ``(cfg, size)``). solver: euler | adams2 | heun | dpmpp_2m.
    num_steps: default ``cfg.num_denoising_steps`` (more steps than groups are fine: each step
    uses the window of its own time). preview_steps=k: keep the first k time points, then jump to
    t = 1 (the reference's ``clip_steps``); preview_groups=g: the preview after the first g
    token groups (the steps whose windows they cover). start_step=j with start_image: partial
    decode from x = x0 (1 - t_j) + start_image std t_j. batch_chunk: images integrated at a
    time inside the compiled decode (0: all; None: the platform's default, see
    CPU_DECODE_CHUNK_BYTES).
    """
    num_steps = int(num_steps or cfg.num_denoising_steps)
    if num_steps < 1:
        raise DecodeError(f"num_steps must be >= 1, got {num_steps}")
    solver = solvers.canonical(solver)
    codes_or_cond = jnp.asarray(codes_or_cond)
    if jnp.issubdtype(codes_or_cond.dtype, jnp.integer):
        cond = codes_to_cond(cfg, params, codes_or_cond, check=check, target=target)
    else:
        cond = codes_or_cond
        if cond.ndim != 3 or cond.shape[-1] != cfg.decoder_dim:
            raise DecodeError(f"cond must be (B, N, {cfg.decoder_dim}), got {cond.shape}")
    batch = cond.shape[0]
    needed = int(window_starts(cfg, num_steps).max()) + cfg.queries_per_step
    if cond.shape[1] < needed:
        raise DecodeError(f"cond has {cond.shape[1]} tokens; {num_steps} steps need {needed}")
    if isinstance(noise_or_key, jax.Array) and jnp.issubdtype(noise_or_key.dtype, jax.dtypes.prng_key):
        h, w = resolution(cfg, size)
        noise = jax.random.normal(noise_or_key, (batch, h, w, 3), jnp.float32)
    else:
        noise = jnp.asarray(noise_or_key, jnp.float32)
        if noise.ndim != 4 or noise.shape[0] != batch or noise.shape[-1] != 3:
            raise DecodeError(f"noise must be (B={batch}, H, W, 3), got {noise.shape}")
    p = cfg.diff_decoder.patch_size
    if noise.shape[1] % p or noise.shape[2] % p:
        raise DecodeError(f"decode size {noise.shape[1]}x{noise.shape[2]} is not a multiple of the "
                          f"decoder patch size {p}")
    if preview_steps is not None and preview_groups is not None:
        raise DecodeError("give preview_steps or preview_groups, not both")
    stop = num_steps
    if preview_groups is not None:
        stop = steps_ready(cfg, tokens_in_groups(cfg, int(preview_groups)), num_steps)
        if stop < 1:
            raise DecodeError(f"no step can run after {preview_groups} group(s)")
    elif preview_steps is not None:
        stop = int(preview_steps)
    start = 0
    if start_step is not None or start_image is not None:
        if start_step is None or start_image is None:
            raise DecodeError("a partial decode needs both start_step and start_image")
        start = int(start_step)
        if not 0 <= start < num_steps:
            raise DecodeError(f"start_step {start} outside [0, {num_steps})")
        start_image = jnp.asarray(start_image, jnp.float32)
        if start_image.shape != noise.shape:
            raise DecodeError(f"start_image {start_image.shape} must match the noise {noise.shape}")
    _check_range(start, stop, num_steps)
    state = init_state(cfg, noise, num_steps=num_steps, start_step=start, start_image=start_image)
    return _decode(params, cond, state.x, jnp.int32(start), jnp.int32(stop), cfg=cfg,
                   solver=solver, num_steps=num_steps,
                   chunk=_batch_chunk(target, cfg, noise.shape, batch_chunk),
                   target=target)


def reconstruct(cfg: TokenizerConfig, params, images, noise_or_key, *, solver: str = "adams2",
                num_steps: int | None = None, check_range: bool = False) -> jax.Array:
    """encode then decode at the images' resolution (at least sampling_resolution)."""
    codes = encode(cfg, params, images, check_range=check_range)
    return decode(cfg, params, codes, noise_or_key, solver=solver, num_steps=num_steps,
                  size=tuple(np.shape(images)[1:3]))
