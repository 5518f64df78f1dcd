"""The ahead-of-time plan compiles the real train step on sharded abstract inputs and accounts memory."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import jax  # noqa: E402
import pytest  # noqa: E402

from numina_jax.config import base_config  # noqa: E402
from numina_jax.model import count_params, tiny_config  # noqa: E402
from numina_jax.plan import make_plan, main  # noqa: E402


def test_plan_on_a_sharded_mesh():
  if jax.device_count() < 8:
    pytest.skip("needs 8 devices (XLA_FLAGS=--xla_force_host_platform_device_count=8 before importing jax)")
  cfg = base_config()
  cfg.global_batch_size, cfg.seq_len = 8, 64
  cfg.mesh.fsdp, cfg.mesh.tensor = 4, 2
  cfg.model.dtype = "float32"
  model_cfg = tiny_config(vocab_size=256, hidden_size=64, intermediate_size=32, num_attention_heads=4,
                          num_key_value_heads=2, head_dim=16, num_local_experts=4)
  plan = make_plan(cfg, model_cfg, jax.devices())
  assert plan.devices == 8 and plan.mesh == {"data": 1, "fsdp": 4, "expert": 1, "tensor": 2}
  assert plan.params == count_params(model_cfg)
  # fp32 params + two fp32 Adam moments, split over the 8 devices (every tiny dim divides, except norms).
  full_state = 3 * 4 * plan.params
  assert full_state / 8 <= plan.state_bytes_per_device < full_state / 2
  assert plan.argument_bytes >= plan.state_bytes_per_device
  assert plan.temp_bytes > 0 and plan.peak_bytes >= plan.argument_bytes
  assert plan.flops_per_device and plan.flops_per_device > 0
  assert "peak / device" in plan.table()


def test_cli_errors_name_the_problem(capsys):
  assert main(["--config.lrr=1"]) == 2
  assert "did you mean --config.lr" in capsys.readouterr().err
  assert main(["--config", "nowhere.py"]) == 2
  assert "no config file at nowhere.py" in capsys.readouterr().err
