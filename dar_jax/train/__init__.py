"""dar_jax.train (see README: layout)."""
