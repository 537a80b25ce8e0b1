"""Solvers (order on ODEs with known solutions) and the sequential decode loop with every solver:
more steps than groups, previews, partial decode, streaming group by group, batch independence."""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dar_jax import solvers, tokenizer as T
from dar_jax.nn.resize import resize_bicubic
from dar_jax.parallel import Target

X0 = jnp.array([0.5, 1.0, 2.0, -0.3], jnp.float32)


def _riccati(x, t):
    return -x * x


def _riccati_exact(a, b, xa):
    return xa / (1.0 + xa * (b - a))


def _gauss(x, t):
    return -2.0 * t * x


def _gauss_exact(a, b, xa):
    return xa * np.exp(-(b * b - a * a))


def _observed_order(solver, fn, exact, grid, ns=(16, 32, 64, 128)):
    errs = []
    for n in ns:
        ts = grid(n)
        a, b = float(ts[0]), float(ts[-1])
        xa = jnp.asarray(exact(0.0, a, np.asarray(X0)), jnp.float32)
        x = solvers.integrate(fn, xa, ts, solver)
        errs.append(float(jnp.abs(x - exact(a, b, xa)).max()))
    assert all(e1 > e2 for e1, e2 in zip(errs, errs[1:])), errs
    return -np.polyfit(np.log(ns), np.log(errs), 1)[0]


DECODE_GRID = lambda n: T.time_points(n, 2.0)           # the tokenizer's shifted grid
UNIFORM = lambda n: T.time_points(n, 1.0)
INTERIOR = lambda n: np.linspace(0.1, 0.9, n + 1).astype(np.float32)


@pytest.mark.parametrize("solver,order", [("euler", 1), ("adams2", 2), ("heun", 2)])
@pytest.mark.parametrize("grid", [DECODE_GRID, UNIFORM], ids=["shift2", "uniform"])
def test_solver_order(solver, order, grid):
    for fn, exact in ((_riccati, _riccati_exact), (_gauss, _gauss_exact)):
        p = _observed_order(solver, fn, exact, grid)
        assert order - 0.15 < p < order + 0.3, (solver, p)


def test_dpmpp_2m_order():
    # second order where log-SNR is regular; grids that reach t = 0 or t = 1 (log-SNR -inf/+inf)
    # still converge, with an order reduced by the end points (it tends to 2 slowly)
    p = _observed_order("dpmpp_2m", _riccati, _riccati_exact, INTERIOR)
    assert 1.85 < p < 2.4, p
    for grid in (DECODE_GRID, UNIFORM):
        p = _observed_order("dpmpp_2m", _riccati, _riccati_exact, grid)
        assert p > 1.1, p


def test_first_steps_and_jumps():
    """Step rules on a linear flow x_t = t x1 + (1 - t) x0 (constant v = x1 - x0): every solver
    is exact, and a jump from any t to 1 lands on x1."""
    x0, x1 = jnp.array([0.3, -1.0]), jnp.array([2.0, 0.5])
    v = lambda x, t: x1 - x0
    for solver in solvers.SOLVERS:
        out = solvers.integrate(v, x0, T.time_points(5, 2.0), solver)
        np.testing.assert_allclose(np.asarray(out), np.asarray(x1), atol=1e-6)
        xt = 0.4 * x1 + 0.6 * x0
        hist = solvers.init_history(xt)
        jump, _ = solvers.step(solver, v, xt, v(xt, 0.4), hist, 0.4, 1.0)
        np.testing.assert_allclose(np.asarray(jump), np.asarray(x1), atol=1e-6)
    with pytest.raises(solvers.SolverError, match="unknown solver"):
        solvers.canonical("rk4")
    assert solvers.canonical("DPM++") == "dpmpp_2m"


def test_schedules():
    v1 = T.TokenizerConfig()
    np.testing.assert_array_equal(T.window_starts(v1), np.arange(8) * 32)
    t = T.time_points(8, 2.0)
    assert t[0] == 0 and t[-1] == 1 and t[4] == np.float32(0.5) / np.float32(1.5)
    # more steps than groups: each step takes the window of its own (unshifted) time
    cfg = T.tiny_config()                       # 4 groups of 8 queries
    np.testing.assert_array_equal(T.window_starts(cfg, 7), [0, 8, 8, 16, 16, 24, 24])
    np.testing.assert_array_equal(T.window_starts(cfg, 8), [0, 8, 8, 16, 16, 24, 24, 24])
    odd = T.tiny_config(num_query_groups=2, num_all_queries=16, queries_per_step=6)
    np.testing.assert_array_equal(T.window_starts(odd, 5), [0, 0, 8, 8, 10])
    assert [T.steps_ready(cfg, n, 7) for n in (0, 7, 8, 16, 24, 32)] == [0, 0, 1, 3, 5, 7]
    assert T.tokens_in_groups(cfg, 3) == 24


def _slow_decode(cfg, params, cond, noise, solver, num_steps, start=0, stop=None, start_image=None):
    """Python-loop decode from T.velocity and the step rules (the reference's structure)."""
    vel = jax.jit(T.velocity, static_argnums=0)
    stop = stop or num_steps
    times = T.time_points(num_steps, cfg.time_shift)
    wins = T.window_starts(cfg, num_steps)
    x = jnp.asarray(noise)
    if start_image is not None:
        x = x * (1 - times[start]) + start_image * cfg.data_std * times[start]
    hist = solvers.init_history(x)
    batch = x.shape[0]
    for i in range(start, stop):
        group = cond[:, wins[i]: wins[i] + cfg.queries_per_step]
        ev = lambda xx, tt, g=group: vel(cfg, params, xx, jnp.full((batch,), tt, jnp.float32), g)
        t_next = times[i + 1] if i < stop - 1 else np.float32(1.0)
        x, hist = solvers.step(solver, ev, x, ev(x, times[i]), hist, times[i], t_next)
    return x / cfg.data_std


@pytest.mark.parametrize("solver", solvers.SOLVERS)
def test_every_solver_decodes_with_more_steps_than_groups(tok_default, solver):
    c = tok_default
    cfg, cond, noise = c.cfg, c.io["cond"], c.io["decode_noise"]
    steps = 2 * cfg.num_denoising_steps + 1
    assert steps > cfg.num_query_groups
    full = T.decode(cfg, c.params, cond, noise, solver=solver, num_steps=steps)
    assert np.isfinite(np.asarray(full)).all()
    np.testing.assert_allclose(np.asarray(full), np.asarray(_slow_decode(cfg, c.params, cond, noise, solver, steps)),
                               atol=1e-4)
    k = steps // 2
    prev = T.decode(cfg, c.params, cond, noise, solver=solver, num_steps=steps, preview_steps=k)
    np.testing.assert_allclose(np.asarray(prev), np.asarray(_slow_decode(cfg, c.params, cond, noise, solver, steps, stop=k)),
                               atol=1e-4)
    start = c.io["decode_euler"]
    part = T.decode(cfg, c.params, cond, noise, solver=solver, num_steps=steps, start_step=3, start_image=start)
    np.testing.assert_allclose(
        np.asarray(part),
        np.asarray(_slow_decode(cfg, c.params, cond, noise, solver, steps, start=3, start_image=start)), atol=1e-4)
    # streaming: group by group through run_steps gives the same previews and final image
    state, done = T.init_state(cfg, noise), 0
    kv = T.cross_kv(cfg, c.params, jnp.asarray(cond))
    for g in range(1, cfg.num_query_groups + 1):
        ready = T.steps_ready(cfg, T.tokens_in_groups(cfg, g), steps)
        if ready > done:
            state, preview = T.run_steps(cfg, c.params, kv, state, done, ready, solver=solver,
                                                num_steps=steps)
            want = T.decode(cfg, c.params, cond, noise, solver=solver, num_steps=steps, preview_steps=ready)
            np.testing.assert_allclose(np.asarray(preview), np.asarray(want), atol=1e-5)
            done = ready
    assert done == steps
    np.testing.assert_allclose(np.asarray(state.x) / cfg.data_std, np.asarray(full), atol=1e-5)


def test_decode_is_batch_parallel_and_keyed(tok_default):
    c = tok_default
    cfg = c.cfg
    both = T.decode(cfg, c.params, c.io["codes"], c.io["decode_noise"], solver="heun")
    one = T.decode(cfg, c.params, c.io["codes"][1:], c.io["decode_noise"][1:], solver="heun")
    np.testing.assert_allclose(np.asarray(both[1:]), np.asarray(one), atol=1e-5)
    a = T.decode(cfg, c.params, c.io["codes"], jax.random.key(3))
    b = T.decode(cfg, c.params, c.io["codes"], jax.random.key(3))
    r = cfg.sampling_resolution
    assert a.shape == (2, r, r, 3)
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    big = cfg.sampling_resolution + 2 * cfg.diff_decoder.patch_size
    assert T.resolution(cfg, big) == (big, big)
    assert T.resolution(cfg, 1) == (r, r)


def test_decode_in_batch_chunks_matches_the_whole_batch(tok_default):
    """batch_chunk=k integrates k images at a time inside the compiled decode (a lax.map over
    chunks): the same images as the whole batch at once, for decode and for the streaming
    run_steps."""
    c = tok_default
    cfg = c.cfg
    codes = jnp.concatenate([c.io["codes"]] * 3)                   # 6 images
    noise = jax.random.normal(jax.random.key(4), (6, cfg.sampling_resolution, cfg.sampling_resolution, 3))
    whole = np.asarray(T.decode(cfg, c.params, codes, noise, batch_chunk=0))
    for chunk in (1, 2, 4):      # 4 is rounded down to 3, a divisor of 6
        got = T.decode(cfg, c.params, codes, noise, batch_chunk=chunk)
        np.testing.assert_allclose(np.asarray(got), whole, atol=1e-5)
    shape = noise.shape
    assert T.sequential._batch_chunk(None, cfg, shape, 4) == 3 and T.sequential._batch_chunk(None, cfg, shape, 0) == 6
    # the default on one CPU device: as many images (a divisor of the batch) as keep the chunk's
    # decoder activations within CPU_DECODE_CHUNK_BYTES; the whole batch elsewhere
    p, dim = cfg.diff_decoder.patch_size, cfg.diff_decoder.dim
    big = (8, 128 * p, 128 * p, 3)                    # 16384 tokens: over the budget for dim >= 64
    assert 4 * dim * 16384 >= T.sequential.CPU_DECODE_CHUNK_BYTES
    assert T.sequential._batch_chunk(None, cfg, big) == 1
    fits = T.sequential.CPU_DECODE_CHUNK_BYTES // (4 * dim * (shape[1] // p) * (shape[2] // p))
    assert T.sequential._batch_chunk(None, cfg, shape) == max(
        r for r in range(1, min(max(fits, 1), 6) + 1) if 6 % r == 0)
    assert T.sequential._batch_chunk(Target("gpu"), cfg, big) == 8
    kv = T.cross_kv(cfg, c.params, T.codes_to_cond(cfg, c.params, codes))
    state = T.init_state(cfg, noise)
    (s0, p0), (s2, p2) = (T.run_steps(cfg, c.params, kv, state, 0, 2, batch_chunk=k) for k in (0, 2))
    np.testing.assert_allclose(np.asarray(s2.x), np.asarray(s0.x), atol=1e-5)
    np.testing.assert_allclose(np.asarray(s2.hist.prev), np.asarray(s0.hist.prev), atol=1e-5)
    assert float(s2.hist.prev_t) == float(s0.hist.prev_t) and bool(s2.hist.has_prev) == bool(s0.hist.has_prev)
    np.testing.assert_allclose(np.asarray(p2), np.asarray(p0), atol=1e-5)
    with pytest.raises(T.DecodeError, match="batch_chunk must be >= 0"):
        T.decode(cfg, c.params, codes, noise, batch_chunk=-1)


# torch F.interpolate(x, size=(4, 4), mode="bicubic", align_corners=False) of
# x = arange(84).reshape(1, 2, 7, 6) ** 1.5 / 50 (computed with the reference's torch)
_TORCH_BICUBIC = [
    [[0.077395, 0.143463, 0.239089, 0.34724], [0.955221, 1.124484, 1.312886, 1.50057],
     [2.233163, 2.454891, 2.696369, 2.932512], [4.042885, 4.311623, 4.601348, 4.8821]],
    [[5.832253, 6.135273, 6.460428, 6.774156], [8.198646, 8.537708, 8.900268, 9.248928],
     [10.527487, 10.895649, 11.288486, 11.665507], [13.364641, 13.76291, 14.187137, 14.59361]]]


def test_output_resolution_resize_is_torch_bicubic():
    x = (np.arange(84, dtype=np.float32).reshape(1, 2, 7, 6) ** 1.5) / 50.0
    y = resize_bicubic(jnp.asarray(x.transpose(0, 2, 3, 1)), (4, 4))
    np.testing.assert_allclose(np.asarray(y).transpose(0, 3, 1, 2)[0], _TORCH_BICUBIC, atol=2e-5)
    cfg = dataclasses.replace(T.tiny_config(), output_resolution=16)
    img = jnp.ones((1, 32, 32, 3))
    np.testing.assert_allclose(np.asarray(T.postprocess(cfg, img)), 1.0, atol=1e-6)
    assert T.postprocess(cfg, img).shape == (1, 16, 16, 3)
    assert T.postprocess(T.tiny_config(), img).shape == (1, 32, 32, 3)
