"""dar_jax.tokenizer (see README: layout)."""
