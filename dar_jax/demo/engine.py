"""What the web page runs, without the web: raw form values -> a validated :class:`Request` ->
one :class:`Frame` per token group from ``pipeline.stream`` (no gradio here).

    engine = Engine(models, class_names.for_model(models.num_classes))
    request = engine.request(class_id=3, num_images=4, seed=0, cfg_scale="1.5,6")
    for frame in engine.run(request):       # G frames: the preview after each group, then final
        show(frame.grid())                  # (H, W, 3) uint8, the images side by side

Image i of a request is sample i of ``pipeline.sample_keys(seed, num_images)``, so a request
gives the same pixels as ``pipeline.sample`` (and ``sample.py --classes c --num-images n
--seed s``) with the same options. Everything a request can change that is traced in the
compiled programs (class, seed, CFG scale and schedule, temperature, top-p, layout image and
its group count K) reuses them; a new batch size, solver, step count or top-k compiles once.
"""
from __future__ import annotations

import dataclasses
import math
import numbers
from typing import Any, Iterator, NamedTuple, Sequence

import numpy as np

from dar_jax import io, pipeline, solvers
from dar_jax import tokenizer as tok
from dar_jax.ar import SamplingError, parse_cfg_scale
from dar_jax.pipeline import PipelineError

MAX_SEED = 2**31 - 1
# an XLA compilation, or an executable loaded from jax's persistent compilation cache instead
_COMPILE_EVENTS = ("/jax/core/compile/backend_compile_duration",
                   "/jax/compilation_cache/cache_retrieval_time_sec")
_compilations = [0, False]  # XLA compilations in this process, listener registered


def compilations() -> int:
    """XLA programs built (compiled, or loaded from a persistent compilation cache) in this
    process since the first Engine was made (``GET /health`` shows it: it stays put while
    requests only move traced values)."""
    return _compilations[0]


def _count_compilations(event: str, duration: float, **kwargs) -> None:
    if event in _COMPILE_EVENTS:
        _compilations[0] += 1


class DemoInputError(PipelineError):
    """A request the demo cannot serve (the message names the field and what it accepts)."""


@dataclasses.dataclass(frozen=True)
class Request:
    label: int
    num_images: int
    seed: int
    options: pipeline.SampleOptions
    layout: np.ndarray | None = None    # (1, H, W, 3) float32 in [-1, 1]: the layout image
    layout_groups: int = 0              # K: token groups kept from the layout image


class Frame(NamedTuple):
    group: int            # 1..groups: token groups known
    groups: int           # G
    images: np.ndarray    # (B, H, W, 3) uint8: the preview (the final images when ``final``)
    final: bool

    def grid(self) -> np.ndarray:
        """The batch as one (rows H, cols W, 3) uint8 image (as sample.py's grid.png)."""
        return io.grid(self.images)


class Engine:
    """Holds the models; validates requests and streams them through the pipeline."""

    def __init__(self, models: pipeline.Models, class_names: Sequence[str], *,
                 dtype: str | None = None, max_images: int = 16, max_steps: int = 256,
                 max_layout_pixels: int = 4096 * 4096, source: dict | None = None):
        if len(class_names) != models.num_classes:
            raise DemoInputError(f"{len(class_names)} class names for {models.num_classes} classes")
        if max_images < 1 or max_steps < 1 or max_layout_pixels < 1:
            raise DemoInputError("max_images, max_steps and max_layout_pixels must be >= 1")
        self.models = models
        self.class_names = tuple(class_names)
        self.dtype = dtype
        self.max_images, self.max_steps, self.max_layout_pixels = max_images, max_steps, max_layout_pixels
        self.source = dict(source or {})
        tok_cfg = models.tok_cfg
        self.groups = int(tok_cfg.num_query_groups)
        self.resolution = int(tok.resolution(tok_cfg)[0])
        self.default_options = pipeline.SampleOptions(dtype=dtype)
        self.default_steps = int(tok_cfg.num_denoising_steps)
        if not _compilations[1]:
            import jax
            jax.monitoring.register_event_duration_secs_listener(_count_compilations)
            _compilations[1] = True

    # --- what the page shows -------------------------------------------------------------------
    @property
    def num_classes(self) -> int:
        return self.models.num_classes

    def class_label(self, c: int) -> str:
        return f"{c}: {self.class_names[c]}"

    def defaults(self) -> dict[str, Any]:
        """The form's initial values (also the API's defaults): class 0, seed 0, one image, the
        pipeline's default options, no layout."""
        o = self.default_options
        return dict(class_id=0, num_images=1, seed=0, cfg_scale=str(o.cfg_scale),
                    temperature=o.temperature, top_k=o.top_k, top_p=o.top_p, solver=o.solver,
                    steps=self.default_steps, layout_image=None, layout_groups=self.groups // 2)

    def info(self) -> dict[str, Any]:
        """What ``GET /health`` answers."""
        g, t = self.models.gpt_cfg, self.models.tok_cfg
        return {"status": "ok",
                "model": {**self.source, "resolution": self.resolution, "tokens": int(t.num_all_queries),
                          "vocab_size": int(g.vocab_size), "decoder_steps": self.default_steps,
                          "dtype": self.dtype or g.dtype},
                "classes": self.num_classes, "groups": self.groups, "max_images": self.max_images,
                "compilations": compilations()}

    # --- validation ----------------------------------------------------------------------------
    def request(self, class_id=0, num_images=1, seed=0, cfg_scale=None, temperature=None,
                top_k=None, top_p=None, solver=None, steps=None, layout_image=None,
                layout_groups=None) -> Request:
        """Raw form or API values (numbers, numeric strings, None for the default) -> a request.

        ``class_id`` is an id or a class name; ``layout_image`` a path to an image file or an
        array (H, W, 3) uint8 / (1, H, W, 3) in [-1, 1]. Raises DemoInputError naming the field.
        """
        d, o = self.defaults(), self.default_options
        label = self._class(class_id)
        n = _integer("number of images", _default(num_images, 1), 1, self.max_images)
        seed = _integer("seed", _default(seed, 0), 0, MAX_SEED)
        cfg = _default(cfg_scale, d["cfg_scale"])
        try:
            sched = parse_cfg_scale(cfg if isinstance(cfg, str) else _number("CFG scale", cfg, 0, 100))
        except SamplingError as e:
            raise DemoInputError(f"CFG scale: {e}") from None
        if not (0 <= sched.start <= 100 and 0 <= sched.end <= 100):
            raise DemoInputError(f"CFG scale must lie in [0, 100] (a number or 'a,b'), got {cfg!r}")
        temp = _number("temperature", _default(temperature, o.temperature), 0, 10)
        top_k = _integer("top-k", _default(top_k, o.top_k), 0, self.models.gpt_cfg.vocab_size)
        top_p = _number("top-p", _default(top_p, o.top_p), 0, 1)
        if top_p <= 0:
            raise DemoInputError(f"top-p must lie in (0, 1], got {top_p!r}")
        try:
            solver = solvers.canonical(str(_default(solver, o.solver)))
        except solvers.SolverError as e:
            raise DemoInputError(f"solver: {e}") from None
        steps = _integer("decoder steps", _default(steps, self.default_steps), 1, self.max_steps)
        k = _integer("layout groups (K)", _default(layout_groups, d["layout_groups"]), 0, self.groups)
        layout = None if layout_image is None else self._layout(layout_image)
        cfg_text = cfg if isinstance(cfg, str) else float(cfg)
        options = dataclasses.replace(o, cfg_scale=cfg_text, temperature=temp, top_k=top_k,
                                      top_p=top_p, solver=solver, num_steps=steps)
        return Request(label, n, seed, options, layout, k if layout is not None else 0)

    def _class(self, value) -> int:
        value = _default(value, 0)
        if isinstance(value, str) and not _is_int_text(value):
            text = value.strip()
            head = text.split(":", 1)[0].strip()  # the page's label "3: red circle"
            if _is_int_text(head):
                value = head
            else:
                names = {n.lower(): i for i, n in enumerate(self.class_names)}
                if text.lower() not in names:
                    raise DemoInputError(f"unknown class {text!r}: give a class id in "
                                         f"[0, {self.num_classes}) or one of the model's class names")
                return names[text.lower()]
        return _integer("class", value, 0, self.num_classes - 1)

    def _layout(self, image) -> np.ndarray:
        size = self.resolution
        if isinstance(image, np.ndarray):
            arr = image
            if arr.ndim == 3 and arr.dtype == np.uint8 and arr.shape[-1] == 3:
                self._check_pixels(arr.shape[1], arr.shape[0])
                from dar_jax.data.augment import center_crop_arr
                arr = (np.asarray(center_crop_arr(arr, size), np.float32) / 127.5 - 1.0)[None]
            if arr.shape != (1, size, size, 3) or not np.all(np.isfinite(arr)):
                raise DemoInputError(f"layout image array must be (H, W, 3) uint8 or finite "
                                     f"(1, {size}, {size}, 3) in [-1, 1], got {arr.shape} {arr.dtype}")
            return np.clip(arr.astype(np.float32), -1.0, 1.0)
        from PIL import Image, UnidentifiedImageError
        try:
            with Image.open(image) as im:
                width, height = im.size
        except (FileNotFoundError, IsADirectoryError, TypeError):
            raise DemoInputError("the layout image was not found (upload it again)") from None
        except (UnidentifiedImageError, Image.DecompressionBombError, OSError, ValueError, SyntaxError):
            raise DemoInputError("the layout upload is not an image (PNG, JPEG, WebP, ... expected)") from None
        self._check_pixels(width, height)
        try:
            return pipeline.load_image(image, size)
        except PipelineError:
            raise DemoInputError("the layout upload is not a readable image (truncated or corrupt)") from None

    def _check_pixels(self, width: int, height: int) -> None:
        if width * height > self.max_layout_pixels:
            raise DemoInputError(f"the layout image is {width}x{height} pixels; at most "
                                 f"{self.max_layout_pixels / 1e6:.1f} megapixels are accepted")

    # --- generation ----------------------------------------------------------------------------
    def run(self, req: Request) -> Iterator[Frame]:
        """The preview after each token group (``group`` 1..G), the G-th being the final images."""
        n = req.num_images
        labels = np.full((n,), req.label, np.int32)
        keys = pipeline.sample_keys(req.seed, n)
        prefix, prefix_len = self.prefix(req)
        for ev in pipeline.stream(self.models, labels, keys, req.options, prefix=prefix,
                                  prefix_len=prefix_len):
            yield Frame(ev.group, self.groups, np.asarray(pipeline.to_uint8(ev.images)), ev.final)

    def prefix(self, req: Request):
        """(prefix tokens (B, N) or None, prefix length) of a request's layout."""
        if req.layout is None:
            return None, 0
        codes, prefix_len = pipeline.layout_prefix(self.models, req.layout, req.layout_groups)
        return np.repeat(np.asarray(codes), req.num_images, axis=0), prefix_len

    def warm_up(self) -> None:
        """Compiles the default request's programs (and the layout encoder) before serving."""
        for _ in self.run(self.request()):
            pass
        size = self.resolution
        for _ in self.run(self.request(layout_image=np.zeros((size, size, 3), np.uint8))):
            break  # the layout path's own programs (encoder, prefix checks) are compiled by now


def previews_image(frames: Sequence[Frame]) -> np.ndarray:
    """The strip of previews: one row per image, one column per group (as sample.py's
    previews.png)."""
    return io.sheet(np.stack([f.images for f in frames], axis=1))


# ----------------------------------------------------------------------------------------------
# raw values
# ----------------------------------------------------------------------------------------------
def _default(value, default):
    if value is None or (isinstance(value, str) and not value.strip()):
        return default
    return value


def _is_int_text(text: str) -> bool:
    t = text.strip()
    return t.lstrip("+-").isdigit()


def _number(name: str, value, lo: float, hi: float) -> float:
    if isinstance(value, bool):
        raise DemoInputError(f"{name} must be a number in [{lo}, {hi}], got {value!r}")
    if isinstance(value, str):
        try:
            value = float(value.strip())
        except ValueError:
            raise DemoInputError(f"{name} must be a number in [{lo}, {hi}], got {value!r}") from None
    if not isinstance(value, numbers.Real) or not math.isfinite(float(value)) or not lo <= float(value) <= hi:
        raise DemoInputError(f"{name} must be a number in [{lo}, {hi}], got {value!r}")
    return float(value)


def _integer(name: str, value, lo: int, hi: int) -> int:
    bad = DemoInputError(f"{name} must be an integer in [{lo}, {hi}], got {value!r}")
    if isinstance(value, bool):
        raise bad
    if isinstance(value, str):
        if not _is_int_text(value):
            raise bad
        value = int(value.strip())
    if isinstance(value, numbers.Real) and not isinstance(value, numbers.Integral):
        if not math.isfinite(float(value)) or float(value) != int(value):
            raise bad
        value = int(value)
    if not isinstance(value, numbers.Integral) or not lo <= int(value) <= hi:
        raise bad
    return int(value)
