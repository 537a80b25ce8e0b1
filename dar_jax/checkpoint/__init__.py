"""Checkpoints: the project's model layout (orbax), the safe .pt reader, reference converters."""
from dar_jax.checkpoint.store import load_model, read_model_meta, restore_params, save_model
from dar_jax.checkpoint.torch_pickle import (CheckpointError, UnsafePickleError, find_state_dict,
                                             load_torch_file)
