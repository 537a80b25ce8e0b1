"""dar_jax.sampling (see README: layout)."""
