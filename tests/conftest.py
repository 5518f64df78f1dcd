"""Test setup: 8 fake CPU devices (set before jax is imported), the shared folder, a tiny transformers model."""

import os

if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

from helpers import (hf_state_to_params, random_params, require_shared, shared_dir,  # noqa: E402,F401
                     tiny_hf_model)


@pytest.fixture(name="shared_dir")
def shared_dir_fixture() -> Path:
  return shared_dir()


@pytest.fixture(scope="session")
def tiny_hf():
  """(transformers GptOssForCausalLM fp32 eval, our GptOssConfig, our fp32 params as numpy)."""
  return tiny_hf_model(seed=0)
