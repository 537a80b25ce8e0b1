"""FID, Inception Score, precision/recall, and reference statistics (ADM suite conventions); PSNR
and SSIM of reconstructions.

    stats = RunningStats()                       # float64 on the host, streaming
    for batch in ...: stats.update(extract(batch).pool3)
    ref = read_reference("VIRTUAL_imagenet256_labeled.npz", extract=extract)
    fid = frechet_distance(stats.reference(), ref)
    isc = inception_score(logits)                # splits of 5000 (10 for 50k samples)
    prec, rec = precision_recall(ref.activations, sample_pool3)   # k = 3

Conventions taken from the ADM evaluator (guided-diffusion ``evaluations/evaluator.py``):
covariance with ``N - 1`` (``np.cov``), IS over consecutive splits of ``split_size`` samples,
precision/recall from k-NN balls with squared euclidean distances and ``<=``.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import os
import zipfile
from typing import Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np

from dar_jax.errors import DarError

HIGHEST = jax.lax.Precision.HIGHEST
REFERENCE_FORMAT = "dar_jax.reference_stats.v1"


class MetricInputError(DarError, ValueError):
    """Features, logits or statistics that a metric cannot use (sizes, counts, values)."""


class FeatureSizeError(MetricInputError):
    """Two sets of statistics/features of different feature sizes."""


class ReferenceFileError(MetricInputError):
    """A reference file that cannot be read or lacks what is asked of it."""


# ----------------------------------------------------------------------------- statistics

@dataclasses.dataclass
class ReferenceStats:
    """Statistics of a feature set: mu (D,), sigma (D, D) float64, count (None: unknown).

    ``activations`` (N, D) float32 are kept when precision/recall is wanted; ``meta`` records
    where the numbers come from (protocol, source file, ...).
    """
    mu: np.ndarray
    sigma: np.ndarray
    count: int | None = None
    activations: np.ndarray | None = None
    meta: dict = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        self.mu = np.asarray(self.mu, np.float64)
        self.sigma = np.asarray(self.sigma, np.float64)
        if self.mu.ndim != 1 or self.sigma.shape != (self.mu.shape[0],) * 2:
            raise MetricInputError(f"statistics need mu (D,) and sigma (D, D); got {self.mu.shape} "
                                   f"and {self.sigma.shape}")
        if self.activations is not None:
            self.activations = np.asarray(self.activations, np.float32)
            if self.activations.ndim != 2 or self.activations.shape[1] != self.dim:
                raise FeatureSizeError(f"activations {self.activations.shape} do not match the "
                                       f"feature size {self.dim} of mu")

    @property
    def dim(self) -> int:
        return int(self.mu.shape[0])


class RunningStats:
    """Mean and covariance of features seen batch by batch, in float64 (Chan et al.'s merge).

    Equal, up to rounding, to ``np.mean(x, 0)`` and ``np.cov(x, rowvar=False)`` over all batches.
    """

    def __init__(self, dim: int | None = None):
        self.dim = dim
        self.count = 0
        self._mean: np.ndarray | None = None
        self._scatter: np.ndarray | None = None    # sum of outer products of centred features

    def update(self, features: np.ndarray) -> "RunningStats":
        x = np.asarray(features, np.float64)
        if x.ndim != 2:
            raise MetricInputError(f"features must be (N, D), got shape {x.shape}")
        if self.dim is None:
            self.dim = x.shape[1]
        if x.shape[1] != self.dim:
            raise FeatureSizeError(f"features of size {x.shape[1]} added to statistics of size {self.dim}")
        if not np.isfinite(x).all():
            raise MetricInputError("features contain NaN or inf")
        n = x.shape[0]
        if n == 0:
            return self
        mean_b = x.mean(axis=0)
        centred = x - mean_b
        scatter_b = centred.T @ centred
        if self.count == 0:
            self._mean, self._scatter = mean_b, scatter_b
        else:
            total = self.count + n
            delta = mean_b - self._mean
            self._scatter = self._scatter + scatter_b + np.outer(delta, delta) * (self.count * n / total)
            self._mean = self._mean + delta * (n / total)
        self.count += n
        return self

    @property
    def mean(self) -> np.ndarray:
        if self.count == 0:
            raise MetricInputError("no features were added")
        return self._mean

    @property
    def cov(self) -> np.ndarray:
        if self.count < 2:
            raise MetricInputError(f"a covariance needs at least 2 samples, got {self.count}")
        return self._scatter / (self.count - 1)

    def reference(self, activations: np.ndarray | None = None, meta: dict | None = None) -> ReferenceStats:
        return ReferenceStats(self.mean, self.cov, self.count, activations, dict(meta or {}))


def compute_stats(features: np.ndarray, keep_activations: bool = False, meta: dict | None = None) -> ReferenceStats:
    """ReferenceStats of features (N, D), N >= 2."""
    features = np.asarray(features)
    stats = RunningStats().update(features)
    return stats.reference(features if keep_activations else None, meta)


# ----------------------------------------------------------------------------- FID

def _clip_rounding(w: np.ndarray) -> np.ndarray:
    """Eigenvalues of a PSD matrix with those below its rounding level (n eps max|w|) set to 0."""
    tol = len(w) * np.finfo(np.float64).eps * max(float(np.max(np.abs(w))), 0.0)
    return np.where(w > tol, w, 0.0)


def _psd_sqrt(a: np.ndarray) -> np.ndarray:
    w, v = np.linalg.eigh((a + a.T) / 2)
    return (v * np.sqrt(_clip_rounding(w))) @ v.T


def trace_sqrt_product(sigma1: np.ndarray, sigma2: np.ndarray) -> float:
    """tr sqrt(sigma1 sigma2) for symmetric PSD matrices, stably.

    sigma1 sigma2 is similar to S sigma2 S with S = sigma1^(1/2), which is symmetric PSD: its
    eigenvalues are real and non-negative, so no complex ``sqrtm`` and no diagonal offset are
    needed even when the covariances are singular (fewer samples than features). Eigenvalues
    at rounding level are taken as 0 (their square roots would otherwise add noise of order
    sqrt(eps) each).
    """
    s = _psd_sqrt(sigma1)
    m = s @ sigma2 @ s
    w = np.linalg.eigvalsh((m + m.T) / 2)
    return float(np.sqrt(_clip_rounding(w)).sum())


def frechet_distance(a: ReferenceStats, b: ReferenceStats) -> float:
    """FID = |mu_a - mu_b|^2 + tr(sigma_a + sigma_b - 2 (sigma_a sigma_b)^(1/2)), float64."""
    if a.dim != b.dim:
        raise FeatureSizeError(f"cannot compare statistics of feature size {a.dim} with {b.dim} "
                               f"({a.meta.get('source', 'first')} vs {b.meta.get('source', 'second')})")
    for s in (a, b):
        if not (np.isfinite(s.mu).all() and np.isfinite(s.sigma).all()):
            raise MetricInputError(f"statistics {s.meta.get('source', '')} contain NaN or inf")
    diff = a.mu - b.mu
    value = diff @ diff + np.trace(a.sigma) + np.trace(b.sigma) - 2.0 * trace_sqrt_product(a.sigma, b.sigma)
    return float(value)


def fid_from_features(features_a: np.ndarray, features_b: np.ndarray) -> float:
    return frechet_distance(compute_stats(features_a), compute_stats(features_b))


# ----------------------------------------------------------------------------- Inception Score

def inception_score_splits(logits: np.ndarray, split_size: int = 5000) -> np.ndarray:
    """exp(E_x KL(p(y|x) || p(y))) for each consecutive split of ``split_size`` samples.

    logits: (N, C), softmax taken here in float64. The last split is shorter when N is not a
    multiple (as in the ADM suite, which uses 5000: 10 splits for 50,000 samples).
    """
    logits = np.asarray(logits, np.float64)
    if logits.ndim != 2 or logits.shape[0] == 0:
        raise MetricInputError(f"Inception Score needs logits (N, C) with N > 0, got shape {logits.shape}")
    if not np.isfinite(logits).all():
        raise MetricInputError("logits contain NaN or inf")
    if split_size < 1:
        raise MetricInputError(f"split_size must be positive, got {split_size}")
    shifted = logits - logits.max(axis=1, keepdims=True)
    logp = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
    p = np.exp(logp)
    scores = []
    for start in range(0, len(p), split_size):
        part, logpart = p[start:start + split_size], logp[start:start + split_size]
        marginal = part.mean(axis=0, keepdims=True)
        log_marginal = np.log(np.where(marginal > 0, marginal, 1.0))   # 0-marginal classes: p = 0
        kl = np.where(part > 0, part * (logpart - log_marginal), 0.0).sum(axis=1).mean()
        scores.append(np.exp(kl))
    return np.asarray(scores)


def inception_score(logits: np.ndarray, split_size: int = 5000) -> float:
    """Mean of :func:`inception_score_splits` (the number the ADM suite prints)."""
    return float(np.mean(inception_score_splits(logits, split_size)))


# ----------------------------------------------------------------------------- precision / recall

def _sq_distances(u: jax.Array, v: jax.Array, dtype: str) -> jax.Array:
    """(R, D), (C, D) -> (R, C) squared euclidean distances, clamped at 0, as float32.

    ``float16`` mimics the ADM suite's DistanceBlock: the distance computed in float16 (products
    accumulated in float32), and recomputed in float32 when anything overflows.
    """
    def dist(a, b, out):
        na = jnp.sum(jnp.square(a.astype(jnp.float32)), axis=1).astype(out)
        nb = jnp.sum(jnp.square(b.astype(jnp.float32)), axis=1).astype(out)
        ab = jnp.dot(a, b.T, precision=HIGHEST, preferred_element_type=jnp.float32).astype(out)
        return jnp.maximum(na[:, None] - 2 * ab + nb[None, :], 0).astype(jnp.float32)

    if dtype == "float32":
        return dist(u, v, jnp.float32)
    d16 = dist(u.astype(jnp.float16), v.astype(jnp.float16), jnp.float16)
    return jax.lax.cond(jnp.isfinite(d16).all(), lambda: d16, lambda: dist(u, v, jnp.float32))


@functools.partial(jax.jit, static_argnames=("k", "dtype"))
def _knn_block(running, rows, cols, col_valid, k: int, dtype: str):
    """Merges a column block into the running k+1 smallest distances per row (ascending)."""
    d = jnp.where(col_valid[None, :], _sq_distances(rows, cols, dtype), jnp.inf)
    both = jnp.concatenate([running, d], axis=1)
    return -jax.lax.top_k(-both, k + 1)[0]


@functools.partial(jax.jit, static_argnames=("dtype",))
def _pr_block(f1, r1, valid1, f2, r2, valid2, dtype: str):
    """Which rows of f1 lie in a ball of f2 (radius r2) and which rows of f2 in a ball of f1."""
    d = _sq_distances(f1, f2, dtype)
    f1_in = jnp.any((d <= r2[None, :]) & valid2[None, :], axis=1)
    f2_in = jnp.any((d <= r1[:, None]) & valid1[:, None], axis=0)
    return f1_in, f2_in


def _blocks(x: np.ndarray, size: int) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
    """(start, block padded to ``size`` rows, validity mask) over the rows of x."""
    for start in range(0, len(x), size):
        b = x[start:start + size]
        valid = np.zeros(size, bool)
        valid[:len(b)] = True
        if len(b) < size:
            b = np.concatenate([b, np.zeros((size - len(b),) + b.shape[1:], b.dtype)])
        yield start, b, valid


def _check_features(x: np.ndarray, name: str, k: int) -> np.ndarray:
    x = np.asarray(x, np.float32)
    if x.ndim != 2:
        raise MetricInputError(f"{name} must be (N, D), got shape {x.shape}")
    if x.shape[0] <= k:
        raise MetricInputError(f"{name}: {x.shape[0]} samples, but k-NN radii with k = {k} need more than {k}")
    if not np.isfinite(x).all():
        raise MetricInputError(f"{name} contain NaN or inf")
    return x


def _check_dtype(dtype: str) -> None:
    if dtype not in ("float32", "float16"):
        raise MetricInputError(f"distance dtype must be 'float32' or 'float16', got {dtype!r}")


def manifold_radii(features: np.ndarray, k: int = 3, block_size: int = 10000,
                   distance_dtype: str = "float32") -> np.ndarray:
    """(N,) squared distance of each feature to its k-th nearest other feature.

    As the ADM suite: the (k+1)-th smallest distance in the row, self (0) included. Distances
    are computed block by block (``block_size`` rows x columns at a time) on the default device.
    """
    _check_dtype(distance_dtype)
    features = _check_features(features, "features", k)
    block_size = min(block_size, len(features))
    radii = np.zeros(len(features), np.float32)
    for start, rows, valid in _blocks(features, block_size):
        running = jnp.full((block_size, k + 1), jnp.inf, jnp.float32)
        for _, cols, col_valid in _blocks(features, block_size):
            running = _knn_block(running, rows, cols, col_valid, k=k, dtype=distance_dtype)
        radii[start:start + valid.sum()] = np.asarray(running[:, k])[valid]
    return radii


def precision_recall(ref_features: np.ndarray, sample_features: np.ndarray, k: int = 3,
                     block_size: int = 10000, distance_dtype: str = "float32") -> tuple[float, float]:
    """Improved precision and recall (Kynkaanniemi et al. 2019) as the ADM suite computes them.

    precision: fraction of samples inside some reference ball (centre a reference feature,
    squared radius its k-NN distance among the references); recall: fraction of references
    inside some sample ball. ``distance_dtype="float16"`` mimics the ADM suite's float16
    distances (see :func:`_sq_distances`); the default float32 is exact to float32 rounding.
    """
    _check_dtype(distance_dtype)
    ref = _check_features(ref_features, "reference features", k)
    smp = _check_features(sample_features, "sample features", k)
    if ref.shape[1] != smp.shape[1]:
        raise FeatureSizeError(f"reference features have size {ref.shape[1]}, samples {smp.shape[1]}")
    r_ref = manifold_radii(ref, k, block_size, distance_dtype)
    r_smp = manifold_radii(smp, k, block_size, distance_dtype)
    b1, b2 = min(block_size, len(ref)), min(block_size, len(smp))
    ref_in = np.zeros(len(ref), bool)
    smp_in = np.zeros(len(smp), bool)
    r_ref_pad = np.concatenate([r_ref, np.zeros(-len(ref) % b1, np.float32)])
    r_smp_pad = np.concatenate([r_smp, np.zeros(-len(smp) % b2, np.float32)])
    for s1, f1, v1 in _blocks(ref, b1):
        for s2, f2, v2 in _blocks(smp, b2):
            a, b = _pr_block(f1, r_ref_pad[s1:s1 + b1], v1, f2, r_smp_pad[s2:s2 + b2], v2,
                             dtype=distance_dtype)
            n1, n2 = int(v1.sum()), int(v2.sum())
            ref_in[s1:s1 + n1] |= np.asarray(a)[:n1]
            smp_in[s2:s2 + n2] |= np.asarray(b)[:n2]
    return float(smp_in.mean()), float(ref_in.mean())


# ----------------------------------------------------------------------------- reference files

def save_reference(path: str | os.PathLike, stats: ReferenceStats) -> None:
    """Writes ``stats`` as an npz (mu, sigma, count, optional activations, meta JSON), atomically."""
    arrays = dict(mu=stats.mu, sigma=stats.sigma,
                  count=np.asarray(-1 if stats.count is None else stats.count, np.int64),
                  format=np.asarray(REFERENCE_FORMAT), meta=np.asarray(json.dumps(stats.meta, sort_keys=True)))
    if stats.activations is not None:
        arrays["activations"] = stats.activations
    from dar_jax import io
    io.write_file(path, lambda f: np.savez(f, **arrays))


def _read_npy_header(f, where: str):
    version = np.lib.format.read_magic(f)
    read_header = {(1, 0): np.lib.format.read_array_header_1_0,
                   (2, 0): np.lib.format.read_array_header_2_0}.get(version)
    if read_header is None:
        raise ReferenceFileError(f"{where}: unsupported .npy version {version}")
    shape, fortran, dtype = read_header(f)
    if fortran or dtype.hasobject:
        raise ReferenceFileError(f"{where} is not a plain C-ordered array")
    return tuple(shape), dtype


def npz_member_header(path: str | os.PathLike, key: str) -> tuple[tuple[int, ...], np.dtype]:
    """(shape, dtype) of array ``key`` in an npz, reading only its header."""
    with zipfile.ZipFile(path) as zf, zf.open(f"{key}.npy") as f:
        return _read_npy_header(f, f"{path}:{key}")


def npz_batches(path: str | os.PathLike, key: str, batch_size: int) -> Iterator[np.ndarray]:
    """Array ``key`` of an npz (stored or deflated) in batches along axis 0, never all at once."""
    with zipfile.ZipFile(path) as zf, zf.open(f"{key}.npy") as f:
        shape, dtype = _read_npy_header(f, f"{path}:{key}")
        row = int(np.prod(shape[1:])) * dtype.itemsize
        for start in range(0, shape[0], batch_size):
            n = min(batch_size, shape[0] - start)
            buf = f.read(n * row)
            if len(buf) != n * row:
                raise ReferenceFileError(f"{path}: {key} is truncated")
            yield np.frombuffer(buf, dtype).reshape((n,) + shape[1:])


def check_reference(path: str | os.PathLike) -> None:
    """Cheap checks of a reference file before any expensive work: readable, plain (no pickled
    object) arrays, and the members of a dar-jax stats file or an ADM batch. Reads headers and
    the small members only; raises :class:`ReferenceFileError` naming the file."""
    path = os.fspath(path)
    try:
        with zipfile.ZipFile(path) as zf:
            keys = {n[:-4] for n in zf.namelist() if n.endswith(".npy")}
        for key in sorted(keys):
            npz_member_header(path, key)   # refuses object arrays, unknown .npy versions
        if "format" in keys:
            with np.load(path, allow_pickle=False) as npz:
                if str(npz["format"]) != REFERENCE_FORMAT:
                    raise ReferenceFileError(f"{path}: unknown reference format {str(npz['format'])!r}")
                missing = {"mu", "sigma", "count", "meta"} - keys
                if missing:
                    raise ReferenceFileError(f"{path}: a dar-jax reference without {sorted(missing)}")
                if not isinstance(json.loads(str(npz["meta"])), dict):
                    raise ValueError("meta is not a JSON object")
        elif "arr_0" not in keys and not {"mu", "sigma"} <= keys:
            raise ReferenceFileError(f"{path} is neither a dar_jax reference (format key) nor an "
                                     f"ADM batch (arr_0 or mu/sigma); keys: {sorted(keys)}")
    except MetricInputError:
        raise
    except (OSError, ValueError, TypeError, KeyError, EOFError, zipfile.BadZipFile) as e:
        raise ReferenceFileError(f"cannot read reference file {path}: {type(e).__name__}: {e}") from None


def read_reference(path: str | os.PathLike, extract: Callable | None = None, *,
                   need_activations: bool = False, batch_size: int = 500,
                   expected_dim: int | None = None) -> ReferenceStats:
    """Reads a reference: this project's stats npz, or an ADM suite reference/sample batch.

    ADM batches (``VIRTUAL_imagenet256_labeled.npz`` etc.) hold ``arr_0`` (N, H, W, 3) uint8
    images and, for references, precomputed ``mu``/``sigma`` (and ``mu_s``/``sigma_s`` for sFID,
    kept in ``meta`` only by name). As the ADM evaluator: ``mu``/``sigma`` are taken from the
    file when present (they describe the whole dataset, ``count`` unknown), and the activations
    (for precision/recall) are computed from ``arr_0`` with ``extract`` (images -> Features).
    Without ``mu``, the statistics come from the activations. ``need_activations`` makes a
    missing ``extract`` or ``arr_0`` an error instead of leaving ``activations`` None.
    """
    path = os.fspath(path)
    try:
        return _read_reference(path, extract, need_activations, batch_size, expected_dim)
    except MetricInputError:
        raise
    except (OSError, ValueError, TypeError, KeyError, EOFError, zipfile.BadZipFile) as e:
        # object arrays (refused: no pickles), broken meta JSON, truncated members, ...
        raise ReferenceFileError(f"cannot read reference file {path}: {type(e).__name__}: {e}") from None


def _read_reference(path, extract, need_activations, batch_size, expected_dim) -> ReferenceStats:
    npz = np.load(path, allow_pickle=False)
    with npz:
        keys = set(npz.files)
        meta = {"source": path}
        if "format" in keys:
            if str(npz["format"]) != REFERENCE_FORMAT:
                raise ReferenceFileError(f"{path}: unknown reference format {str(npz['format'])!r}")
            meta.update(json.loads(str(npz["meta"])))
            meta["source"] = path
            count = int(npz["count"])
            acts = npz["activations"] if "activations" in keys else None
            stats = ReferenceStats(npz["mu"], npz["sigma"], None if count < 0 else count, acts, meta)
        else:
            meta["format"] = "adm"
            if {"mu_s", "sigma_s"} <= keys:
                meta["adm_spatial_stats"] = "present (sFID, not used)"
            acts = None
            if "arr_0" in keys and extract is not None:
                pools = [extract(b).pool3 for b in npz_batches(path, "arr_0", batch_size)]
                acts = np.concatenate(pools) if pools else None
                config = getattr(extract, "config", None)
                meta["activations_from"] = "arr_0" + (f" ({config.protocol} protocol)" if config else "")
            if {"mu", "sigma"} <= keys:
                meta["stats_from"] = "file mu/sigma (ADM evaluator's TF Inception)"
                stats = ReferenceStats(npz["mu"], npz["sigma"], None, acts, meta)
            elif acts is not None:
                meta["stats_from"] = "activations of arr_0"
                stats = compute_stats(acts, keep_activations=True, meta=meta)
            elif "arr_0" in keys:
                raise ReferenceFileError(f"{path} holds images (arr_0) but no mu/sigma: pass an "
                                         "Inception feature extractor to compute them")
            else:
                raise ReferenceFileError(f"{path} is neither a dar_jax reference (format key) nor an "
                                         f"ADM batch (arr_0 or mu/sigma); keys: {sorted(keys)}")
    if need_activations and stats.activations is None:
        how = "pass an Inception feature extractor" if extract is None else "the file has no arr_0 images"
        raise ReferenceFileError(f"{path}: precision/recall need reference activations and there are "
                                 f"none ({how})")
    if expected_dim is not None and stats.dim != expected_dim:
        raise FeatureSizeError(f"{path} holds features of size {stats.dim}, expected {expected_dim}")
    return stats


def evaluate_features(samples: ReferenceStats | np.ndarray, sample_logits: np.ndarray | None,
                      ref: ReferenceStats, *, split_size: int = 5000, k: int = 3,
                      distance_dtype: str = "float32", block_size: int = 10000) -> dict:
    """{"num_samples", "fid", "inception_score", "precision", "recall"} of samples vs ``ref``.

    ``samples``: statistics (e.g. from ``protocol.sample_features``) or pool3 features (N, D).
    IS needs ``sample_logits``; precision/recall need activations on both sides (else omitted).
    """
    where = ref.meta.get("source", "reference")
    if not isinstance(samples, ReferenceStats):
        feats = np.asarray(samples)
        if feats.ndim != 2 or feats.shape[1] != ref.dim:
            raise FeatureSizeError(f"sample features {feats.shape} vs reference feature size {ref.dim} ({where})")
        samples = compute_stats(feats, keep_activations=True)
    elif samples.dim != ref.dim:
        raise FeatureSizeError(f"sample features of size {samples.dim} vs reference feature size {ref.dim} ({where})")
    out = {"num_samples": samples.count, "fid": frechet_distance(samples, ref)}
    if sample_logits is not None:
        out["inception_score"] = inception_score(sample_logits, split_size)
    if ref.activations is not None and samples.activations is not None:
        out["precision"], out["recall"] = precision_recall(
            ref.activations, samples.activations, k, block_size, distance_dtype)
    return out


# ----------------------------------------------------------------------------------------------
# reconstruction: PSNR and SSIM of image pairs (NHWC in [-1, 1])
# ----------------------------------------------------------------------------------------------
def psnr(x: jax.Array, y: jax.Array) -> jax.Array:
    """Per-image PSNR (dB) of images in [-1, 1] (peak-to-peak 2)."""
    mse = jnp.mean((jnp.clip(x, -1, 1) - jnp.clip(y, -1, 1)) ** 2, axis=(1, 2, 3))
    return 10.0 * jnp.log10(4.0 / jnp.maximum(mse, 1e-12))


def ssim(x: jax.Array, y: jax.Array) -> jax.Array:
    """Per-image SSIM (Gaussian window 11, sigma 1.5, on [0, 1] images, channel mean)."""
    x = (jnp.clip(x, -1, 1) + 1) / 2
    y = (jnp.clip(y, -1, 1) + 1) / 2
    size = min(11, x.shape[1], x.shape[2])
    g = np.exp(-((np.arange(size) - (size - 1) / 2) ** 2) / (2 * 1.5 ** 2))
    g = jnp.asarray(g / g.sum(), jnp.float32)

    def blur(a):
        return _sep_blur(a, g)

    c1, c2 = 0.01 ** 2, 0.03 ** 2
    mx, my = blur(x), blur(y)
    sxx = blur(x * x) - mx ** 2
    syy = blur(y * y) - my ** 2
    sxy = blur(x * y) - mx * my
    s = ((2 * mx * my + c1) * (2 * sxy + c2)) / ((mx ** 2 + my ** 2 + c1) * (sxx + syy + c2))
    return s.mean(axis=(1, 2, 3))


def _sep_blur(a, g):
    """Valid separable blur of (B, H, W, C) with the 1-D kernel g."""
    k = g.shape[0]
    h = jnp.stack([a[:, i:a.shape[1] - k + 1 + i] for i in range(k)], 0)
    a = jnp.tensordot(g, h, axes=(0, 0))
    w = jnp.stack([a[:, :, i:a.shape[2] - k + 1 + i] for i in range(k)], 0)
    return jnp.tensordot(g, w, axes=(0, 0))
