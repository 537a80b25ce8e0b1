"""The web page: a thin gradio layer over :class:`dar_jax.demo.engine.Engine`.

Routes: ``/`` (the page; stable ``elem_id``s: class, seed, cfg, generate, preview, final,
group_counter, layout_image, layout_groups, error, previews, download), ``GET /health`` (JSON:
model, classes, groups, compilations so far), and the gradio API with one public endpoint,
``/generate``, which streams exactly G updates ``(PNG file, group)`` for G token groups, the
G-th image being the final one. Every request (page or API) goes
through gradio's queue, ``concurrency`` at a time, and a waiting user sees their position.

Nothing leaves the machine: analytics and the version check are off, fonts are the ones
gradio ships, there is no share link, run history or MCP server.
"""
from __future__ import annotations

import atexit
import collections
import os
import shutil
import tempfile
import threading

# before gradio (and huggingface_hub, which it imports) reads them
os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

import gradio as gr  # noqa: E402
import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from dar_jax.demo.engine import Engine, Frame, previews_image  # noqa: E402
from dar_jax.solvers import SOLVERS  # noqa: E402

CSS = """
#preview .image-frame img, #final .image-frame img, #previews .image-frame img {
    width: 100%; height: 100%; object-fit: contain; image-rendering: pixelated; }
#error { color: var(--error-text-color); }
"""


def _theme():
    fonts = gr.themes.LocalFont
    return gr.themes.Default(font=[fonts("Source Sans Pro"), "ui-sans-serif", "system-ui", "sans-serif"],
                             font_mono=[fonts("IBM Plex Mono"), "ui-monospace", "monospace"])


def _expected_errors():
    from dar_jax.cli import expected_errors
    return expected_errors()


def _path(value):
    """The server-side path of an uploaded image (gradio's FileData, unpreprocessed) or None."""
    if value is None:
        return None
    if isinstance(value, dict):
        return value.get("path")
    return value


class Downloads:
    """PNG files for the download button, in a directory of our own; the oldest are deleted
    beyond ``keep`` (gradio has copied them into its cache by then)."""

    def __init__(self, keep: int = 64):
        self.root = tempfile.mkdtemp(prefix="dar-demo-")
        self.keep = keep
        self._dirs: collections.deque[str] = collections.deque()
        self._lock = threading.Lock()
        atexit.register(self.close)

    def save(self, image: np.ndarray, name: str) -> str:
        d = tempfile.mkdtemp(dir=self.root)
        path = os.path.join(d, name)
        Image.fromarray(image).save(path, format="PNG")
        with self._lock:
            self._dirs.append(d)
            while len(self._dirs) > self.keep:
                shutil.rmtree(self._dirs.popleft(), ignore_errors=True)
        return path

    def close(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)


def build(engine: Engine, *, concurrency: int = 1, queue_size: int = 32,
          downloads: Downloads | None = None) -> gr.Blocks:
    """The page. ``concurrency`` requests run at once (page and API share the limit); at most
    ``queue_size`` wait."""
    d = engine.defaults()
    num_groups = engine.groups
    downloads = downloads or Downloads()
    with gr.Blocks(title="D-AR: watch it draw", analytics_enabled=False,
                   delete_cache=(600, 3600)) as demo:
        gr.Markdown(f"# D-AR: watch it draw\nThe autoregressive model writes {num_groups} groups of "
                    "tokens; after each group the diffusion decoder shows the image so far.")
        with gr.Row():
            with gr.Column(scale=1, min_width=320):
                cls = gr.Dropdown([(engine.class_label(c), c) for c in range(engine.num_classes)],
                                  value=d["class_id"], label="class", filterable=True, elem_id="class")
                num = gr.Slider(1, engine.max_images, value=d["num_images"], step=1,
                                label="number of images (grid)", elem_id="num_images")
                seed = gr.Number(d["seed"], label="seed", precision=0, elem_id="seed")
                cfg = gr.Textbox(d["cfg_scale"], label="CFG scale: a number, or 'a,b' linear over the tokens",
                                 elem_id="cfg")
                go = gr.Button("Generate", variant="primary", elem_id="generate")
                with gr.Accordion("sampling", open=False):
                    temp = gr.Slider(0, 2, value=d["temperature"], step=0.05, label="temperature",
                                     elem_id="temperature")
                    top_k = gr.Number(d["top_k"], label="top-k (0: off)", precision=0, elem_id="top_k")
                    top_p = gr.Slider(0.01, 1, value=d["top_p"], step=0.01, label="top-p", elem_id="top_p")
                    solver = gr.Dropdown(list(SOLVERS), value=d["solver"],
                                         label="solver", elem_id="solver")
                    steps = gr.Number(d["steps"], label="decoder steps", precision=0, elem_id="steps")
                with gr.Accordion("layout from an image", open=True):
                    layout = gr.Image(None, type="filepath", sources=["upload"], format="png",
                                      label="layout image (its first K token groups are kept)",
                                      elem_id="layout_image", height=160)
                    layout_k = gr.Slider(0, num_groups, value=d["layout_groups"], step=1,
                                         label="K: token groups kept from the layout image",
                                         elem_id="layout_groups")
            with gr.Column(scale=2):
                error = gr.Markdown("", elem_id="error")
                counter = gr.Markdown(f"### group 0 / {num_groups}", elem_id="group_counter")
                with gr.Row():
                    preview = gr.Image(None, label="preview (after each token group)", format="png",
                                       type="numpy", interactive=False, height=320, elem_id="preview",
                                       buttons=["fullscreen"])
                    final = gr.Image(None, label="final image", format="png", type="numpy",
                                     interactive=False, height=320, elem_id="final",
                                     buttons=["download", "fullscreen"])
                strip = gr.Image(None, label="previews: one row per image, one column per group",
                                 format="png", type="numpy", interactive=False, elem_id="previews",
                                 height=160, buttons=["download"])
                download = gr.DownloadButton("Download PNG", value=None, interactive=False,
                                             elem_id="download")
        # API-only outputs: (image, group) per update
        api_image = gr.Image(None, format="png", type="numpy", visible=False, label="image")
        api_group = gr.Number(None, precision=0, visible=False, label="group")
        api_trigger = gr.Button(visible=False)

        inputs = [cls, num, seed, cfg, temp, top_k, top_p, solver, steps, layout, layout_k]
        names = list(d)

        def show_error(message: str):
            return f"**Error:** {message}"

        def ui_generate(*raw):
            values = dict(zip(names, raw))
            values["layout_image"] = _path(values["layout_image"])
            try:
                req = engine.request(**values)
            except _expected_errors() as e:
                yield {error: show_error(str(e))}
                return
            frames: list[Frame] = []
            try:
                for frame in engine.run(req):
                    frames.append(frame)
                    out = {preview: frame.grid(), counter: f"### group {frame.group} / {frame.groups}"}
                    if frame.group == 1:
                        out.update({error: "", final: None, strip: None,
                                    download: gr.update(value=None, interactive=False)})
                    if frame.final:
                        grid = frame.grid()
                        name = f"dar_class{req.label}_seed{req.seed}_n{req.num_images}.png"
                        out.update({final: grid, strip: previews_image(frames),
                                    download: gr.update(value=downloads.save(grid, name), interactive=True)})
                    yield out
            except _expected_errors() as e:
                yield {error: show_error(str(e))}

        def api_generate(class_id=d["class_id"], num_images=d["num_images"], seed=d["seed"],
                         cfg_scale=d["cfg_scale"], temperature=d["temperature"], top_k=d["top_k"],
                         top_p=d["top_p"], solver=d["solver"], steps=d["steps"], layout_image=None,
                         layout_groups=d["layout_groups"]):
            """Streams G updates (image PNG, group index 1..G); the G-th image is the final one."""
            try:
                req = engine.request(class_id, num_images, seed, cfg_scale, temperature, top_k, top_p,
                                     solver, steps, _path(layout_image), layout_groups)
                for frame in engine.run(req):
                    yield frame.grid(), frame.group
            except _expected_errors() as e:
                raise gr.Error(str(e), print_exception=False) from None

        def check_layout(value):
            try:
                if _path(value) is not None:
                    engine.request(layout_image=_path(value))
            except _expected_errors() as e:
                return show_error(str(e))
            return ""

        common = dict(concurrency_limit=concurrency, concurrency_id="generate", preprocess=False)
        go.click(ui_generate, inputs, [error, counter, preview, final, strip, download],
                 api_visibility="private", show_progress="full", show_progress_on=[preview], **common)
        api_trigger.click(api_generate, inputs, [api_image, api_group], api_name="generate", **common)
        layout.upload(check_layout, [layout], [error], api_visibility="private", preprocess=False,
                      queue=False)
        layout.clear(lambda: "", None, [error], api_visibility="private", queue=False)
    demo.queue(max_size=queue_size, default_concurrency_limit=concurrency)
    return demo


def create_app(engine: Engine, *, concurrency: int = 1, queue_size: int = 32,
               max_upload_mb: int = 20):
    """A FastAPI app: ``GET /health`` and the page at ``/``."""
    import fastapi
    downloads = Downloads()
    demo = build(engine, concurrency=concurrency, queue_size=queue_size, downloads=downloads)
    app = fastapi.FastAPI(docs_url=None, redoc_url=None, openapi_url=None)

    @app.get("/health")
    def health():
        return engine.info()

    app.state.downloads = downloads
    return gr.mount_gradio_app(app, demo, path="/", footer_links=["api"], run_history=False,
                               show_error=True, max_file_size=f"{max_upload_mb}mb", ssr_mode=False,
                               enable_monitoring=False, pwa=False, mcp_server=False, theme=_theme(),
                               css=CSS)


def serve(engine: Engine, host: str = "127.0.0.1", port: int = 7860, **kwargs) -> None:
    import uvicorn
    app = create_app(engine, **kwargs)
    print(f"D-AR demo on http://{host}:{port} (health: /health)", flush=True)
    try:
        uvicorn.run(app, host=host, port=port, log_level="warning")
    finally:
        app.state.downloads.close()
