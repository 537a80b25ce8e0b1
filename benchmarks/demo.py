"""Web demo latency: time to the first preview and to the final image of one request, through
the real server (the demo app on 127.0.0.1: gradio's queue, its event stream, the PNG files
fetched as the page does) and, for comparison, straight from the engine (``pipeline.stream``).

    python benchmarks/demo.py                          # default model, GPT-B + tokenizer v1
    python benchmarks/demo.py --models default --reps 5

``GPT-B`` is tokenizer v1 + GPT-B with random weights of the full sizes at 256 px (as
benchmarks/pipeline.py). Times are medians over ``--reps`` requests after the warm-up (the
demo compiles the default request before serving; that time is ``compile_s``). For G >= 4 token
groups the first preview should arrive within 40% of the time to the final image
(``first/final``).
"""
from __future__ import annotations

import argparse
import os
import socket
import statistics
import sys
import threading
import time

sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parent))
import common  # noqa: E402

from dar_jax import pipeline  # noqa: E402
from dar_jax.data import class_names  # noqa: E402
from dar_jax.demo.engine import Engine  # noqa: E402

DEFAULT = common.REPO / "models" / "default"


def load(name: str, dtype: str | None) -> pipeline.Models:
    if name == "default":
        return pipeline.load_models(str(DEFAULT / "gpt"), str(DEFAULT / "tokenizer"))
    from pipeline import models_for  # benchmarks/pipeline.py: random weights of the full sizes
    return models_for(name, dtype or "float32")


def engine_times(engine: Engine, reps: int) -> tuple[float, float]:
    firsts, finals = [], []
    for seed in range(reps):
        t = time.perf_counter()
        for frame in engine.run(engine.request(seed=seed)):
            if frame.group == 1:
                firsts.append(time.perf_counter() - t)
        finals.append(time.perf_counter() - t)
    return statistics.median(firsts), statistics.median(finals)


def server_times(url: str, engine: Engine, reps: int) -> tuple[float, float]:
    """What the page's client does: join gradio's queue, read the event stream, fetch the first
    preview's PNG; the final time is the last group's PNG fetched."""
    import json
    import uuid

    import httpx
    config = httpx.get(url + "config").json()
    dep = next(d for d in config["dependencies"] if d.get("api_name") == "generate")
    d = engine.defaults()

    def once(seed):
        values = dict(d, seed=seed)
        body = {"data": list(values.values()), "fn_index": dep["id"], "session_hash": uuid.uuid4().hex[:12],
                "event_data": None, "trigger_id": dep["targets"][0][0]}
        first, outputs = None, None
        with httpx.Client(timeout=3600) as c:
            t = time.perf_counter()
            c.post(url + "gradio_api/queue/join", json=body).raise_for_status()
            with c.stream("GET", url + "gradio_api/queue/data", params={"session_hash": body["session_hash"]}) as s:
                for line in s.iter_lines():
                    if not line.startswith("data:"):
                        continue
                    msg = json.loads(line[5:])
                    if msg["msg"] == "process_generating":
                        data = msg["output"]["data"]
                        outputs = data if outputs is None else [_patch(o, ops) for o, ops in zip(outputs, data)]
                        image, group = outputs
                        c.get(image["url"]).raise_for_status()
                        if group == 1:
                            first = time.perf_counter() - t
                        if group == engine.groups:
                            return first, time.perf_counter() - t
                    if msg["msg"] == "process_completed":
                        raise RuntimeError(f"request ended early: {msg}")

    once(100)  # the web path's first call
    firsts, finals = zip(*(once(seed) for seed in range(reps)))
    return statistics.median(firsts), statistics.median(finals)


def _patch(value, ops):
    """Applies gradio's streamed diff ``[[action, path, new], ...]`` (sse_v3) to one output."""
    from gradio_client.utils import apply_diff
    return apply_diff(value, ops)


def serve_in_thread(engine: Engine):
    import urllib.request

    import uvicorn

    from dar_jax.demo import app
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app.create_app(engine), host="127.0.0.1", port=port,
                                           log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    for _ in range(600):
        try:
            urllib.request.urlopen(url + "/health", timeout=5)
            return server, thread, url + "/"
        except OSError:
            time.sleep(0.1)
    raise RuntimeError("the demo server did not start")


def main():
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["default", "GPT-B"])
    ap.add_argument("--dtype", default=None)
    ap.add_argument("--reps", type=int, default=3)
    a = ap.parse_args()
    print(f"machine: {common.machine()}")
    rows = []
    for name in a.models:
        models = load(name, a.dtype)
        engine = Engine(models, class_names.for_model(models.num_classes), dtype=a.dtype)
        t = time.perf_counter()
        engine.warm_up()
        compile_s = time.perf_counter() - t
        e_first, e_final = engine_times(engine, a.reps)
        server, thread, url = serve_in_thread(engine)
        try:
            s_first, s_final = server_times(url, engine, a.reps)
        finally:
            server.should_exit = True
            thread.join(30)
            server.config.app.state.downloads.close()
        row = dict(model=name, resolution=engine.resolution, groups=engine.groups, compile_s=compile_s,
                   engine_first_s=e_first, engine_final_s=e_final, server_first_s=s_first,
                   server_final_s=s_final, first_over_final=s_first / s_final)
        rows.append(row)
        print(row, flush=True)
    print()
    common.print_table(rows, ["model", "resolution", "groups", "compile_s", "engine_first_s", "engine_final_s",
                              "server_first_s", "server_final_s", "first_over_final"])


if __name__ == "__main__":
    main()
