"""dar-jax: D-AR (Diffusion via Autoregressive models) in JAX/Flax."""
__version__ = "0.1.0"
