"""Reads PyTorch checkpoint files (``torch.save`` zip archives) without torch and without
executing pickled code.

A restricted unpickler admits only what checkpoints of D-AR, LlamaGen, torchvision, LPIPS,
DINOv2 and pytorch-fid contain: tensor rebuilding, typed storages of every dtype,
``collections.OrderedDict``, and two classes read as plain attribute data without importing their
modules (``argparse.Namespace`` and the reference's ``config_util.Config``). Every other global is
refused with an :class:`UnsafePickleError` naming it. Tensors come back as NumPy arrays.
"""
from __future__ import annotations

import collections
import io
import os
import pickle
import zipfile
from typing import Any

import ml_dtypes
import numpy as np

from dar_jax.errors import DarError


class CheckpointError(DarError, ValueError):
    """A checkpoint that cannot be read or does not match the model."""


class UnsafePickleError(CheckpointError):
    """The pickle asks for a global outside the allowlist."""


_STORAGE_DTYPES = {
    "FloatStorage": np.float32, "DoubleStorage": np.float64, "HalfStorage": np.float16,
    "BFloat16Storage": ml_dtypes.bfloat16, "LongStorage": np.int64, "IntStorage": np.int32,
    "ShortStorage": np.int16, "CharStorage": np.int8, "ByteStorage": np.uint8,
    "BoolStorage": np.bool_, "UntypedStorage": np.uint8,
}


class _StorageType:
    def __init__(self, name: str):
        self.name = name
        self.dtype = np.dtype(_STORAGE_DTYPES[name])


class PlainObject:
    """Stand-in for an allowlisted class: keeps the pickled attribute data, runs nothing."""
    pickled_name = "object"

    def __init__(self, *args, **kwargs):
        self.args, self.kwargs, self.state = args, kwargs, {}

    def __setstate__(self, state):
        self.state = state if isinstance(state, dict) else {"state": state}

    def to_plain(self) -> dict:
        return dict(self.state)


class _Namespace(PlainObject):
    pickled_name = "argparse.Namespace"


class _ReferenceConfig(PlainObject):
    pickled_name = "config_util.Config"

    def to_plain(self) -> dict:
        return dict(self.state.get("_data", self.state))


class _TensorRef:
    """A pickled tensor before it is read: checked against its storage by :func:`_materialise`
    (where its key in the checkpoint is known, so that an error can name it)."""
    __slots__ = ("storage", "offset", "size", "stride")

    def __init__(self, storage, offset, size, stride):
        self.storage, self.offset, self.size, self.stride = storage, offset, size, stride


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad=False,
                       backward_hooks=None, metadata=None):
    return _TensorRef(storage, storage_offset, size, stride)


def _ints(x) -> bool:
    return isinstance(x, (tuple, list)) and all(type(v) is int for v in x)


def _materialise(t: _TensorRef, where: str) -> np.ndarray:
    """The tensor as a contiguous array, after proving that every element it reads lies inside
    its storage and that it has no more elements than the storage.

    Refused (:class:`CheckpointError` naming ``where``): malformed sizes or strides, a negative
    offset or size, any element offset (negative strides included) outside ``[0, storage size)``,
    zero strides (expanded tensors; real checkpoints never store them) and more elements than the
    storage holds.
    """
    storage, offset = t.storage, t.offset
    if not isinstance(storage, np.ndarray) or storage.ndim != 1:
        raise CheckpointError(f"tensor {where}: its storage is not a storage")
    if type(offset) is not int or not _ints(t.size) or not _ints(t.stride) or len(t.size) != len(t.stride):
        raise CheckpointError(f"tensor {where}: malformed offset, size or stride "
                              f"({t.offset!r}, {t.size!r}, {t.stride!r})")
    size, stride, n = tuple(t.size), tuple(t.stride), storage.size
    if offset < 0 or any(s < 0 for s in size):
        raise CheckpointError(f"tensor {where}: negative offset or size ({offset}, {size})")
    numel = int(np.prod(size, dtype=object)) if size else 1
    if numel == 0:
        if len(size) > 32 or any(s > n + 2 ** 20 for s in size):
            raise CheckpointError(f"tensor {where}: implausible empty size {size}")
        return np.zeros(size, storage.dtype)
    if numel > n:
        raise CheckpointError(f"tensor {where} of size {size} has {numel} elements, more than its "
                              f"storage holds ({n})")
    if any(st == 0 for s, st in zip(size, stride) if s > 1):
        raise CheckpointError(f"tensor {where}: zero stride in {stride} (an expanded tensor; "
                              "checkpoints store real data)")
    lo = offset + sum((s - 1) * st for s, st in zip(size, stride) if st < 0)
    hi = offset + sum((s - 1) * st for s, st in zip(size, stride) if st > 0)
    if lo < 0 or hi >= n:
        raise CheckpointError(f"tensor {where} (size {size}, stride {stride}, offset {offset}) reads "
                              f"elements [{lo}, {hi}] outside its storage of {n} elements")
    if not size:
        return np.array(storage[offset], dtype=storage.dtype)
    itemsize = storage.dtype.itemsize
    # every element offset lies in [lo, hi] within the storage: the strided view is in bounds
    view = np.lib.stride_tricks.as_strided(storage[offset:], shape=size,
                                           strides=tuple(st * itemsize for st in stride))
    return np.ascontiguousarray(view)


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None, *rest):
    return data


def _reconstructor(cls, base, state=None):
    if not (isinstance(cls, type) and issubclass(cls, PlainObject)) or base is not object:
        raise UnsafePickleError(f"copyreg._reconstructor of {cls!r} is not allowed")
    obj = cls()
    if state is not None:
        obj.__setstate__(state)
    return obj


_ALLOWED = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("argparse", "Namespace"): _Namespace,
    ("config_util", "Config"): _ReferenceConfig,
    ("copyreg", "_reconstructor"): _reconstructor,
    ("builtins", "set"): set,
    ("builtins", "frozenset"): frozenset,
}


class _RestrictedUnpickler(pickle.Unpickler):
    def __init__(self, data: bytes, read_storage):
        super().__init__(io.BytesIO(data))
        self._read_storage = read_storage

    def find_class(self, module: str, name: str):
        if (module, name) in _ALLOWED:
            return _ALLOWED[(module, name)]
        if module == "torch" and name in _STORAGE_DTYPES:
            return _StorageType(name)
        raise UnsafePickleError(
            f"refusing to load global '{module}.{name}': not on the allowlist of tensor "
            "checkpoints (the file may be malicious, or not a plain state-dict checkpoint)")

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) >= 5 and pid[0] == "storage"):
            raise UnsafePickleError(f"unexpected persistent id {pid!r}")
        storage_type, key = pid[1], str(pid[2])
        if not isinstance(storage_type, _StorageType):
            raise UnsafePickleError(f"unexpected storage type {storage_type!r}")
        return self._read_storage(key, storage_type.dtype)


def _to_plain(obj, where: str = ""):
    """Plain containers and checked arrays; ``where`` is the key path (for error messages)."""
    def sub(key):
        return f"{where}.{key}" if where else str(key)

    if isinstance(obj, _TensorRef):
        return _materialise(obj, where or "<root>")
    if isinstance(obj, PlainObject):
        return {k: _to_plain(v, sub(k)) for k, v in obj.to_plain().items()}
    if isinstance(obj, dict):
        return type(obj)((k, _to_plain(v, sub(k))) for k, v in obj.items())
    if isinstance(obj, list):
        return [_to_plain(v, sub(i)) for i, v in enumerate(obj)]
    if isinstance(obj, tuple):
        return tuple(_to_plain(v, sub(i)) for i, v in enumerate(obj))
    return obj


def load_torch_file(path: str | os.PathLike) -> Any:
    """Loads a ``torch.save`` zip file: dicts/lists/scalars with NumPy arrays for tensors.

    Allowlisted objects (``argparse.Namespace``, ``config_util.Config``) become plain dicts.
    Raises :class:`CheckpointError` for missing, truncated or corrupt files and
    :class:`UnsafePickleError` for any global outside the allowlist.
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise CheckpointError(f"checkpoint file not found: {path}")
    try:
        zf = zipfile.ZipFile(path)
    except Exception as e:  # BadZipFile, OSError (a folder), unsupported archive features
        raise CheckpointError(
            f"{path} is not a readable torch checkpoint (zip archive): {e}; the file may be "
            "truncated or corrupt, or saved in torch's legacy format (re-save it with torch >= 1.6)"
        ) from None
    with zf:
        try:
            return _read_archive(zf, path)
        except CheckpointError as e:  # UnsafePickleError included
            if path in str(e):
                raise
            raise type(e)(f"{path}: {e}") from None
        except Exception as e:  # the unpickler runs nothing: anything else is a malformed file
            raise CheckpointError(f"{path} is corrupt or truncated: {type(e).__name__}: {e}") from None


def _read_archive(zf: zipfile.ZipFile, path: str):
    names = zf.namelist()
    pkl = [n for n in names if n.endswith("data.pkl")]
    if not pkl:
        raise CheckpointError(f"{path} holds no data.pkl: not a torch checkpoint")
    prefix = pkl[0][: -len("data.pkl")]
    byteorder = "little"
    if prefix + "byteorder" in names:
        byteorder = zf.read(prefix + "byteorder").decode().strip() or "little"
    if byteorder not in ("little", "big"):
        raise CheckpointError(f"{path}: unknown byte order {byteorder!r}")
    cache: dict[str, np.ndarray] = {}

    def read_storage(key: str, dtype: np.dtype) -> np.ndarray:
        if key not in cache:
            try:
                raw = zf.read(f"{prefix}data/{key}")
            except KeyError:
                raise CheckpointError(f"{path}: storage {key} is missing from the archive") from None
            dt = dtype.newbyteorder("<" if byteorder == "little" else ">") if dtype.itemsize > 1 else dtype
            if len(raw) % dt.itemsize:
                raise CheckpointError(f"{path}: storage {key} has a truncated size")
            cache[key] = np.frombuffer(raw, dtype=dt).astype(dtype, copy=False)
        return cache[key]

    obj = _RestrictedUnpickler(zf.read(pkl[0]), read_storage).load()
    return _to_plain(obj)


def find_state_dict(ckpt: Any, keys: tuple[str, ...], path: str = "checkpoint") -> dict[str, np.ndarray]:
    """The state dict under the first present key of ``keys`` (or ``ckpt`` itself if it is one)."""
    if isinstance(ckpt, dict):
        for key in keys:
            if key in ckpt and isinstance(ckpt[key], dict):
                return dict(ckpt[key])
        if ckpt and all(isinstance(v, np.ndarray) for v in ckpt.values()):
            return dict(ckpt)
    raise CheckpointError(f"{path}: no state dict found under any of {list(keys)}")
