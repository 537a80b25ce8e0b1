"""Config of the sequential diffusion tokenizer.

The field names are exactly the keys the reference (showlab/D-AR ``VQModel`` and
``SequentialDiffusionDecoder``) reads from its model config, so a reference config builds a
:class:`TokenizerConfig` with :func:`dar_jax.config.from_mapping` and any other key is an error.
Defaults are the reference's defaults for optional keys and tokenizer v1's sizes for the others
(``TokenizerConfig()`` is tokenizer v1). A few fields exist only in dar-jax; they are marked.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping


from dar_jax.nn.layers import DTYPES
from dar_jax.errors import DarError
from dar_jax.config import ConfigError, from_mapping
from dar_jax.nn.remat import canonical as remat_canonical

HEAD_DIM = 64            # fixed in the reference (TransformerBlock / SiTBlock head_dim)
ROPE_AXES = (32, 32)     # Flux-style 2D RoPE split of a 64-wide head (rows, columns)
LOW_RANK = 8             # width of the low-rank query table (fixed in the reference)
QUERY_TABLE = 1024       # rows of the query / decoder position tables (fixed in the reference)
USAGE_BUFFER = 65536     # length of the reference's codebook-usage buffer
REPA_HIDDEN = 2048       # REPA projector: dim -> 2048 -> 2048 -> REPA_OUT
REPA_OUT = 768


@dataclasses.dataclass(frozen=True)
class DiffDecoderConfig:
    """``diff_decoder`` sub-config: the pixel flow-matching transformer (defaults: the reference's
    for optional keys, e.g. data_std 1 and time_shift 1; tokenizer v1 sets 0.6 and 2)."""
    in_dim: int = 3
    out_dim: int = 3
    dim: int = 768
    cond_dim: int = 768
    patch_size: int = 8
    depth: int = 12
    data_std: float = 1.0
    time_shift: float = 1.0
    mlp_head: bool = False
    share_time_encoding: bool = False
    rope_base_len: float = 10000.0
    repa_layer: int = 8
    grad_checkpointing: bool = True
    cfg: float = 1.0             # read by the reference, never used by its sampler

    def __post_init__(self):
        for name in ("data_std", "time_shift", "rope_base_len", "cfg"):
            object.__setattr__(self, name, float(getattr(self, name)))
        if self.in_dim != 3 or self.out_dim != 3:
            raise ConfigError(f"diff_decoder in_dim/out_dim must be 3 (RGB pixels), got "
                              f"{self.in_dim}/{self.out_dim}")
        if self.dim % HEAD_DIM:
            raise ConfigError(f"diff_decoder.dim {self.dim} is not a multiple of the head size {HEAD_DIM}")
        for name in ("dim", "cond_dim", "patch_size", "depth"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"diff_decoder.{name} must be positive, got {getattr(self, name)}")
        if self.mlp_head and not self.share_time_encoding:
            raise ConfigError("diff_decoder mlp_head: true needs share_time_encoding: true (the "
                              "reference's final layer takes the shared time embedding)")
        if self.data_std <= 0 or self.time_shift <= 0:
            raise ConfigError("diff_decoder data_std and time_shift must be positive")


@dataclasses.dataclass(frozen=True)
class TokenizerConfig:
    """Sizes and options of the D-AR tokenizer (reference keys; dar-jax-only fields last)."""
    encoder_patch_size: int = 16
    num_encoder_layers: int = 8
    num_decoder_layers: int = 8
    query_low_rank: bool = True
    encoder_dim: int = 768
    decoder_dim: int = 768
    vq_dim: int = 8
    vq_codebook_size: int = 16384
    num_denoising_steps: int = 8
    num_query_groups: int = 8
    num_all_queries: int = 256
    queries_per_step: int | None = None     # default num_all_queries // num_query_groups
    vq_enable: bool = True
    sampling_resolution: int = 256
    output_resolution: int = 0
    rope_base_len: float = 10000.0
    diff_decoder: DiffDecoderConfig = dataclasses.field(         # tokenizer v1's decoder
        default_factory=lambda: DiffDecoderConfig(data_std=0.6, time_shift=2.0))
    # --- dar-jax only ---
    dtype: str = "float32"                  # compute dtype; parameters are always float32
    attention_impl: str = "auto"            # see dar_jax.nn.attention
    repa_projector: bool = False            # create the REPA projector (training with REPA)
    # initialisation for training from scratch (no effect on loaded weights): the std of the SiT
    # blocks' adaLN modulation weights. 0 = zero init as the reference (DiT style); small runs
    # need a little (e.g. 0.02): with zero the condition reaches the loss only through products
    # of zero-initialised weights, and the codes collapse to one per position for a long time.
    adaln_init_std: float = 0.0
    # training remat policy of every block (dar_jax.nn.remat: none | full | dots | names);
    # "" follows the reference's diff_decoder.grad_checkpointing (full when true, else none)
    remat: str = ""

    def __post_init__(self):
        if isinstance(self.diff_decoder, Mapping):
            object.__setattr__(self, "diff_decoder",
                               from_mapping(DiffDecoderConfig, self.diff_decoder,
                                            where="tokenizer config.diff_decoder"))
        object.__setattr__(self, "rope_base_len", float(self.rope_base_len))
        if self.queries_per_step is None:
            object.__setattr__(self, "queries_per_step",
                               self.num_all_queries // max(self.num_query_groups, 1))
        if not self.vq_enable:
            raise ConfigError("vq_enable: false (the reference's LayerNorm bottleneck instead of "
                              "vector quantisation) is not supported by dar-jax")
        if self.dtype not in DTYPES:
            raise ConfigError(f"tokenizer dtype {self.dtype!r} not in {sorted(DTYPES)}")
        for name in ("encoder_patch_size", "num_encoder_layers", "encoder_dim", "decoder_dim",
                     "vq_dim", "vq_codebook_size", "num_denoising_steps", "num_query_groups",
                     "num_all_queries", "queries_per_step", "sampling_resolution"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"tokenizer {name} must be positive, got {getattr(self, name)}")
        if self.num_decoder_layers < 0 or self.output_resolution < 0:
            raise ConfigError("tokenizer num_decoder_layers and output_resolution must be >= 0")
        for name in ("encoder_dim", "decoder_dim"):
            if getattr(self, name) % HEAD_DIM:
                raise ConfigError(f"tokenizer {name} {getattr(self, name)} is not a multiple of "
                                  f"the head size {HEAD_DIM}")
        if self.num_all_queries > QUERY_TABLE:
            raise ConfigError(f"num_all_queries {self.num_all_queries} exceeds the query table "
                              f"({QUERY_TABLE} rows)")
        if self.queries_per_step > self.num_all_queries:
            raise ConfigError(f"queries_per_step {self.queries_per_step} exceeds num_all_queries "
                              f"{self.num_all_queries}")
        if self.remat:
            try:
                object.__setattr__(self, "remat", remat_canonical(self.remat))
            except ValueError as e:
                raise ConfigError(f"tokenizer {e}") from None
        if self.diff_decoder.cond_dim != self.decoder_dim:
            raise ConfigError(f"diff_decoder.cond_dim {self.diff_decoder.cond_dim} must equal "
                              f"decoder_dim {self.decoder_dim}")

    # --- derived sizes -----------------------------------------------------------------------
    @property
    def compute_dtype(self):
        return DTYPES[self.dtype]

    @property
    def remat_policy(self) -> str:
        """The remat policy training uses (``remat``, or the reference's grad_checkpointing)."""
        if self.remat:
            return self.remat
        return "full" if self.diff_decoder.grad_checkpointing else "none"

    @property
    def data_std(self) -> float:
        return self.diff_decoder.data_std

    @property
    def time_shift(self) -> float:
        return self.diff_decoder.time_shift

    def check_image_size(self, height: int, width: int) -> None:
        for p, what in ((self.encoder_patch_size, "encoder"), (self.diff_decoder.patch_size, "decoder")):
            if height % p or width % p:
                raise ImageSizeError(f"image size {height}x{width} is not a multiple of the {what} "
                                     f"patch size {p}")


class TokenizerInputError(DarError, ValueError):
    """Images or codes the tokenizer cannot take (shape, channels, range, codebook)."""


class ImageSizeError(TokenizerInputError):
    """An image whose size the tokenizer cannot patchify."""


def tokenizer_config(mapping: Mapping[str, Any] | None = None, **overrides: Any) -> TokenizerConfig:
    """A config from a (reference) mapping plus overrides; unknown keys raise ConfigError."""
    merged = dict(mapping or {})
    for k, v in overrides.items():
        if k == "diff_decoder" and isinstance(v, Mapping):
            merged["diff_decoder"] = {**dict(merged.get("diff_decoder") or {}), **v}
        else:
            merged[k] = v
    return from_mapping(TokenizerConfig, merged, where="tokenizer config")


def tiny_config(**overrides: Any) -> TokenizerConfig:
    """A CPU-sized tokenizer (32 px) for tests and smoke runs."""
    base = dict(encoder_patch_size=8, num_encoder_layers=2, num_decoder_layers=2, encoder_dim=128,
                decoder_dim=128, vq_dim=8, vq_codebook_size=64, num_denoising_steps=4,
                num_query_groups=4, num_all_queries=32, queries_per_step=8, sampling_resolution=32,
                diff_decoder=dict(dim=128, cond_dim=128, patch_size=4, depth=2, data_std=0.6,
                                  time_shift=2.0))
    return tokenizer_config(base, **overrides)
