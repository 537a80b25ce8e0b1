"""Shared building blocks: attention (all masks, implementation switch), RoPE, norms, MLPs."""
from dar_jax.nn.attention import AttentionError, attention, mask_array, xla_attention
from dar_jax.nn.layers import (KeySplitter, LayerNorm, Mlp, RMSNorm, SwiGLU, dropout, layer_norm,
                               linear, param, rms_norm, swiglu_hidden, with_axes)
from dar_jax.nn.rope import (apply_rope, concat_tables, identity_table, rope_1d_table,
                             rope_2d_table)
