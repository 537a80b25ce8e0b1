"""Watch D-AR draw: a web page that streams the image after every token group.

    python -m dar_jax.demo                                  # the shipped default model
    python -m dar_jax.demo --gpt ckpt/dar_l --tokenizer ckpt/tokenizer_v1 --port 8080
    python -m dar_jax.demo --gpt D-AR-L-360K.pt --gpt-model GPT-L --tokenizer tokenizer_v1.pt

Serves http://127.0.0.1:7860 (``--host``/``--port``): the page, ``GET /health`` and the
``/generate`` API for gradio_client. The model flags are sample.py's. Needs the ``demo``
extra (``pip install -e '.[demo]'``).
"""
from __future__ import annotations

import argparse
import errno
import importlib.util
import socket
import sys

from dar_jax import sample_cli


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m dar_jax.demo", description="D-AR web demo.",
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--host", default="127.0.0.1", help="address to serve on")
    ap.add_argument("--port", type=int, default=7860)
    sample_cli.add_model_arguments(ap)
    ap.add_argument("--class-names", default=None,
                    help="file with one class name a line (default: ImageNet's names for 1000 "
                         "classes, the synthetic shapes' for the built-in dataset)")
    ap.add_argument("--max-images", type=int, default=16, help="largest grid a request may ask for")
    ap.add_argument("--max-steps", type=int, default=256, help="most decoder steps a request may ask for")
    ap.add_argument("--concurrency", type=int, default=1, help="requests generating at once")
    ap.add_argument("--queue-size", type=int, default=32, help="requests that may wait in the queue")
    ap.add_argument("--max-upload-mb", type=int, default=20, help="largest layout upload")
    ap.add_argument("--no-warmup", dest="warmup", action="store_false",
                    help="do not compile the default request before serving")
    return ap


def run(args) -> None:
    from dar_jax.demo.engine import DemoInputError
    for flag, value in (("--max-images", args.max_images), ("--max-steps", args.max_steps),
                        ("--concurrency", args.concurrency), ("--queue-size", args.queue_size),
                        ("--max-upload-mb", args.max_upload_mb)):
        if value < 1:
            raise DemoInputError(f"{flag} must be >= 1, got {value}")
    if not 0 < args.port < 65536:
        raise DemoInputError(f"--port must lie in [1, 65535], got {args.port}")
    _check_port(args.host, args.port)
    if importlib.util.find_spec("gradio") is None:
        raise DemoInputError("the demo needs gradio: pip install -e '.[demo]'")
    from dar_jax.data import class_names
    from dar_jax.demo.engine import Engine

    models = sample_cli.load_models(args)
    names = class_names.for_model(models.num_classes, args.class_names)
    engine = Engine(models, names, dtype=args.dtype, max_images=args.max_images,
                    max_steps=args.max_steps, source={"gpt": args.gpt, "tokenizer": args.tokenizer})
    if args.warmup:
        print("compiling the default request ...", flush=True)
        engine.warm_up()
    from dar_jax.demo import app
    app.serve(engine, args.host, args.port, concurrency=args.concurrency,
              queue_size=args.queue_size, max_upload_mb=args.max_upload_mb)


def _check_port(host: str, port: int) -> None:
    """A clear error now rather than after loading and compiling."""
    from dar_jax.demo.engine import DemoInputError
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as e:
        raise DemoInputError(f"--host {host!r} does not resolve: {e}") from None
    family, _, _, _, addr = infos[0]
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(addr)
        except OSError as e:
            why = "is in use" if e.errno == errno.EADDRINUSE else f"cannot be served ({e.strerror})"
            raise DemoInputError(f"{host}:{port} {why}: choose another --port or --host") from None


def main(argv=None) -> int:
    from dar_jax.cli import guarded_main
    args = build_parser().parse_args(argv)
    return guarded_main(lambda: run(args))


if __name__ == "__main__":
    sys.exit(main())
