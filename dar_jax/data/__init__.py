"""dar_jax.data (see README: layout)."""
