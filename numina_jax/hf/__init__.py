"""Hugging Face interop: the weight map, MXFP4 decoding, streaming load and safetensors export."""

from numina_jax.hf.export import save_pretrained
from numina_jax.hf.load import CheckpointError, load_pretrained, load_pretrained_params

__all__ = ["CheckpointError", "load_pretrained", "load_pretrained_params", "save_pretrained"]
