"""Rematerialisation policies: one config string names what the backward pass keeps.

``model.remat`` of a run config (``GPTConfig.remat``, ``TokenizerConfig.remat``) is

``"none"``    no rematerialisation: everything the backward pass needs is kept;
``"full"``    each block keeps only its input and recomputes everything (least memory, a full
              extra forward pass);
``"dots"``    keep every matmul output without batch dimensions (``jax.checkpoint_policies.
              dots_with_no_batch_dims_saveable``), recompute the rest;
``"a,b,..."`` keep exactly the named activations (``save_only_these_names``) and recompute the
              rest; the names are the ``checkpoint_name`` tags the models put on their matmul
              outputs (:data:`NAMES`).

Saving the outputs whose recomputation costs matmuls (projections, MLP inputs) and recomputing
the cheap element-wise work in between gives most of full remat's memory saving for a few
percent more FLOPs: ``dar_jax.aot`` reports both (``hbm_per_chip_gib``, ``remat_overhead``).

A program that rematerialises is compiled with :func:`compiler_options`: on CPU, XLA's default
scheduler orders for concurrency and runs every block's recomputation as soon as its inputs
exist, at the start of the backward pass, so all blocks' activations are live at once and remat
saves nothing (tokenizer v1, batch 2: 7.93 GiB of temporaries with "full", 7.96 without).
"""
from __future__ import annotations

from typing import Callable

import jax
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

NAMES = {
    "qkv": "query / key / value projections (B, L, H, Dh)",
    "context": "attention outputs before the output projection (B, L, H, Dh)",
    "attn_out": "attention output projection (B, L, D)",
    "mlp_hidden": "MLP input projections (SwiGLU w1 and w3, MLP fc1) (B, L, F)",
    "mlp_out": "MLP output projection (B, L, D)",
    "adaln": "adaLN modulation of the diffusion decoder (B, L, 6 D)",
    "cross_q": "the decoder's cross-attention queries and outputs (B, L, H, Dh)",
}
POLICIES = ("none", "full", "dots")

name = checkpoint_name  # tag an activation: ``x = remat.name(x, "qkv")``


def canonical(policy: str | bool | None) -> str:
    """Normalised policy string (bool: True -> "full", False/None -> "none"); raises ValueError
    naming the problem for an unknown policy or name."""
    if policy is None or policy is False:
        return "none"
    if policy is True:
        return "full"
    text = str(policy).strip().lower()
    if text in ("", "false", "0"):
        return "none"
    if text in ("true", "1"):
        return "full"
    if text in POLICIES:
        return text
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in NAMES]
    if not names or unknown:
        raise ValueError(f"unknown remat policy {policy!r}: expected one of {list(POLICIES)} or a "
                         f"comma-separated list of names from {sorted(NAMES)}")
    return ",".join(sorted(set(names)))


def jax_policy(policy: str) -> Callable | None:
    """The ``jax.checkpoint`` policy of a canonical policy string (None: save nothing)."""
    if policy == "full":
        return None
    if policy == "dots":
        return jax.checkpoint_policies.dots_with_no_batch_dims_saveable
    return jax.checkpoint_policies.save_only_these_names(*policy.split(","))


def compiler_options(policy: str, platform: str) -> dict | None:
    """XLA options of a program trained under ``policy`` on ``platform`` (jax.jit's
    ``compiler_options``): on CPU with remat, XLA's memory-optimized scheduler, which runs each
    block's recomputation next to its backward pass; None otherwise (TPU and GPU schedulers
    already order for memory)."""
    if platform == "cpu" and canonical(policy) != "none":
        return {"xla_cpu_scheduler_type": "CPU_SCHEDULER_TYPE_MEMORY_OPTIMIZED"}
    return None


def remat(fn: Callable, policy: str) -> Callable:
    """``fn(module, *args)`` rematerialised under ``policy`` (``fn`` itself for "none")."""
    policy = canonical(policy)
    if policy == "none":
        return fn
    return nnx.remat(fn, policy=jax_policy(policy))
