"""dar_jax.evaluate (see README: layout)."""
