"""Sampling: one interface (token ids in, token ids out) over the in-process JAX sampler and HTTP engines."""

from numina_jax.sampling.engine import EngineError, EngineSampler
from numina_jax.sampling.types import Completion, Sampler, SamplingParams

__all__ = ["Completion", "EngineError", "EngineSampler", "Sampler", "SamplingParams"]
