"""Random-access image sources (grain ``RandomAccessDataSource``-compatible).

Each source has ``__len__`` and ``__getitem__(i) -> {"image": (H, W, 3) uint8, "label": int}``:

- :class:`ImageFolder`: one subfolder per class, labels from the sorted class names, files in the
  order and with the extensions of torchvision's ``ImageFolder`` (what the reference reads),
  decoded with Pillow and converted to RGB as torchvision's loader does.
- :class:`TfdsSource`: a dataset prepared by tensorflow-datasets in the ``array_record`` format,
  read with ``tfds`` random access (no TensorFlow needed); the encoded image bytes are decoded
  with Pillow (as for the folder), e.g. ImageNet 2012 (``imagenet2012``).
"""
from __future__ import annotations

import io
import os

import numpy as np

from dar_jax.errors import DarError
from PIL import Image

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


class DataError(DarError, ValueError):
    """A dataset that cannot be used: missing path, empty folder, unknown name, bad shapes."""


def decode_image(data) -> np.ndarray:
    """Encoded image bytes (or a file path) -> (H, W, 3) uint8, via Pillow ``convert("RGB")``."""
    if isinstance(data, (bytes, bytearray, memoryview)):
        data = io.BytesIO(bytes(data))
    with Image.open(data) as image:
        return np.asarray(image.convert("RGB"))


def _as_rgb(image) -> np.ndarray:
    if isinstance(image, (bytes, bytearray, memoryview)):
        return decode_image(image)
    image = np.asarray(image)
    if image.dtype != np.uint8:
        raise DataError(f"expected a uint8 image, got dtype {image.dtype}")
    if image.ndim == 2:
        image = image[..., None]
    if image.ndim != 3 or image.shape[-1] not in (1, 3, 4):
        raise DataError(f"expected an image (H, W, C) with C in 1, 3, 4, got {image.shape}")
    if image.shape[-1] == 1:
        image = np.repeat(image, 3, axis=-1)
    return image[..., :3]


class ImageFolder:
    """``root/<class>/.../<file>.<ext>``; ``classes`` sorted, label = position in ``classes``."""

    def __init__(self, root: str):
        root = os.fspath(root)
        if not os.path.exists(root):
            raise DataError(f"image folder {root!r} does not exist")
        if not os.path.isdir(root):
            raise DataError(f"image folder {root!r} is not a directory")
        self.root = root
        self.classes = sorted(e.name for e in os.scandir(root) if e.is_dir())
        if not self.classes:
            raise DataError(f"image folder {root!r} has no class subfolders "
                            "(expected one subfolder of images per class)")
        files, labels, empty = [], [], []
        for label, name in enumerate(self.classes):
            found = []
            for folder, _, names in sorted(os.walk(os.path.join(root, name), followlinks=True)):
                found += [os.path.join(folder, f) for f in sorted(names)
                          if f.lower().endswith(IMAGE_EXTENSIONS)]
            if not found:
                empty.append(name)
            files += found
            labels += [label] * len(found)
        if empty:
            raise DataError(f"image folder {root!r}: no image files ({', '.join(IMAGE_EXTENSIONS)})"
                            f" in class folder(s) {empty}")
        self.files = files
        self.labels = np.asarray(labels, np.int64)
        self.num_classes = len(self.classes)

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> dict:
        index = int(index)
        try:
            image = decode_image(self.files[index])
        except OSError as e:
            raise DataError(f"cannot read image {self.files[index]!r}: {e}") from None
        return {"image": image, "label": int(self.labels[index])}

    def __repr__(self) -> str:
        return f"ImageFolder({self.root!r}, {len(self)} images, {self.num_classes} classes)"


def _manual_dir(data_dir: str | None, manual_dir: str | None) -> str:
    if manual_dir:
        return manual_dir
    base = data_dir or os.path.join("~", "tensorflow_datasets")
    return os.path.join(base, "downloads", "manual")


class TfdsSource:
    """A tensorflow-datasets dataset prepared as ``array_record``, read by random access.

    Args:
      name: tfds name, optionally with config/version (``"imagenet2012"``, ``"mnist:3.0.1"``).
      split: tfds split, slicing allowed (``"train"``, ``"validation[:1000]"``).
      data_dir: tfds data directory (None: tfds' default, ``~/tensorflow_datasets``).
      image_key, label_key: feature names of the image and the class label.
      prepare: if the dataset is not prepared, run tfds' ``download_and_prepare`` with
        ``file_format="array_record"`` (ImageNet reads ``ILSVRC2012_img_{train,val}.tar`` from the
        manual directory; preparing ImageNet needs TensorFlow, reading never does).
      manual_dir: manual-download directory (default: tfds' ``<data_dir>/downloads/manual``).
    """

    def __init__(self, name: str, *, split: str, data_dir: str | None = None,
                 image_key: str = "image", label_key: str = "label", prepare: bool = False,
                 manual_dir: str | None = None):
        try:
            import tensorflow_datasets as tfds
        except ImportError as e:  # pragma: no cover - tfds is a dependency
            raise DataError(f"reading tfds dataset {name!r} needs tensorflow-datasets: {e}") from e
        if not name:
            raise DataError("tfds dataset name is empty (set data.name, e.g. 'imagenet2012')")
        data_dir = os.fspath(data_dir) if data_dir else None
        if data_dir and not prepare and not os.path.isdir(data_dir):
            raise DataError(f"tfds data_dir {data_dir!r} does not exist (dataset {name!r})")
        try:
            builder = tfds.builder(name, data_dir=data_dir, file_format="array_record")
        except tfds.core.registered.DatasetNotFoundError:
            raise DataError(f"unknown tfds dataset {name!r}: no registered tfds builder of that "
                            f"name and no prepared files under data_dir {data_dir!r}") from None
        if not builder.is_prepared():
            if not prepare:
                raise DataError(
                    f"tfds dataset {name!r} is not prepared under {str(builder.data_dir)!r}. "
                    f"Prepare it once (array_record format), e.g. `tfds build {name} "
                    f"--data_dir={data_dir or '~/tensorflow_datasets'} "
                    f"--manual_dir={_manual_dir(data_dir, manual_dir)} "
                    "--file_format=array_record` (ImageNet: put ILSVRC2012_img_train.tar and "
                    "ILSVRC2012_img_val.tar in the manual dir), or set data.prepare=True")
            config = tfds.download.DownloadConfig(manual_dir=_manual_dir(data_dir, manual_dir))
            builder.download_and_prepare(download_config=config)
        file_format = str(getattr(builder.info.file_format, "value", builder.info.file_format))
        if file_format not in ("array_record", "parquet"):
            raise DataError(
                f"tfds dataset {name!r} under {str(builder.data_dir)!r} is prepared as "
                f"{file_format}, which has no random access; prepare it again with "
                "--file_format=array_record (in another data_dir)")
        features = builder.info.features
        for key in (image_key, label_key):
            if key not in features:
                raise DataError(f"tfds dataset {name!r} has no feature {key!r}; "
                                f"features: {sorted(features)}")
        if split not in builder.info.splits and split.split("[")[0] not in builder.info.splits:
            raise DataError(f"tfds dataset {name!r} has no split {split!r}; "
                            f"splits: {sorted(builder.info.splits)}")
        decoders = None
        if isinstance(features[image_key], tfds.features.Image):
            decoders = {image_key: tfds.decode.SkipDecoding()}
        self._source = builder.as_data_source(split=split, decoders=decoders)
        self.name = name
        self.split = split
        self.data_dir = str(builder.data_dir)
        self.image_key = image_key
        self.label_key = label_key
        label_feature = features[label_key]
        self.num_classes = getattr(label_feature, "num_classes", None)
        self.classes = list(getattr(label_feature, "names", None) or []) or None

    def __len__(self) -> int:
        return len(self._source)

    def __getitem__(self, index: int) -> dict:
        record = self._source[int(index)]
        return {"image": _as_rgb(record[self.image_key]), "label": int(record[self.label_key])}

    def __repr__(self) -> str:
        return f"TfdsSource({self.name!r}, split={self.split!r}, {len(self)} examples)"
