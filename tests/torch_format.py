"""Writes files in torch.save's zip layout without torch (test inputs for the safe loader).

NumPy arrays become tensors (``torch._utils._rebuild_tensor_v2`` over typed storages), dicts
become ``collections.OrderedDict`` where asked. Objects with ``__reduce__`` are pickled as they
ask, which is how tests build malicious files.
"""
from __future__ import annotations

import collections
import io
import pickle
import zipfile

import numpy as np

_STORAGE = {np.dtype(np.float32): "FloatStorage", np.dtype(np.float16): "HalfStorage",
            np.dtype(np.float64): "DoubleStorage", np.dtype(np.int64): "LongStorage",
            np.dtype(np.int32): "IntStorage", np.dtype(np.uint8): "ByteStorage",
            np.dtype(np.bool_): "BoolStorage"}


class _Global:
    def __init__(self, module, name):
        self.module, self.name = module, name

    def __call__(self, *args):  # never called: only pickled by name
        raise RuntimeError("placeholder")


class _Storage:
    def __init__(self, key, dtype, numel):
        self.key, self.dtype, self.numel = key, dtype, numel


class _Tensor:
    def __init__(self, storage, shape):
        self.storage, self.shape = storage, shape

    def __reduce__(self):
        stride, acc = [], 1
        for d in reversed(self.shape):
            stride.append(acc)
            acc *= d
        return (_Global("torch._utils", "_rebuild_tensor_v2"),
                (self.storage, 0, tuple(self.shape), tuple(reversed(stride)), False,
                 collections.OrderedDict()))


class RawTensor:
    """A tensor given by its storage and a view of it (offset, size, stride in elements), as a
    hostile file may write it."""

    def __init__(self, storage: np.ndarray, offset: int, size, stride):
        self.storage, self.offset, self.size, self.stride = storage, offset, tuple(size), tuple(stride)


class _RawTensor(_Tensor):
    def __init__(self, storage, offset, size, stride):
        self.storage, self.offset, self.size, self.stride = storage, offset, size, stride

    def __reduce__(self):
        return (_Global("torch._utils", "_rebuild_tensor_v2"),
                (self.storage, self.offset, self.size, self.stride, False, collections.OrderedDict()))


class _Pickler(pickle._Pickler):  # the pure-Python pickler lets us write GLOBALs by name
    def __init__(self, f):
        super().__init__(f, protocol=2)

    def persistent_id(self, obj):
        if isinstance(obj, _Storage):
            return ("storage", _Global("torch", _STORAGE[obj.dtype]), obj.key, "cpu", obj.numel)
        return None

    def save_global(self, obj, name=None):
        if isinstance(obj, _Global):
            self.write(pickle.GLOBAL + f"{obj.module}\n{obj.name}\n".encode())
            self.memoize(obj)
            return
        super().save_global(obj, name)

    def save(self, obj, save_persistent_id=True):
        if isinstance(obj, _Global):
            return self.save_global(obj)
        return super().save(obj, save_persistent_id)


def save(obj, path: str, archive: str = "archive") -> None:
    """torch.save-like zip file of ``obj`` (np arrays -> tensors)."""
    blobs = {}

    def convert(x):
        if isinstance(x, np.ndarray):
            key = str(len(blobs))
            arr = np.ascontiguousarray(x)
            blobs[key] = arr.tobytes()
            return _Tensor(_Storage(key, arr.dtype, arr.size), arr.shape)
        if isinstance(x, RawTensor):
            key = str(len(blobs))
            arr = np.ascontiguousarray(x.storage).reshape(-1)
            blobs[key] = arr.tobytes()
            return _RawTensor(_Storage(key, arr.dtype, arr.size), x.offset, x.size, x.stride)
        if isinstance(x, collections.OrderedDict):
            return collections.OrderedDict((k, convert(v)) for k, v in x.items())
        if isinstance(x, dict):
            return {k: convert(v) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return type(x)(convert(v) for v in x)
        return x

    buf = io.BytesIO()
    _Pickler(buf).dump(convert(obj))
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr(f"{archive}/data.pkl", buf.getvalue())
        zf.writestr(f"{archive}/byteorder", "little")
        zf.writestr(f"{archive}/version", "3\n")
        for key, data in blobs.items():
            zf.writestr(f"{archive}/data/{key}", data)
