"""The web demo's engine (no gradio, no server): class names, request validation, layout uploads,
frames equal to pipeline.sample, no recompiles when traced values move, and the CLI's errors."""
from __future__ import annotations

import socket

import numpy as np
import pytest
from PIL import Image

from conftest import REPO
from dar_jax import pipeline
from dar_jax.data import class_names, synthetic
from dar_jax.data.sources import DataError
from dar_jax.demo import engine as demo_engine
from dar_jax.demo.__main__ import main as demo_main
from dar_jax.demo.engine import DemoInputError, Engine
from dar_jax.io import grid as make_grid

DEFAULT = REPO / "models" / "default"


@pytest.fixture(scope="module")
def models():
    return pipeline.load_models(str(DEFAULT / "gpt"), str(DEFAULT / "tokenizer"))


@pytest.fixture(scope="module")
def engine(models):
    return Engine(models, class_names.for_model(models.num_classes), max_images=4)


def expected(models, label, seed, n, options, layout=None, k=0):
    """(preview grid after each group, final grid) straight from pipeline.sample."""
    prefix, prefix_len = None, 0
    if layout is not None:
        codes, prefix_len = pipeline.layout_prefix(models, layout, k)
        prefix = np.repeat(np.asarray(codes), n, 0)
    res = pipeline.sample(models, [label] * n, pipeline.sample_keys(seed, n), options, prefix=prefix,
                          prefix_len=prefix_len, previews=True)
    previews = pipeline.to_uint8(np.asarray(res.previews))
    return [make_grid(previews[:, g]) for g in range(previews.shape[1])], make_grid(pipeline.to_uint8(np.asarray(res.images)))


def test_class_names(tmp_path):
    names = class_names.imagenet()
    assert len(names) == 1000 == len(set(names))
    assert (names[0], names[207], names[360], names[388], names[999]) == (
        "tench", "Golden Retriever", "otter", "giant panda", "toilet paper")
    assert class_names.for_model(1000) == names
    assert class_names.for_model(10) == tuple(synthetic.class_name(c) for c in range(10))
    assert class_names.for_model(10)[:2] == ("red circle", "green square")
    assert class_names.for_model(50)[49] == "class 49"
    f = tmp_path / "names.txt"
    f.write_text("cat\n\ndog\n")
    assert class_names.for_model(2, f) == ("cat", "dog")
    with pytest.raises(DataError, match="holds 2 names, the model has 3"):
        class_names.for_model(3, f)
    with pytest.raises(DataError, match="not found"):
        class_names.for_model(2, tmp_path / "nothing.txt")


def test_request_defaults_and_forms(engine, models):
    req = engine.request()
    assert (req.label, req.num_images, req.seed, req.layout, req.layout_groups) == (0, 1, 0, None, 0)
    o = req.options
    assert (o.cfg_scale, o.temperature, o.top_k, o.top_p, o.solver, o.num_steps) == (
        "4.0", 1.0, 0, 1.0, "adams2", models.tok_cfg.num_denoising_steps)
    # the page's label, a name, numeric strings and integral floats are all accepted
    assert engine.request(class_id="3: yellow plus").label == 3
    assert engine.request(class_id="Magenta Ring").label == 4
    assert engine.request(class_id="7", seed="12", num_images=2.0).label == 7
    assert engine.request(seed=" 12 ").seed == 12
    assert engine.request(cfg_scale="1.5, 6").options.cfg_scale == "1.5, 6"
    assert engine.request(cfg_scale=2).options.cfg_scale == 2.0
    assert engine.request(solver="DPM++").options.solver == "dpmpp_2m"
    assert engine.request(seed=None, steps="", cfg_scale=" ").options.num_steps == 8
    info = engine.info()
    assert (info["classes"], info["groups"], info["model"]["resolution"]) == (10, 4, 32)


@pytest.mark.parametrize("field, value, message", [
    ("class_id", 10, r"class must be an integer in \[0, 9\]"),
    ("class_id", -1, "class must be"),
    ("class_id", "unicorn", "unknown class 'unicorn'"),
    ("class_id", 2.5, "class must be"),
    ("num_images", 0, r"number of images must be an integer in \[1, 4\]"),
    ("num_images", 5, "number of images"),
    ("seed", "abc", "seed must be an integer"),
    ("seed", 1.5, "seed must be"),
    ("seed", True, "seed must be"),
    ("seed", 2**40, "seed must be"),
    ("seed", float("inf"), "seed must be"),
    ("cfg_scale", "abc", "CFG scale: malformed"),
    ("cfg_scale", "1,2,3", "CFG scale: malformed"),
    ("cfg_scale", "nan", "CFG scale"),
    ("cfg_scale", "-1", r"CFG scale must lie in \[0, 100\]"),
    ("cfg_scale", 1e9, "CFG scale"),
    ("temperature", float("nan"), "temperature must be a number"),
    ("temperature", "hot", "temperature must be a number"),
    ("temperature", -0.5, "temperature"),
    ("top_k", -1, "top-k must be an integer"),
    ("top_k", 129, "top-k"),
    ("top_p", 0, r"top-p must lie in \(0, 1\]"),
    ("top_p", 1.5, "top-p"),
    ("solver", "rk4", "solver: unknown solver 'rk4'"),
    ("steps", 0, "decoder steps must be an integer"),
    ("steps", 10**6, "decoder steps"),
    ("layout_groups", 5, r"layout groups \(K\) must be an integer in \[0, 4\]"),
])
def test_bad_requests_name_the_field(engine, field, value, message):
    with pytest.raises(DemoInputError, match=message):
        engine.request(**{field: value})


def test_layout_uploads(engine, tmp_path):
    not_image = tmp_path / "notes.png"
    not_image.write_text("these are notes, not pixels\n")
    with pytest.raises(DemoInputError, match="is not an image"):
        engine.request(layout_image=str(not_image))
    huge = tmp_path / "huge.png"
    Image.new("1", (5000, 4000)).save(huge)  # 20 MP, a few kB on disk
    with pytest.raises(DemoInputError, match=r"5000x4000 pixels; at most 16.8 megapixels"):
        engine.request(layout_image=str(huge))
    good = tmp_path / "good.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (48, 40, 3), dtype=np.uint8)).save(good)
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(good.read_bytes()[:200])
    with pytest.raises(DemoInputError, match="not a readable image"):
        engine.request(layout_image=str(truncated))
    with pytest.raises(DemoInputError, match="not found"):
        engine.request(layout_image=str(tmp_path / "gone.png"))
    req = engine.request(layout_image=str(good), layout_groups=3)
    assert req.layout_groups == 3 and req.layout.shape == (1, 32, 32, 3)
    np.testing.assert_array_equal(req.layout, pipeline.load_image(str(good), 32))
    # K is ignored without an image: no layout
    assert engine.request(layout_groups=3).layout_groups == 0


def test_frames_equal_pipeline_sample_and_traced_values_do_not_recompile(engine, models, tmp_path):
    """G frames, the G-th final; pixels equal pipeline.sample; once a shape is compiled, moving
    class, seed, CFG (constant or schedule), temperature and the layout's K compiles nothing."""
    img = tmp_path / "layout.png"
    Image.fromarray(synthetic.render(4, 32, np.random.default_rng(1))).save(img)
    layout = pipeline.load_image(str(img), 32)
    runs = [  # (request kwargs, pipeline options, layout K or None)
        (dict(), pipeline.SampleOptions(num_steps=8), None),
        (dict(class_id=5, seed=7, cfg_scale="1.5,6", temperature=0.9, layout_image=str(img), layout_groups=2),
         pipeline.SampleOptions(cfg_scale="1.5,6", temperature=0.9), 2),
        (dict(class_id=2, seed=3, cfg_scale=2.5, temperature=1.1, layout_image=str(img), layout_groups=1),
         pipeline.SampleOptions(cfg_scale=2.5, temperature=1.1), 1),
        (dict(class_id=9, seed=11, cfg_scale="3,5", temperature=0.7),
         pipeline.SampleOptions(cfg_scale="3,5", temperature=0.7), None),
    ]
    compiled = {}
    for i, (kwargs, options, k) in enumerate(runs):
        req = engine.request(**kwargs)
        before = demo_engine.compilations()
        frames = list(engine.run(req))
        compiled[i] = demo_engine.compilations() - before
        assert [f.group for f in frames] == [1, 2, 3, 4] and [f.final for f in frames] == [False] * 3 + [True]
        previews, final = expected(models, req.label, req.seed, 1, options,
                                   layout if k is not None else None, k or 0)
        for f, p in zip(frames, previews):
            np.testing.assert_array_equal(f.grid(), p)
        np.testing.assert_array_equal(frames[-1].grid(), final)
        assert not all(np.array_equal(a.images, b.images) for a, b in zip(frames, frames[1:]))
    assert compiled[2] == 0 and compiled[3] == 0, compiled


def test_grid_of_several_images(engine, models):
    req = engine.request(class_id=1, seed=4, num_images=3)
    frames = list(engine.run(req))
    _, final = expected(models, 1, 4, 3, pipeline.SampleOptions())
    assert frames[-1].images.shape == (3, 32, 32, 3) and frames[-1].grid().shape == (64, 64, 3)
    np.testing.assert_array_equal(frames[-1].grid(), final)
    strip = demo_engine.previews_image(frames)
    assert strip.shape == (3 * 32, 4 * 32, 3)
    np.testing.assert_array_equal(strip[32:64, 96:], frames[-1].images[1])


def test_cli_errors_exit_2_before_loading(tmp_path, capsys):
    assert demo_main(["--concurrency", "0"]) == 2
    assert "--concurrency must be >= 1" in capsys.readouterr().err
    assert demo_main(["--port", "70000"]) == 2
    assert "--port must lie in [1, 65535]" in capsys.readouterr().err
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(1)
        port = s.getsockname()[1]
        assert demo_main(["--port", str(port)]) == 2
        assert f"127.0.0.1:{port} is in use" in capsys.readouterr().err
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        free = s.getsockname()[1]
    assert demo_main(["--gpt", str(tmp_path / "nothing"), "--port", str(free)]) == 2
    assert "checkpoint not found" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        demo_main(["--help"])
    out = capsys.readouterr().out
    for flag in ("--host", "--port", "--gpt", "--tokenizer", "--gpt-model", "--dtype", "--class-names"):
        assert flag in out
