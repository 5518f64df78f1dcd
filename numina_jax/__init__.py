"""numina_jax: fine-tune gpt-oss on NuminaMath with JAX/Flax, and evaluate it with SC-TIR."""

__version__ = "0.1.0"
