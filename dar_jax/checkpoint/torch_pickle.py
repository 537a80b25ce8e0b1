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


class CheckpointError(ValueError):
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


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad=False,
                       backward_hooks=None, metadata=None):
    size, stride = tuple(size), tuple(stride)
    if not size:
        return np.array(storage[storage_offset], dtype=storage.dtype)
    itemsize = storage.dtype.itemsize
    needed = storage_offset + 1 + sum((s - 1) * st for s, st in zip(size, stride) if s > 0)
    if any(s == 0 for s in size):
        return np.zeros(size, storage.dtype)
    if needed > storage.size:
        raise CheckpointError(f"tensor of size {size} runs past its storage ({storage.size} elements)")
    view = np.lib.stride_tricks.as_strided(
        storage[storage_offset:], shape=size, strides=tuple(st * itemsize for st in stride))
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


def _to_plain(obj):
    if isinstance(obj, PlainObject):
        return {k: _to_plain(v) for k, v in obj.to_plain().items()}
    if isinstance(obj, dict):
        return type(obj)((k, _to_plain(v)) for k, v in obj.items())
    if isinstance(obj, list):
        return [_to_plain(v) for v in obj]
    if isinstance(obj, tuple):
        return tuple(_to_plain(v) for v in obj)
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
    except (zipfile.BadZipFile, OSError) as e:
        raise CheckpointError(
            f"{path} is not a readable torch checkpoint (zip archive): {e}; the file may be "
            "truncated or corrupt, or saved in torch's legacy format (re-save it with torch >= 1.6)"
        ) from None
    with zf:
        names = zf.namelist()
        pkl = [n for n in names if n.endswith("data.pkl")]
        if not pkl:
            raise CheckpointError(f"{path} holds no data.pkl: not a torch checkpoint")
        prefix = pkl[0][: -len("data.pkl")]
        byteorder = "little"
        if prefix + "byteorder" in names:
            byteorder = zf.read(prefix + "byteorder").decode().strip() or "little"
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

        try:
            data = zf.read(pkl[0])
            obj = _RestrictedUnpickler(data, read_storage).load()
        except (UnsafePickleError, CheckpointError):
            raise
        except (zipfile.BadZipFile, EOFError, pickle.UnpicklingError, zlib_error(), ValueError,
                TypeError, AttributeError, IndexError, KeyError) as e:
            raise CheckpointError(f"{path} is corrupt or truncated: {type(e).__name__}: {e}") from None
    return _to_plain(obj)


def zlib_error():
    import zlib
    return zlib.error


def find_state_dict(ckpt: Any, keys: tuple[str, ...], path: str = "checkpoint") -> dict[str, np.ndarray]:
    """The state dict under the first present key of ``keys`` (or ``ckpt`` itself if it is one)."""
    if isinstance(ckpt, dict):
        for key in keys:
            if key in ckpt and isinstance(ckpt[key], dict):
                return dict(ckpt[key])
        if ckpt and all(isinstance(v, np.ndarray) for v in ckpt.values()):
            return dict(ckpt)
    raise CheckpointError(f"{path}: no state dict found under any of {list(keys)}")
