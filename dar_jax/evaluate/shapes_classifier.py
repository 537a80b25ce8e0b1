"""An independent judge of the synthetic-shapes samples: a small CNN, written with plain
``jax.lax`` convolutions and optax, sharing no code with the generator (no dar_jax.nn, no model
code). It classifies an image's shape/colour class and gives 128-d features for a Frechet
distance between real and generated images.

    params = load("models/shape_classifier.npz")
    labels = predict(params, images)                # images (N, H, W, 3) in [-1, 1]
    feats = features(params, images)                # (N, 128)
"""
from __future__ import annotations

import numpy as np
import jax
import jax.numpy as jnp
import optax

WIDTHS = (32, 64, 128)


def init(key: jax.Array, num_classes: int) -> dict:
    params, cin = {}, 3
    for i, w in enumerate(WIDTHS):
        key, sub = jax.random.split(key)
        params[f"conv{i}"] = jax.random.normal(sub, (3, 3, cin, w)) * np.sqrt(2.0 / (9 * cin))
        params[f"bias{i}"] = jnp.zeros((w,))
        cin = w
    key, sub = jax.random.split(key)
    params["head"] = jax.random.normal(sub, (cin, num_classes)) * np.sqrt(1.0 / cin)
    params["head_bias"] = jnp.zeros((num_classes,))
    return params


def features(params: dict, images: jax.Array) -> jax.Array:
    """images (N, H, W, 3) in [-1, 1] -> (N, 128) globally pooled features."""
    x = jnp.asarray(images, jnp.float32)
    for i in range(len(WIDTHS)):
        x = jax.lax.conv_general_dilated(x, params[f"conv{i}"], (1, 1), "SAME",
                                         dimension_numbers=("NHWC", "HWIO", "NHWC"))
        x = jax.nn.relu(x + params[f"bias{i}"])
        if i < len(WIDTHS) - 1:
            x = jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, 2, 2, 1), (1, 2, 2, 1), "VALID")
    return x.mean(axis=(1, 2))


def logits(params: dict, images: jax.Array) -> jax.Array:
    return features(params, images) @ params["head"] + params["head_bias"]


_logits = jax.jit(logits)
_features = jax.jit(features)


def predict(params: dict, images, batch_size: int = 256) -> np.ndarray:
    images = np.asarray(images, np.float32)
    return np.concatenate([np.asarray(jnp.argmax(_logits(params, images[i:i + batch_size]), -1))
                           for i in range(0, len(images), batch_size)])


def feature_batches(params: dict, images, batch_size: int = 256) -> np.ndarray:
    images = np.asarray(images, np.float32)
    return np.concatenate([np.asarray(_features(params, images[i:i + batch_size]))
                           for i in range(0, len(images), batch_size)])


def train(images_fn, num_classes: int, steps: int = 1500, batch_size: int = 64, lr: float = 1e-3,
          seed: int = 0) -> dict:
    """Trains on batches ``images_fn(step) -> (images (B, H, W, 3) in [-1, 1], labels (B,))``."""
    params = init(jax.random.key(seed), num_classes)
    tx = optax.adam(lr)
    opt = tx.init(params)

    @jax.jit
    def step(params, opt, x, y):
        loss, grads = jax.value_and_grad(
            lambda p: optax.softmax_cross_entropy_with_integer_labels(logits(p, x), y).mean())(params)
        updates, opt = tx.update(grads, opt)
        return optax.apply_updates(params, updates), opt, loss

    for i in range(steps):
        x, y = images_fn(i)
        params, opt, _ = step(params, opt, jnp.asarray(x), jnp.asarray(y))
    return params


def real_images(split: str, n: int, size: int, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """The first ``n`` real synthetic images of ``split`` as (images (n, H, W, 3) in [-1, 1], labels)."""
    from dar_jax import data
    from dar_jax.data.augment import to_float
    src = data.make_source({"kind": "synthetic", "image_size": size, "num_classes": num_classes}, split)
    examples = [src[i] for i in range(n)]
    return (to_float(np.stack([e["image"] for e in examples])),
            np.asarray([e["label"] for e in examples]))


def save(path: str, params: dict) -> None:
    np.savez(path, **{k: np.asarray(v) for k, v in params.items()})


def load(path: str) -> dict:
    with np.load(path) as z:
        return {k: jnp.asarray(z[k]) for k in z.files}
