"""Pallas attention kernels registered behind dar_jax.nn.attention."""
