"""Augmentation matches the reference's PIL functions and torchvision's TenCrop bit for bit.

The expected hashes were computed once by the reference itself (``/tmp/dar_ref/dataset/
augmentation.py`` + torchvision 0.29 ``TenCrop`` / ``ToTensor`` / ``Normalize``, Pillow 13.0) on
the integer test pattern below; ``random_crop_arr`` ran with ``random.randrange`` scripted to
return (size + 7, 3, 5).
"""
from __future__ import annotations

import hashlib

import numpy as np
import pytest

from dar_jax.data import augment

# (height, width, size) -> hashes of: the ten crops after center_crop_arr(int(1.1 * size)),
# center_crop_arr(size), ToTensor+Normalize of crop 7 (HWC float32), random_crop_arr.
REFERENCE = {
    (230, 300, 64): {
        "ten": ["2565db25d3829225", "cbc7c164a5c58022", "16bff952c931bde8", "e7b9ad1ac4d172ec",
                "51f026ec7d3d2475", "8bb776a77740f476", "0d4899ecc5e22b3c", "2a0794741483f6a3",
                "4b9d8ca29d7fed72", "cdbec10d817c6ff7"],
        "eval": "61dff7d41883d7e7", "float": "a1980625779b7638", "rand": "0dd925ab13203296"},
    (40, 50, 32): {
        "ten": ["b780b0309005b2b6", "27da6e3f977d2546", "82e7be45fb372ab3", "b11392ea0efe9365",
                "b67a7aa270172756", "b2332955cc973df1", "8e9bd45cb639063f", "35f66e3a8ef27cc4",
                "ddfd2c6f1bc53015", "d3a48145c4d510bd"],
        "eval": "c3f88a13de43f394", "float": "cb78f0dcdb091e43", "rand": "444539e54d0a15cb"},
    (301, 203, 32): {
        "ten": ["16c9f660c71353bb", "346fa00faa2a6004", "ffe2d3c097c4d45f", "9929073791e25480",
                "9febee319796d47f", "a903fb0dd74ed8f0", "39cd4ffc7a86f522", "16ea38f16b34f5f9",
                "df1b04cc9cc02205", "c9c8f0da49edd5f8"],
        "eval": "d7596a4214794f03", "float": "423a32888003e41d", "rand": "b4ead52b512d8bb1"},
}


def pattern(h: int, w: int) -> np.ndarray:
    y, x = np.mgrid[:h, :w]
    r = (x * 7 + y * 3) % 256
    g = (x * y // 5) % 256
    b = ((x - w // 2) ** 2 + (y - h // 2) ** 2) // 7 % 256
    return np.stack([r, g, b], -1).astype(np.uint8)


def sha(a: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(a).tobytes()).hexdigest()[:16]


class Scripted:
    """Stands in for np.random.Generator: returns scripted draws, records the ranges asked."""

    def __init__(self, values):
        self.values, self.calls = list(values), []

    def integers(self, *args):
        self.calls.append(args)
        return self.values.pop(0)


@pytest.mark.parametrize("h,w,size", list(REFERENCE))
def test_matches_reference(h, w, size):
    img, ref = pattern(h, w), REFERENCE[(h, w, size)]
    crops = []
    for k in range(10):
        rng = Scripted([k])
        crops.append(augment.ar_train(img, size, rng))
        assert rng.calls == [(10,)]
    assert [sha(c) for c in crops] == ref["ten"]
    assert all(c.shape == (size, size, 3) and c.dtype == np.uint8 for c in crops)
    assert sha(augment.eval_center(img, size)) == ref["eval"]
    assert sha(augment.to_float(crops[7])) == ref["float"]
    rng = Scripted([size + 7, 3, 5])
    out = augment.tokenizer_train(img, size, rng)
    assert sha(out) == ref["rand"]
    # the same ranges as random.randrange(ceil(S), ceil(S / 0.8) + 1), randrange(H' - S + 1) and
    # randrange(W' - S + 1), with (W', H') the size after resizing the short side to S + 7
    w2, h2 = augment.resize_short_side(img, size + 7).size
    assert min(w2, h2) == size + 7
    assert rng.calls == [(size, int(np.ceil(size / 0.8)) + 1), (h2 - size + 1,), (w2 - size + 1,)]


@pytest.mark.parametrize("h,w,size", list(REFERENCE)[:2])
def test_extraction_crops_match_reference(h, w, size):
    """extract_codes_c2i.py: ten crops (--ten-crop) or the centre crop and its flip."""
    img, ref = pattern(h, w), REFERENCE[(h, w, size)]
    ten = augment.extract_crops(img, size, 10)
    assert ten.shape == (10, size, size, 3) and [sha(c) for c in ten] == ref["ten"]
    two = augment.extract_crops(img, size, 2)
    assert sha(two[0]) == ref["eval"]
    np.testing.assert_array_equal(two[1], two[0][:, ::-1])
    assert augment.extract_crops(img, size, 1).shape == (1, size, size, 3)
    with pytest.raises(ValueError, match="must be 10, 2 or 1"):
        augment.extract_crops(img, size, 5)


def test_ten_crop_layout():
    img = pattern(12, 14)
    assert np.array_equal(augment.ten_crop(img, 8, 0), img[:8, :8])
    assert np.array_equal(augment.ten_crop(img, 8, 3), img[4:, 6:])
    assert np.array_equal(augment.ten_crop(img, 8, 4), img[2:10, 3:11])
    assert np.array_equal(augment.ten_crop(img, 8, 5), img[:8, ::-1][:, :8])
    assert np.array_equal(augment.ten_crop(img, 8, 6), img[:8, :8][:, ::-1])  # tr of the flip
    with pytest.raises(ValueError, match="ten-crop index"):
        augment.ten_crop(img, 8, 10)
    with pytest.raises(ValueError, match="bigger than the image"):
        augment.ten_crop(img, 13, 0)


def test_random_crop_is_deterministic_and_in_range():
    img = pattern(90, 120)
    a = augment.tokenizer_train(img, 32, np.random.default_rng(5))
    b = augment.tokenizer_train(img, 32, np.random.default_rng(5))
    assert np.array_equal(a, b) and a.shape == (32, 32, 3)
    outs = {sha(augment.tokenizer_train(img, 32, np.random.default_rng(s))) for s in range(8)}
    assert len(outs) > 4


def test_to_float_range():
    x = augment.to_float(np.array([0, 127, 128, 255], np.uint8))
    assert x.dtype == np.float32
    np.testing.assert_array_equal(x[[0, 3]], [-1.0, 1.0])
    np.testing.assert_allclose(x[1:3], [127 / 127.5 - 1, 128 / 127.5 - 1], atol=1e-7)
