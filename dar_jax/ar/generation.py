"""Token generation with the AR model: prefill + KV cache, one jit-compiled ``lax`` loop.

Classifier-free guidance runs conditional and null-class rows in one batch
(logits = u + scale (c - u)), with a constant scale or a linear schedule "a,b" over the tokens as
the reference does. Sampling: temperature, top-k, top-p, greedy. Optional prefix tokens are kept
verbatim (zero-shot layout control). Randomness comes from one PRNG key per sample, folded with
the token index, so a sample's tokens do not depend on its batch or device.
"""
from __future__ import annotations

import dataclasses
from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from dar_jax.errors import DarError
from dar_jax.ar.model import GPTConfig, bind
from dar_jax.parallel.host import host_local_values
from dar_jax.parallel.target import Target, default_target


class SamplingError(DarError, ValueError):
    """Bad generation options or inputs."""


@dataclasses.dataclass(frozen=True)
class CfgSchedule:
    """Guidance scale: ``start`` at the first token, ``end`` at the last (linear in between)."""
    start: float = 1.0
    end: float = 1.0

    @property
    def active(self) -> bool:
        return self.start > 1.0


def parse_cfg_scale(value: float | str | Sequence[float] | CfgSchedule) -> CfgSchedule:
    """``4.0`` | ``"4.0"`` | ``"a,b"`` | ``(a, b)`` -> :class:`CfgSchedule` (reference semantics:
    a schedule starting at exactly 1.0 and rising starts at 1.001 so that guidance is on)."""
    if isinstance(value, CfgSchedule):
        return value
    if isinstance(value, str):
        parts = [p.strip() for p in value.split(",")]
        if not 1 <= len(parts) <= 2 or any(not p for p in parts):
            raise SamplingError(f"malformed CFG scale {value!r}: expected a number or 'a,b'")
        try:
            nums = [float(p) for p in parts]
        except ValueError:
            raise SamplingError(f"malformed CFG scale {value!r}: expected a number or 'a,b'") from None
    elif isinstance(value, (int, float)):
        nums = [float(value)]
    else:
        nums = [float(v) for v in value]
        if not 1 <= len(nums) <= 2:
            raise SamplingError(f"malformed CFG scale {value!r}")
    start = nums[0]
    end = nums[1] if len(nums) > 1 else start
    if not all(np.isfinite([start, end])):
        raise SamplingError(f"CFG scale must be finite, got {value!r}")
    if max(start, end) > 1.0 and start == 1.0:
        start += 1e-3
    return CfgSchedule(start, end)


@dataclasses.dataclass(frozen=True)
class _StaticOptions:
    """The options that change the compiled program."""
    num_tokens: int
    cfg_active: bool
    top_k: int
    use_top_p: bool
    greedy: bool
    cfg_interval: int
    target: Target        # platform (kernels, weight casts), mesh and rules of the program


def filter_logits(logits: jax.Array, top_k: int, top_p: jax.Array | None) -> jax.Array:
    """Top-k then top-p (nucleus) filtering of (B, V) logits (-inf outside), as the reference."""
    neg = jnp.asarray(-jnp.inf, logits.dtype)
    if top_k > 0:
        k = min(top_k, logits.shape[-1])
        kth = jax.lax.top_k(logits, k)[0][..., -1:]
        logits = jnp.where(logits < kth, neg, logits)
    if top_p is not None:
        order = jnp.argsort(-logits, axis=-1, stable=True)
        sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
        cum = jnp.cumsum(jax.nn.softmax(sorted_logits, axis=-1), axis=-1)
        remove = cum > top_p
        remove = jnp.concatenate([jnp.zeros_like(remove[..., :1]), remove[..., :-1]], axis=-1)
        inv = jnp.argsort(order, axis=-1)
        logits = jnp.where(jnp.take_along_axis(remove, inv, axis=-1), neg, logits)
    return logits


def _sample_token(logits, keys, step, temperature, top_p, st: _StaticOptions):
    """Samples one token per row from (B, V) float32 logits."""
    logits = logits / jnp.maximum(temperature, 1e-5)
    logits = filter_logits(logits, st.top_k, top_p if st.use_top_p else None)
    if st.greedy:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    step_keys = jax.vmap(lambda k: jax.random.fold_in(k, step))(keys)
    return jax.vmap(jax.random.categorical)(step_keys, logits).astype(jnp.int32)


class _TracedInputs(NamedTuple):
    """Traced inputs of generation (changing them does not recompile)."""
    labels: jax.Array        # (B,) int32
    keys: jax.Array          # (B,) per-sample PRNG keys
    scale_start: jax.Array   # () float32 CFG scale at the first token
    scale_end: jax.Array     # () float32 CFG scale at the last token
    temperature: jax.Array   # () float32
    top_p: jax.Array         # () float32
    prefix: jax.Array        # (B, n) int32 tokens kept where index < prefix_len
    prefix_len: jax.Array    # () int32


class GenState(NamedTuple):
    """Generation in progress: tokens so far (B, n) and the KV cache."""
    tokens: jax.Array
    cache: tuple


def _model(cfg: GPTConfig, params, target: Target):
    if cfg.compute_dtype != jnp.float32 and target.platform != "cpu":
        # Read each weight once per token in the compute dtype. (On CPU, XLA computes bf16 dots
        # in float32 anyway and keeping float32 weights measured faster: BENCHMARKS.md.)
        params = jax.tree.map(lambda x: x.astype(cfg.compute_dtype), params)
    return bind(cfg, params)


def _next_token(cfg: GPTConfig, st: _StaticOptions, inp: _TracedInputs, logits, step):
    """Token ``step`` for each sample from the (rows, V) logits of the rows' last position."""
    b = inp.labels.shape[0]
    logits = logits[:, -1]
    if st.cfg_active:
        cond, uncond = logits[:b], logits[b:]
        frac = step.astype(jnp.float32) / max(st.num_tokens - 1, 1)
        scale = inp.scale_start + (inp.scale_end - inp.scale_start) * frac
        mixed = uncond + (cond - uncond) * scale
        if st.cfg_interval > -1:
            mixed = jnp.where(step - 1 > st.cfg_interval, cond, mixed)
        logits = mixed
    tok = _sample_token(logits, inp.keys, step, inp.temperature, inp.top_p, st)
    return jnp.where(step < inp.prefix_len, inp.prefix[:, step], tok)


def _prefill(cfg: GPTConfig, st: _StaticOptions, params, inp: _TracedInputs) -> GenState:
    """Class token through the model, token 0 chosen."""
    model = _model(cfg, params, st.target)
    labels = inp.labels
    if st.cfg_active:
        labels = jnp.concatenate([labels, jnp.full_like(labels, cfg.num_classes)])
    cache = model.init_cache(labels.shape[0], target=st.target)
    logits, cache = model.decode(model.embed_labels(labels)[:, None], 0, cache, st.target)
    first = _next_token(cfg, st, inp, logits, jnp.int32(0))
    tokens = jnp.zeros((inp.labels.shape[0], st.num_tokens), jnp.int32).at[:, 0].set(first)
    return GenState(tokens, cache)


def _advance(cfg: GPTConfig, st: _StaticOptions, params, inp: _TracedInputs, state: GenState, start, stop) -> GenState:
    """Chooses tokens start .. stop-1 (start >= 1), one per step, in a ``lax`` loop."""
    model = _model(cfg, params, st.target)

    def body(step, carry):
        out, cache = carry
        prev = out[:, step - 1]
        if st.cfg_active:
            prev = jnp.concatenate([prev, prev])
        logits, cache = model.decode(model.embed_tokens(prev)[:, None], step, cache, st.target)
        return out.at[:, step].set(_next_token(cfg, st, inp, logits, step)), cache

    return GenState(*jax.lax.fori_loop(start, stop, body, tuple(state)))


def _generate(cfg: GPTConfig, st: _StaticOptions, params, inp: _TracedInputs):
    return _advance(cfg, st, params, inp, _prefill(cfg, st, params, inp), 1, st.num_tokens).tokens


_generate_jit = jax.jit(_generate, static_argnames=("cfg", "st"))
_prefill_jit = jax.jit(_prefill, static_argnames=("cfg", "st"))
_advance_jit = jax.jit(_advance, static_argnames=("cfg", "st"), donate_argnames=("state",))


@dataclasses.dataclass
class Generation:
    """Generation prepared for stepping (streaming): ``start()`` then ``advance(state, a, b)``.

    Each piece is compiled once per shape and option set; ``advance`` takes its token range as
    traced values, so advancing group by group never recompiles.
    """
    cfg: GPTConfig
    params: object
    static: _StaticOptions
    inputs: _TracedInputs

    @property
    def num_tokens(self) -> int:
        return self.static.num_tokens

    def start(self) -> GenState:
        return _prefill_jit(self.cfg, self.static, self.params, self.inputs)

    def advance(self, state: GenState, start: int, stop: int) -> GenState:
        """Tokens start .. stop-1 (1 <= start <= stop <= num_tokens)."""
        if not 1 <= start <= stop <= self.num_tokens:
            raise SamplingError(f"cannot advance tokens [{start}, {stop}) of {self.num_tokens}")
        return _advance_jit(self.cfg, self.static, self.params, self.inputs, state,
                            jnp.int32(start), jnp.int32(stop))

    def run(self) -> jax.Array:
        """All tokens in one compiled program (same values as start + advance)."""
        return _generate_jit(self.cfg, self.static, self.params, self.inputs)


def sample_keys(key: jax.Array, num: int, start: int = 0) -> jax.Array:
    """Per-sample keys: ``fold_in(key, index)`` for indices start .. start+num-1."""
    idx = jnp.arange(start, start + num, dtype=jnp.uint32)
    return jax.vmap(lambda i: jax.random.fold_in(key, i))(idx)


def check_labels(labels, num_classes: int | None = None) -> None:
    """labels: a non-empty (B,) array or list of integer class ids (never floats, strings or
    booleans, which a cast would silently turn into other classes); in [0, num_classes) when the
    values are on this host."""
    if isinstance(labels, jax.Array):
        dtype, shape, values = labels.dtype, labels.shape, None
    else:
        try:
            values = np.asarray(labels)
        except (TypeError, ValueError) as e:
            raise SamplingError(f"labels must be a (B,) list or array of class ids: {e}") from None
        dtype, shape = values.dtype, values.shape
    if len(shape) != 1:
        raise SamplingError(f"labels must be (B,), got shape {shape}")
    if shape[0] == 0:
        raise SamplingError("labels is empty: give at least one class id")
    if not np.issubdtype(dtype, np.integer):
        shown = f" {values[:4].tolist()}" if values is not None else ""
        raise SamplingError(f"labels must be integer class ids, got {dtype} values{shown}")
    if values is not None and num_classes is not None and (values.min() < 0 or values.max() >= num_classes):
        raise SamplingError(f"class labels must lie in [0, {num_classes}); got {values.tolist()}")


def check_keys(keys) -> tuple[jax.Array, bool]:
    """PRNG keys -> (keys as a jax array, whether it is one key rather than one per sample).

    Typed keys (``jax.random.key``; () one, (B,) per sample) or raw uint32 key data ((2,)/(4,)
    one, (B, 2)/(B, 4) per sample). Integers of other kinds are refused: they are not keys."""
    try:
        arr = keys if isinstance(keys, jax.Array) else jnp.asarray(keys)
    except (TypeError, ValueError):
        raise SamplingError(f"keys must be PRNG keys (jax.random.key / pipeline.sample_keys), got {keys!r:.80}") from None
    if jax.dtypes.issubdtype(arr.dtype, jax.dtypes.prng_key):
        if arr.ndim > 1:
            raise SamplingError(f"keys must be one key or (B,) keys, got shape {arr.shape}")
        return arr, arr.ndim == 0
    if arr.dtype == jnp.uint32 and arr.ndim in (1, 2) and arr.shape[-1] in (2, 4):
        return arr, arr.ndim == 1
    raise SamplingError(f"keys must be PRNG keys (jax.random.key / pipeline.sample_keys), got a "
                        f"{arr.dtype} array of shape {arr.shape}")


def prepare_generation(cfg: GPTConfig, params, labels, key: jax.Array, *,
                       cfg_scale: float | str | Sequence[float] | CfgSchedule = 1.0,
                       cfg_interval: int = -1, temperature: float = 1.0, top_k: int = 0,
                       top_p: float = 1.0, greedy: bool = False, prefix: jax.Array | None = None,
                       prefix_len: int = 0, num_tokens: int | None = None,
                       target: Target | None = None) -> Generation:
    """Validates options and prepares generation for ``labels`` (see :func:`generate`).

    Labels and prefix may be global arrays spanning several hosts: each process checks the
    rows it holds (every process takes part in the compiled generation).

    Args:
      labels: (B,) int class ids in [0, num_classes).
      key: one PRNG key (per-sample keys are derived as ``fold_in(key, i)``) or (B,) keys,
        one per sample (then a sample's tokens depend only on its own key).
      cfg_scale: number, "a,b" linear schedule over tokens, or (a, b).
      prefix: (B, >= prefix_len) tokens kept verbatim at positions < prefix_len.
      target: the platform, mesh and rules the program is built for (default: first device).
    Returns: a :class:`Generation` of (B, num_tokens) int32 tokens (num_tokens defaults to
    ``cfg.block_size``).
    """
    check_labels(labels)
    if not isinstance(labels, jax.Array):
        labels = np.asarray(labels)
    lab = host_local_values(labels)
    if lab.size and (lab.min() < 0 or lab.max() >= cfg.num_classes):
        raise SamplingError(f"class labels must lie in [0, {cfg.num_classes}); got {lab.tolist()}")
    labels = jnp.asarray(labels, jnp.int32)
    b = labels.shape[0]
    n = cfg.block_size if num_tokens is None else int(num_tokens)
    if not 1 <= n <= cfg.block_size:
        raise SamplingError(f"num_tokens {n} outside [1, {cfg.block_size}]")
    if top_k < 0 or not 0.0 < top_p <= 1.0 or not 0 <= temperature < np.inf:
        raise SamplingError(f"bad sampling options: top_k={top_k}, top_p={top_p}, temperature={temperature} "
                            "(need top_k >= 0, 0 < top_p <= 1, a finite temperature >= 0)")
    sched = parse_cfg_scale(cfg_scale)
    keys, single = check_keys(key)
    if single:
        keys = sample_keys(keys, b)
    if keys.shape[0] != b:
        raise SamplingError(f"got {keys.shape[0]} keys for {b} labels")
    if prefix is None:
        prefix = jnp.zeros((b, n), jnp.int32)
        prefix_len = 0
    else:
        if not isinstance(prefix, jax.Array):
            prefix = np.asarray(prefix)
        if prefix.ndim != 2 or prefix.shape[0] != b or prefix.shape[1] < prefix_len:
            raise SamplingError(f"prefix must be (B={b}, >= prefix_len={prefix_len}); got {prefix.shape}")
        if not 0 <= prefix_len <= n:
            raise SamplingError(f"prefix_len {prefix_len} outside [0, {n}]")
        if prefix_len:
            # host values, sliced with numpy: a new prefix length compiles nothing
            pre = host_local_values(prefix)[:, :prefix_len]
            if pre.size and (pre.min() < 0 or pre.max() >= cfg.vocab_size):
                raise SamplingError(f"prefix tokens must lie in [0, {cfg.vocab_size})")
        prefix = jnp.asarray(prefix, jnp.int32)
        prefix = jnp.pad(prefix[:, :n], ((0, 0), (0, max(0, n - prefix.shape[1]))))
    st = _StaticOptions(num_tokens=n, cfg_active=sched.active, top_k=int(top_k),
                 use_top_p=top_p < 1.0, greedy=bool(greedy), cfg_interval=int(cfg_interval),
                 target=target or default_target())
    inp = _TracedInputs(labels, keys, jnp.float32(sched.start), jnp.float32(sched.end),
                  jnp.float32(temperature), jnp.float32(top_p), prefix, jnp.int32(prefix_len))
    return Generation(cfg, params, st, inp)


def generate(cfg: GPTConfig, params, labels, key: jax.Array, **options) -> jax.Array:
    """Generates image tokens for class ``labels`` (one compiled program for all tokens).

    Args:
      labels: (B,) int class ids in [0, num_classes).
      key: one PRNG key (per-sample keys are derived as ``fold_in(key, i)``) or (B,) keys,
        one per sample (then a sample's tokens depend only on its own key).
      options: cfg_scale (number, "a,b" linear schedule over tokens, or (a, b)), cfg_interval,
        temperature, top_k, top_p, greedy, prefix (B, >= prefix_len) tokens kept verbatim at
        positions < prefix_len, prefix_len, num_tokens.
    Returns: (B, num_tokens) int32 tokens (num_tokens defaults to ``cfg.block_size``).
    """
    return prepare_generation(cfg, params, labels, key, **options).run()
