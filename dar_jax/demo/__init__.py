"""The web demo: watch D-AR draw (``python -m dar_jax.demo``, needs the ``demo`` extra).

``engine`` is the part without gradio (validated requests streamed through
``pipeline.stream``); ``app`` is the page, ``GET /health`` and the ``/generate`` API.
"""
