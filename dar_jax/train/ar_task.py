"""Training the AR model: next-token cross-entropy over the image tokens of a class label.

Tokens come from pre-extracted code shards (``data.kind = "codes"``) or are computed on the fly
from images by a frozen tokenizer inside the compiled step (``tokenizer.checkpoint`` set).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax

from dar_jax import ar
from dar_jax.config import ConfigError, as_plain
from dar_jax.train.loop import Task


def gpt_config_from_run(model_section) -> ar.GPTConfig:
    """``config.model`` (``size`` = GPT-B/L/XL or empty, plus any GPTConfig field) -> GPTConfig."""
    fields = dict(as_plain(model_section))
    size = fields.pop("size", None) or None
    return ar.gpt_config(size, **fields)


def gpt_train_flops_per_example(cfg: ar.GPTConfig) -> float:
    """Forward + backward FLOPs of one sequence (matmuls incl. output head, causal attention)."""
    seq = cfg.block_size  # class token + block_size - 1 input tokens
    per_layer = 2 * cfg.dim * 3 * cfg.dim + 2 * cfg.dim * cfg.dim + 2 * 3 * cfg.dim * cfg.ffn_hidden
    matmul = seq * (cfg.n_layer * per_layer + 2 * cfg.dim * cfg.vocab_size)
    attention = cfg.n_layer * 2 * 2 * cfg.dim * seq * (seq + 1) / 2
    return 3.0 * (matmul + attention)


class ARTask(Task):
    family = ar.FAMILY

    def __init__(self, cfg, tokenizer=None):
        """``tokenizer``: (TokenizerConfig, params) to tokenize images with instead of loading
        ``cfg.tokenizer.checkpoint`` (params may be ShapeDtypeStructs: ``dar_jax.aot``)."""
        self.cfg = cfg
        self.model_cfg = gpt_config_from_run(cfg.model)
        self.tokenizer = None
        tok_path = cfg.tokenizer.checkpoint if "tokenizer" in cfg else ""
        if tokenizer is not None or tok_path:
            from dar_jax import tokenizer as tok
            if tokenizer is not None:
                tok_cfg, tok_params = tokenizer
            else:
                from dar_jax.checkpoint import load_model
                _, tok_cfg, tok_params = load_model(tok_path, tok.FAMILY)
            if tok_cfg.vq_codebook_size != self.model_cfg.vocab_size:
                raise ConfigError(f"tokenizer codebook ({tok_cfg.vq_codebook_size}) != GPT vocab_size "
                                  f"({self.model_cfg.vocab_size})")
            if tok_cfg.num_all_queries != self.model_cfg.block_size:
                raise ConfigError(f"tokenizer emits {tok_cfg.num_all_queries} tokens but GPT "
                                  f"block_size is {self.model_cfg.block_size}")
            self.tokenizer = (tok, tok_cfg, tok_params)

    # --- model -----------------------------------------------------------------------------------
    def consts(self):
        return {"tokenizer": self.tokenizer[2]} if self.tokenizer else {}

    def tokens_of(self, batch, consts, target=None):
        if "tokens" in batch:
            return batch["tokens"]
        if self.tokenizer is None:
            raise ConfigError("the batch holds images but no tokenizer.checkpoint is configured")
        tok, tok_cfg, _ = self.tokenizer
        return jax.lax.stop_gradient(tok.encode(tok_cfg, consts["tokenizer"], batch["image"],
                                                target=target))

    def abstract_batch(self, global_batch):
        out = {"label": jax.ShapeDtypeStruct((global_batch,), np.int32)}
        if self.tokenizer is None or self.cfg.data.kind == "codes":
            out["tokens"] = jax.ShapeDtypeStruct((global_batch, self.model_cfg.block_size), np.int32)
        else:
            size = int(self.cfg.data.image_size)
            out["image"] = jax.ShapeDtypeStruct((global_batch, size, size, 3), np.float32)
        return out

    def loss(self, params, batch, key, consts, step, target, extra):
        tokens = self.tokens_of(batch, consts, target)
        labels = batch["label"]
        logits = ar.forward(self.model_cfg, params, tokens[:, :-1], labels, dropout_key=key,
                            target=target)
        ce = optax.softmax_cross_entropy_with_integer_labels(logits, tokens)
        acc = jnp.mean(jnp.argmax(logits, -1) == tokens)
        return ce.mean(), {"token_accuracy": acc}

    # --- data ------------------------------------------------------------------------------------
    def make_data(self, *, split, process_index, process_count):
        from dar_jax import data
        return data.make_dataset(self.cfg.data, split=split,
                                 global_batch_size=int(self.cfg.train.global_batch_size),
                                 seed=int(self.cfg.train.seed), process_index=process_index,
                                 process_count=process_count, purpose="ar").iterator()

    def prepare_batch(self, batch):
        out = {"label": np.asarray(batch["label"], np.int32)}
        if "tokens" in batch:
            out["tokens"] = np.asarray(batch["tokens"], np.int32)
        else:
            out["image"] = np.asarray(batch["image"], np.float32)
        return out

    def flops_per_example(self):
        """GPT forward + backward, plus the frozen tokenizer's encoder forward when images are
        tokenized in the step (work the step does, so MFU counts it)."""
        flops = gpt_train_flops_per_example(self.model_cfg)
        if self.tokenizer is not None and self.cfg.data.kind != "codes":
            from dar_jax.train.tokenizer_task import encoder_flops
            flops += encoder_flops(self.tokenizer[1], int(self.cfg.data.image_size))
        return flops

    # --- evaluation: cheap FID / IS of samples (eval.fid_num_samples > 0) ------------------------
    def evaluate(self, state, step, writer, target):
        """Samples with the (EMA) params where they are (sharded on the trainer's mesh, possibly
        over several hosts); the images are gathered to every process, which all compute the
        same metrics."""
        ev = self.cfg.eval
        if not ev.fid_num_samples:
            return {}
        if self.tokenizer is None or not ev.inception:
            raise ConfigError("eval.fid_num_samples needs tokenizer.checkpoint and eval.inception")
        from dar_jax import parallel, pipeline
        from dar_jax.evaluate.training import SmallFID
        if getattr(self, "_fid", None) is None:
            self._fid = SmallFID(ev.inception, ev.reference, ev.protocol)
        _, tok_cfg, tok_params = self.tokenizer
        if getattr(self, "_tok_placed", None) is None:
            self._tok_placed = parallel.put_replicated(tok_params, target)
        params = state["ema"] if "ema" in state else state["params"]
        models = pipeline.make_models(self.model_cfg, params, tok_cfg, self._tok_placed)
        opts = pipeline.SampleOptions(cfg_scale=ev.cfg_scale, solver=ev.solver, num_steps=ev.steps or None)
        labels = np.arange(int(ev.fid_num_samples)) % self.model_cfg.num_classes
        images = pipeline.sample_many(models, labels, int(self.cfg.train.seed), opts,
                                      batch_size=int(ev.batch_size), target=target).images
        return self._fid(images, prefix="eval_")

    def tokens_per_example(self):
        return self.model_cfg.block_size
