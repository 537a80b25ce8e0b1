"""dar_jax.parallel (see README: layout)."""
