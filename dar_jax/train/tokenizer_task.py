"""Training the sequential diffusion tokenizer on the one trainer.

Per image: a time t ~ U(0, 1), its token window (from the unshifted t), the flow-matching loss
of the decoder's velocity, the codebook + commitment (+ optional entropy) losses over the
queries up to the end of the window, and the one-step prediction (x_t + (1 - t) v) / std for
LPIPS; REPA aligns the decoder's hidden state with frozen DINOv2 patch tokens; an optional
time-conditioned PatchGAN (its own optimizer, from a configured step). EMA of the parameters,
codebook-usage statistics, and periodic reconstruction PSNR / SSIM, usage, dead codes, a
reconstruction grid and a preview strip on a held-out split.
"""
from __future__ import annotations

import dataclasses
import logging
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax

from dar_jax import tokenizer as tok
from dar_jax.config import ConfigError, as_plain, from_mapping
from dar_jax import io
from dar_jax.evaluate.metrics import psnr, ssim
from dar_jax.pipeline import to_uint8
from dar_jax.tokenizer import flow, quantizer
from dar_jax.tokenizer.config import USAGE_BUFFER
from dar_jax.perceptual import gan
from dar_jax.train.loop import Task

log = logging.getLogger(__name__)


def tokenizer_config_from_run(model_section) -> tok.TokenizerConfig:
    return tok.tokenizer_config(as_plain(model_section))


def entropy_loss(z_norm: jax.Array, codebook: jax.Array, temperature: float = 0.01) -> jax.Array:
    """The reference's entropy term (weight 0 in the released recipe): per-sample entropy of the
    softmax over code affinities minus the entropy of their batch mean."""
    emb = quantizer.l2_normalize(codebook)
    flat = z_norm.reshape(-1, z_norm.shape[-1])
    d = (jnp.sum(flat ** 2, -1, keepdims=True) + jnp.sum(emb ** 2, -1) - 2.0 * flat @ emb.T)
    logits = -d / temperature
    probs = jax.nn.softmax(logits, -1)
    log_probs = jax.nn.log_softmax(logits + 1e-5, -1)
    avg = probs.mean(0)
    return -jnp.mean(jnp.sum(probs * log_probs, -1)) + jnp.sum(avg * jnp.log(avg + 1e-5))


@dataclasses.dataclass(frozen=True)
class LossConfig:
    codebook_weight: float = 1.0
    commit_beta: float = 0.25
    entropy_weight: float = 0.0
    perceptual_weight: float = 0.5
    repa_weight: float = 0.5
    # dar-jax: for the first steps the decoder sees the continuous latents (no quantisation, no
    # VQ losses), so that the encoder learns an informative latent before codes are picked; the
    # reference has no such phase (0 = off). Small CPU runs need it: at initialisation the
    # encoder's queries carry almost no image information and every image gets the same codes.
    vq_warmup_steps: int = 0
    # dar-jax: every N steps, codes absent from the usage buffer (the recent codes) are moved
    # onto random latents of the current batch ("random restart"); 0 = off, as the reference
    dead_code_restart_every: int = 0


@dataclasses.dataclass(frozen=True)
class GanConfig:
    enabled: bool = False
    start_step: int = 20000
    weight: float = 0.5
    t_weighting: bool = True
    lr: float = 2e-4
    b1: float = 0.9
    b2: float = 0.95
    ndf: int = 64
    n_layers: int = 3


class TokenizerTask(Task):
    family = tok.FAMILY

    def __init__(self, cfg, abstract_perceptual: bool = False):
        """``abstract_perceptual``: LPIPS and (with ``model.repa_projector``) DINOv2 ViT-B/14 with
        abstract weights, whatever ``cfg.perceptual`` names (compiling the step without weight
        files: ``dar_jax.aot``)."""
        self.cfg = cfg
        self.model_cfg = tokenizer_config_from_run(cfg.model)
        self.loss_cfg = from_mapping(LossConfig, as_plain(cfg.loss), where="loss")
        self.gan_cfg = from_mapping(GanConfig, as_plain(cfg.gan), where="gan")
        p = cfg.perceptual
        dc = self.model_cfg.diff_decoder
        if self.model_cfg.repa_projector and not 0 <= dc.repa_layer < dc.depth:
            raise ConfigError(f"model.diff_decoder.repa_layer {dc.repa_layer} must name one of the "
                              f"{dc.depth} diffusion blocks (0..{dc.depth - 1}): REPA aligns "
                              "that block's features")
        self.lpips = self.dino = None
        if abstract_perceptual:
            from dar_jax.perceptual import dinov2, lpips
            self.lpips = lpips.abstract_params()
            if self.model_cfg.repa_projector:
                dcfg = dinov2.dinov2_config("vitb14")
                self.dino = (dcfg, dinov2.abstract_params(dcfg))
        elif p.lpips_vgg or p.lpips_heads:
            if not (p.lpips_vgg and p.lpips_heads):
                raise ConfigError("LPIPS needs both perceptual.lpips_vgg and perceptual.lpips_heads")
            from dar_jax.perceptual.lpips import load_lpips
            self.lpips = load_lpips(p.lpips_vgg, p.lpips_heads)
        else:
            log.info("LPIPS loss off: perceptual.lpips_vgg / lpips_heads not configured")
        if abstract_perceptual:
            pass
        elif p.dinov2:
            from dar_jax.perceptual.dinov2 import load_dinov2
            self.dino = load_dinov2(p.dinov2)
            if not self.model_cfg.repa_projector:
                raise ConfigError("REPA is configured (perceptual.dinov2) but model.repa_projector is false")
        else:
            log.info("REPA loss off: perceptual.dinov2 not configured")
        self.disc_cfg = gan.DiscriminatorConfig(ndf=self.gan_cfg.ndf, n_layers=self.gan_cfg.n_layers)
        if self.gan_cfg.enabled:
            self.disc_tx = optax.adamw(self.gan_cfg.lr, b1=self.gan_cfg.b1, b2=self.gan_cfg.b2,
                                       weight_decay=0.0)
        self.workdir = None
        self._eval_batch = None

    # --- model -----------------------------------------------------------------------------------
    def init_extra(self, key, params):
        extra = {"usage": jnp.full((USAGE_BUFFER,), self.model_cfg.vq_codebook_size, jnp.int32)}
        if self.gan_cfg.enabled:
            disc = gan.init_params(self.disc_cfg, key)
            extra["disc"] = disc
            extra["disc_opt"] = self.disc_tx.init(disc)
        return extra

    def consts(self):
        out = {}
        if self.lpips is not None:
            out["lpips"] = self.lpips
        if self.dino is not None:
            out["dino"] = self.dino[1]
        return out

    # --- losses ----------------------------------------------------------------------------------
    def losses(self, params, images, flow_batch, consts, disc_params, step, target):
        """All generator terms for one batch; returns (total, (metrics, codes, fake))."""
        cfg, loss_cfg = self.model_cfg, self.loss_cfg
        q = tok.encode_latents(cfg, params, images, target=target)
        vq, commit = quantizer.vq_losses(q, flow_batch.query_end, loss_cfg.commit_beta)
        codebook_terms = vq + commit
        quant = q.quant
        if loss_cfg.vq_warmup_steps:
            quantized = step >= loss_cfg.vq_warmup_steps
            quant = jnp.where(quantized, q.quant, q.z_norm)
            codebook_terms = codebook_terms * quantized.astype(jnp.float32)
        metrics = {"vq_loss": vq, "commit_loss": commit}
        if loss_cfg.entropy_weight:
            ent = entropy_loss(q.z_norm, params["codebook"])
            codebook_terms = codebook_terms + loss_cfg.entropy_weight * ent
            metrics["entropy_loss"] = ent
        cond = tok.quant_to_cond(cfg, params, quant, target=target)
        window = flow.gather_window(cond, flow_batch.start, cfg.queries_per_step)
        use_repa = self.dino is not None
        out = tok.velocity(cfg, params, flow_batch.x_t, flow_batch.t, window, return_repa=use_repa, target=target)
        v, h_repa = out if use_repa else (out, None)
        fm = flow.flow_matching_loss(v, flow_batch.target, cfg.data_std)
        fake = flow.predict_data(flow_batch.x_t, v, flow_batch.t, cfg.data_std)
        total = loss_cfg.codebook_weight * codebook_terms + fm
        metrics["fm_loss"] = fm
        if self.lpips is not None:
            from dar_jax.perceptual.lpips import lpips
            # the VGG convolutions in the model's compute dtype (bf16 for the v1 recipe, as under
            # the reference's autocast); normalisation and heads stay float32
            p_loss = jnp.mean(lpips(consts["lpips"], images, fake, dtype=jnp.dtype(cfg.dtype)))
            total = total + abs(loss_cfg.perceptual_weight) * p_loss
            metrics["perceptual_loss"] = p_loss
        if use_repa:
            from dar_jax.perceptual import dinov2
            dcfg = self.dino[0]
            target = jax.lax.stop_gradient(
                dinov2.patch_tokens(dcfg, consts["dino"], dinov2.repa_preprocess(images), target))
            r_loss = dinov2.repa_loss(h_repa, target)
            total = total + loss_cfg.repa_weight * r_loss
            metrics["repa_loss"] = r_loss
        if disc_params is not None:
            adv = gan.g_loss(gan.apply(self.disc_cfg, jax.lax.stop_gradient(disc_params), fake, flow_batch.t))
            on = (step >= self.gan_cfg.start_step).astype(jnp.float32)
            total = total + on * self.gan_cfg.weight * adv
            metrics["gen_adv_loss"] = adv
        return total, (metrics, q.codes, fake, q.z_norm)

    def loss(self, params, batch, key, consts, step, target, extra):
        """The generator's loss on a flow batch drawn from this step's key (first half)."""
        flow_batch = flow.sample_flow_batch(self.model_cfg, batch["image"], jax.random.split(key)[0])
        total, (metrics, codes, fake, z_norm) = self.losses(
            params, batch["image"], flow_batch, consts, extra.get("disc"), step, target)
        return total, (metrics, codes, fake, z_norm, flow_batch)

    def after_update(self, params, extra, batch, aux, key, step):
        """Dead-code restarts of the updated codebook, the discriminator's step (from
        ``gan.start_step``) and the codebook-usage statistic (second half of the key)."""
        cfg = self.model_cfg
        metrics, codes, fake, z_norm, flow_batch = aux
        images = batch["image"]
        extra = dict(extra)
        every = self.loss_cfg.dead_code_restart_every
        if every:
            restart = ((step + 1) % every == 0) & (step >= self.loss_cfg.vq_warmup_steps)
            params = dict(params, codebook=quantizer.restart_dead_codes(
                params["codebook"], extra["usage"], z_norm, jax.random.fold_in(key, 7), restart))
        disc = extra.get("disc")
        if disc is not None:
            weight = flow_batch.t if self.gan_cfg.t_weighting else None
            fake_sg = jax.lax.stop_gradient(fake)

            def d_objective(dp):
                real = gan.apply(self.disc_cfg, dp, images, flow_batch.t)
                fake_l = gan.apply(self.disc_cfg, dp, fake_sg, flow_batch.t)
                return gan.d_loss(real, fake_l, weight), (real.mean(), fake_l.mean())

            (d_loss, (lr_, lf_)), d_grads = jax.value_and_grad(d_objective, has_aux=True)(disc)
            d_updates, d_opt = self.disc_tx.update(d_grads, extra["disc_opt"], disc)
            on = step >= self.gan_cfg.start_step
            extra["disc"] = jax.tree.map(lambda new_, old: jnp.where(on, new_, old),
                                         optax.apply_updates(disc, d_updates), disc)
            extra["disc_opt"] = jax.tree.map(lambda new_, old: jnp.where(on, new_, old), d_opt, extra["disc_opt"])
            metrics = dict(metrics, disc_loss=d_loss, logits_real=lr_, logits_fake=lf_)
        extra["usage"], usage = quantizer.update_usage(extra["usage"], codes, jax.random.split(key)[1],
                                                       cfg.vq_codebook_size)
        return params, extra, dict(metrics, codebook_usage=usage,
                                   dead_code_rate=quantizer.dead_code_rate(codes))

    # --- data ------------------------------------------------------------------------------------
    def make_data(self, *, split, process_index, process_count, purpose="tokenizer"):
        from dar_jax import data
        return data.make_dataset(self.cfg.data, split=split if purpose != "eval" else None,
                                 global_batch_size=int(self.cfg.train.global_batch_size),
                                 seed=int(self.cfg.train.seed), process_index=process_index,
                                 process_count=process_count, purpose=purpose).iterator()

    def prepare_batch(self, batch):
        return {"image": np.asarray(batch["image"], np.float32)}

    def abstract_batch(self, global_batch):
        size = int(self.cfg.data.image_size)
        return {"image": jax.ShapeDtypeStruct((global_batch, size, size, 3), np.float32)}

    def flops_per_example(self):
        return tokenizer_train_flops_per_example(self.model_cfg, int(self.cfg.data.image_size))

    def tokens_per_example(self):
        return self.model_cfg.num_all_queries

    # --- evaluation ------------------------------------------------------------------------------
    def eval_images(self) -> np.ndarray:
        """A fixed held-out batch (the first ``eval.num_images`` of the eval split)."""
        if self._eval_batch is None:
            from dar_jax import data
            n = int(self.cfg.eval.num_images)
            pipe = data.make_dataset(self.cfg.data, global_batch_size=n, seed=0, purpose="eval",
                                     process_index=0, process_count=1)
            it = pipe.iterator()
            batch = next(it)
            it.close()
            self._eval_batch = np.asarray(batch["image"], np.float32)[np.asarray(batch["mask"], bool)]
        return self._eval_batch

    def evaluate(self, state, step, writer, target):
        """Reconstructs the held-out images with the (EMA) params where they are (sharded on
        the trainer's mesh, possibly over several hosts): every process takes part and gets the
        same metrics; process 0 writes the grids."""
        from dar_jax import parallel
        cfg = self.model_cfg
        params = state["ema"] if "ema" in state else state["params"]
        images = self.eval_images()
        ev = self.cfg.eval
        steps = int(ev.steps) or None
        key = jax.random.key(int(self.cfg.train.seed))
        div = parallel.batch_divisor(target.mesh, target.rules) if target.sharded else 1

        def pad(x):  # to a multiple of the batch shards (repeating the first row)
            return np.concatenate([x, np.repeat(x[:1], -len(x) % div, 0)])

        def decode(codes, **kw):
            """Decode of host codes (B, N) from the noise of ``key`` (as tok.decode draws it)."""
            h, w = tok.resolution(cfg, images.shape[1:3])
            noise = np.asarray(jax.random.normal(key, (len(codes), h, w, 3), jnp.float32))
            out = tok.decode(cfg, params, parallel.put_batch(pad(codes), target),
                             parallel.put_batch(pad(noise), target), solver=ev.solver,
                             num_steps=steps, target=target, **kw)
            return parallel.gather_to_host(out)[:len(codes)]

        codes = tok.encode(cfg, params, parallel.put_batch(pad(images), target), target=target)
        codes = parallel.gather_to_host(codes)[:len(images)]
        recon = decode(codes)
        out = {"eval_psnr": float(jnp.mean(psnr(recon, images))),
               "eval_ssim": float(jnp.mean(ssim(recon, images))),
               "eval_codebook_usage": float(len(np.unique(codes)) / cfg.vq_codebook_size),
               "eval_dead_code_rate": float(quantizer.dead_code_rate(codes))}
        if ev.inception:  # cheap rFID / IS of the reconstructions against the originals
            from dar_jax.evaluate.training import SmallFID
            if getattr(self, "_fid", None) is None:
                self._fid = SmallFID(ev.inception, "", ev.protocol)
            out.update(self._fid(to_uint8(recon), to_uint8(images), prefix="eval_recon_"))
        if self.workdir:
            previews = [decode(codes[:1], preview_groups=g)
                        for g in range(1, cfg.num_query_groups)] + [recon[:1]]
            if jax.process_index() == 0:
                grid = io.sheet(to_uint8(np.stack([np.asarray(images), np.asarray(recon)])))
                strip = io.sheet(to_uint8(np.concatenate(previews, 0))[None])
                samples = os.path.join(self.workdir, "samples")
                io.makedirs(samples)
                io.save_png(os.path.join(samples, f"recon_{step:07d}.png"), grid)
                io.save_png(os.path.join(samples, f"preview_{step:07d}.png"), strip)
                writer.write_images(step, "eval/reconstructions", grid)
                writer.write_images(step, "eval/previews", strip)
        return out


def _block_flops(tokens: int, d: int, ctx: float) -> float:
    """Forward FLOPs of a pre-LN block: q/k/v/out projections, 4x MLP, attention over ctx keys."""
    return tokens * (2 * 4 * d * d + 2 * 8 * d * d) + 2 * 2 * tokens * ctx * d


def encoder_flops(cfg: tok.TokenizerConfig, image_size: int) -> float:
    """Forward FLOPs of the encoder for one image (patches + queries, prefix-causal)."""
    n_patch = (image_size // cfg.encoder_patch_size) ** 2
    tokens = n_patch + cfg.num_all_queries
    return cfg.num_encoder_layers * _block_flops(tokens, cfg.encoder_dim, tokens)


def diffusion_flops(cfg: tok.TokenizerConfig, height: int, width: int | None = None) -> float:
    """Forward FLOPs of one evaluation of the diffusion decoder for one image."""
    dd, p = cfg.diff_decoder.dim, cfg.diff_decoder.patch_size
    n_pix = (height // p) * ((width or height) // p)
    per_sit = (_block_flops(n_pix, dd, n_pix) + n_pix * (2 * 2 * dd * dd + 2 * 6 * dd * dd)
               + 2 * 2 * n_pix * cfg.queries_per_step * dd)
    return cfg.diff_decoder.depth * per_sit + n_pix * 2 * 2 * (3 * p * p) * dd


def tokenizer_train_flops_per_example(cfg: tok.TokenizerConfig, image_size: int) -> float:
    """Forward + backward matmul FLOPs of one training example (encoder, decoder layers, one
    velocity evaluation; attention included)."""
    n_q = cfg.num_all_queries
    fl = encoder_flops(cfg, image_size)
    fl += cfg.num_decoder_layers * _block_flops(n_q, cfg.decoder_dim, n_q / 2)
    fl += diffusion_flops(cfg, image_size)
    return 3.0 * fl
