"""The record of a model family (the GPT, the tokenizer) that the model store, the reference
converters, the training tasks and the pipeline take, instead of branching on kinds."""
from __future__ import annotations

import dataclasses
from typing import Any, Callable


@dataclasses.dataclass(frozen=True)
class Family:
    """kind: the ``kind`` written in a model folder's config.json ("gpt", "tokenizer");
    config_class: the frozen config dataclass; init_params(cfg, key) -> params;
    abstract_params(cfg) -> ShapeDtypeStruct pytree; logical_axes(cfg) -> axis names like the
    params; key_map(cfg) -> {reference torch key: (param path, transform)}."""
    kind: str
    config_class: type
    init_params: Callable[..., Any]
    abstract_params: Callable[..., Any]
    logical_axes: Callable[..., Any]
    key_map: Callable[..., Any]
