"""Cheap FID / IS during training (small N), logged like the other metrics.

The AR task scores samples against a reference file; the tokenizer task scores reconstructions
against the originals (rFID). Small-N FID is biased upwards: compare runs at the same N only.
"""
from __future__ import annotations

import numpy as np

from dar_jax.evaluate import inception as inc
from dar_jax.evaluate import metrics


class SmallFID:
    def __init__(self, inception_path: str, reference_path: str = "", protocol: str = "adm",
                 batch_size: int = 50):
        self.extract = inc.feature_extractor(inc.InceptionConfig(protocol=protocol),
                                             inc.load_params(inception_path), batch_size=batch_size)
        self.ref = (metrics.read_reference(reference_path, self.extract, expected_dim=2048)
                    if reference_path else None)

    def __call__(self, images_uint8: np.ndarray, reference_uint8: np.ndarray | None = None,
                 prefix: str = "") -> dict:
        feats = self.extract(images_uint8)
        out = {f"{prefix}inception_score": metrics.inception_score(feats.logits, split_size=len(feats.logits))}
        ref = self.ref
        if reference_uint8 is not None:
            ref = metrics.compute_stats(self.extract(reference_uint8).pool3)
        if ref is not None:
            out[f"{prefix}fid"] = metrics.frechet_distance(metrics.compute_stats(feats.pool3), ref)
        return out
