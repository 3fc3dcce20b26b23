"""Spectron-JAX: a spoken language model on spectrograms (arXiv 2305.15255) in JAX/Flax."""

__version__ = "0.1.0"
