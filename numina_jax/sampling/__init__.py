"""Sampling: one interface (token ids in, token ids out) over the in-process JAX sampler and HTTP engines."""

from numina_jax.sampling.engine import EngineError, EngineSampler
from numina_jax.sampling.types import Completion, Sampler, SamplingParams

__all__ = ["Completion", "EngineError", "EngineSampler", "JaxSampler", "Sampler", "SamplingParams"]


def __getattr__(name):
  # The JAX sampler imports the model; HTTP backends that only need the types should not pay for that.
  if name == "JaxSampler":
    from numina_jax.sampling.jax_sampler import JaxSampler
    return JaxSampler
  raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
