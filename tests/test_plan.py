"""The ahead-of-time plan compiles the real train step on sharded abstract inputs and accounts memory."""


import jax  # noqa: E402
import pytest  # noqa: E402

import json  # noqa: E402

from numina_jax.config import base_config  # noqa: E402
from numina_jax.metrics import CHIPS, flops_per_token, mean_keys  # noqa: E402
from numina_jax.model import count_params, tiny_config  # noqa: E402
from numina_jax.plan import candidate_overrides, make_plan, main, roofline, sweep_table  # noqa: E402
from helpers import tpu_devices  # noqa: E402


def test_model_flops_by_hand():
  # Positions 0..9 see 1..10 keys causally (mean 5.5); with a window of 7: 1..7, then 7 (49 / 10).
  assert mean_keys(10, None) == 5.5 and mean_keys(10, 7) == 4.9 and mean_keys(5, 7) == 3.0
  cfg = tiny_config()  # D 48, I 40, 4 layers, 6 heads of 16 over 2 kv heads, 5 experts top-2, window 7, vocab 512
  attn = 48 * (6 + 2 * 2) * 16 + 6 * 16 * 48  # q, k, v, o
  experts = 2 * 3 * 48 * 40 + 48 * 5  # top-2 of gate, up, down; the router
  active = 4 * (attn + experts) + 48 * 512  # and the lm_head (the embedding is a lookup)
  scores = 4 * 6 * 16 * 2 * (4.9 + 5.5)  # q.k and p.v per key, 2 (sliding, full) pairs
  assert flops_per_token(cfg, 10) == pytest.approx(3 * (2 * active + scores), rel=1e-12)


def test_roofline_takes_the_slowest_resource():
  v5p = CHIPS["tpu v5p"]
  r = roofline(100e12, 459e12, 2765e9 * 2, 600e9 * 0.5, v5p)  # 1 s of compute, 2 s of HBM, 0.5 s of ICI
  assert (r["compute_s"], r["hbm_s"], r["ici_s"], r["step_s"]) == pytest.approx((1, 2, 0.5, 2))
  assert r["mfu"] == pytest.approx(100e12 / (2 * 459e12))
  assert roofline(1, 1, 1, 1, None)["step_s"] == 0


def tiny_plan(layers: int):
  cfg = base_config()
  cfg.global_batch_size, cfg.seq_len = 8, 64
  cfg.mesh.fsdp, cfg.mesh.tensor = 4, 2
  cfg.model.dtype = "float32"
  cfg.remat_policy = "none"
  model_cfg = tiny_config(vocab_size=256, hidden_size=64, intermediate_size=32, num_attention_heads=4,
                          num_key_value_heads=2, head_dim=16, num_local_experts=4, num_hidden_layers=layers)
  return model_cfg, make_plan(cfg, model_cfg, jax.devices())


def test_plan_on_a_sharded_mesh():
  if jax.device_count() < 8:
    pytest.skip("needs 8 devices (XLA_FLAGS=--xla_force_host_platform_device_count=8 before importing jax)")
  model_cfg, plan = tiny_plan(2)
  assert plan.devices == 8 and plan.mesh == {"data": 1, "fsdp": 4, "expert": 1, "tensor": 2}
  assert plan.params == count_params(model_cfg)
  # fp32 params + two fp32 Adam moments, split over the 8 devices (every tiny dim divides, except norms).
  full_state = 3 * 4 * plan.params
  assert full_state / 8 <= plan.state_bytes_per_device < full_state / 2
  assert plan.argument_bytes >= plan.state_bytes_per_device
  assert plan.temp_bytes > 0 and plan.peak_bytes >= plan.argument_bytes
  assert plan.model_flops == flops_per_token(model_cfg, 64) * 8 * 64 / 8
  # Without remat the step computes at least what the model needs (the blockwise attention computes whole
  # blocks, the tiled MoE whole tiles; softmax, norms and the optimizer add a little); a tiny model's
  # elementwise work weighs more than a real one's, hence the loose upper bound.
  assert 1.0 < plan.flops_ratio < 3.0
  assert plan.useful_flops == plan.compiled_flops and plan.splash_flops == 0 and not plan.kernel_flops
  assert plan.collectives["all-gather"]["count"] > 0 and plan.collectives["all-gather"]["bytes"] > 0
  assert not plan.unknown_loops and plan.roofline["step_s"] == 0  # CPU: no chip figures
  table = plan.table()
  for row in ("peak / device", "model FLOPs / device / step", "compiled FLOPs / device / step", "all-gather"):
    assert row in table

  # Two more layers add what two more layers need: XLA's own cost analysis counts the scanned pair once, the plan
  # counts it per pair.
  model_cfg4, plan4 = tiny_plan(4)
  added = plan4.compiled_flops - plan.compiled_flops
  assert plan4.cost_analysis_flops < 1.2 * plan.cost_analysis_flops
  assert 1.0 < added / (plan4.model_flops - plan.model_flops) < 2.0


def test_cli_plans_the_config_topology(tmp_path):
  """A tiny model on v5p:2x2x1 through the CLI: the topology comes from the config, the kernels are TPU's (splash
  attention, megablox grouped matmuls behind expert-parallel dispatch), and the JSON carries the new figures."""
  tpu_devices()
  model_cfg = tiny_config(vocab_size=512, hidden_size=256, intermediate_size=128, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, head_dim=128, num_local_experts=8,
                          num_experts_per_tok=2, sliding_window=128)
  (tmp_path / "config.json").write_text(json.dumps(model_cfg.to_hf_dict()))
  out = tmp_path / "plan.json"
  assert main(["--model-config", str(tmp_path), "--json", str(out), "--config.topology=v5p:2x2x1",
               "--config.global_batch_size=4", "--config.seq_len=512", "--config.mesh.fsdp=2",
               "--config.mesh.expert=2", "--config.remat_policy=full"]) == 0
  got = json.loads(out.read_text())
  assert got["topology"] == "v5p:2x2x1" and got["devices"] == 4 and got["fits"] is True
  tokens = 4 * 512
  assert got["model_flops"] == pytest.approx(flops_per_token(model_cfg, 512) * tokens / 4)
  assert set(got["kernel_flops"]) == {"gmm", "tgmm"} and got["splash_flops"] > 0
  # Full remat runs the forward twice: at least 4/3 of the model's 3 forwards. Splash's 512-token tiles compute
  # whole tiles (the window-128 layers 4x what they need) and its backward 7 matmuls to the model's 4; the
  # MoE buffer holds 2x the routed rows (2 devices); at this size that stays under 3x the model.
  assert 4 / 3 < got["flops_ratio"] < 3.0
  assert got["useful_flops"] < got["compiled_flops"]
  assert got["collectives"]["ragged-all-to-all"]["count"] > 0
  r = got["roofline"]
  assert r["step_s"] == max(r["compute_s"], r["hbm_s"], r["ici_s"]) > 0 and 0 < r["mfu"] < 1
  assert not got["unknown_loops"]


def test_sweep_table_and_candidates():
  assert candidate_overrides("mesh.fsdp=32, remat_policy=none") == ["--config.mesh.fsdp=32",
                                                                     "--config.remat_policy=none"]
  assert candidate_overrides("") == []
  with pytest.raises(ValueError, match="'mesh.fsdp' is not KEY=VALUE"):
    candidate_overrides("mesh.fsdp")
  g = 1024 ** 3
  coll = {k: {"count": 1, "bytes": g, "ici_bytes": g} for k in ("all-gather", "reduce-scatter", "all-reduce",
                                                                  "all-to-all", "ragged-all-to-all")}
  row = {"candidate": "mesh.fsdp=32", "seconds": 12.0, "mesh": {"data": 1, "fsdp": 32, "expert": 1, "tensor": 2},
         "remat_policy": "full", "fits": True, "peak_bytes": 50 * g, "hbm_bytes": 100 * g, "flops_ratio": 1.5,
         "useful_flops": 3.0, "model_flops": 2.0, "collectives": coll,
         "hbm_traffic_bytes": 300 * g, "useful_hbm_bytes": 100 * g,
         "roofline": {"step_s": 2.0, "compute_s": 1.0, "hbm_s": 0.5, "ici_s": 2.0, "mfu": 0.25}}
  table = sweep_table([row, {"candidate": "mesh.fsdp=3", "seconds": 1.0, "error": "error: bad mesh"}])
  lines = table.splitlines()
  assert len(lines) == 4 and lines[2].startswith("| `mesh.fsdp=32` | 1 x 32 x 1 x 2 | full | yes | 50.0 (50%) | 1.50 | 1.50 | 300 (100) | 1.0 |")
  assert "2.0 | 2.000 (1.000, 0.500, 2.000) | 25.0% | 12 |" in lines[2] and "error: bad mesh" in lines[3]


def test_cli_errors_name_the_problem(capsys):
  assert main(["--config.lrr=1"]) == 2
  assert "did you mean --config.lr" in capsys.readouterr().err
  assert main(["--config", "nowhere.py"]) == 2
  assert "no config file at nowhere.py" in capsys.readouterr().err
  assert main(["--config.topology=v5p-4x4x4"]) == 2
  assert "config.topology: 'v5p-4x4x4' is not a TPU slice" in capsys.readouterr().err
  assert main(["--sweep", "remat_policy=none", "mesh.fsdpp=2"]) == 2  # before any compile
  assert "did you mean --config.mesh.fsdp" in capsys.readouterr().err
