"""Ahead-of-time plan: compile a config's train step for a TPU slice (or the local devices) without running it,
and report per-device memory and FLOPs, so a config is known to fit before a slice is rented.

  python -m numina_jax.plan --config configs/oss120b_v5.py --topology v5p:4x4x4
  python -m numina_jax.plan --config configs/oss20b_gpu.py --model-config path/to/config.json

TPU topologies need libtpu (`pip install -e '.[tpu]'`); compiling for them works from a CPU host. Exit status 0
when the step fits the device memory, 1 when it does not.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from typing import Any

# Per-chip HBM (GiB) by device kind, used when the backend does not report it.
HBM_GIB = {"tpu v4": 32, "tpu v5 lite": 16, "tpu v5e": 16, "tpu v5p": 95, "tpu v5": 95, "tpu v6 lite": 32,
           "tpu v6e": 32, "tpu7x": 192, "h100": 80, "h200": 141, "a100": 80, "b200": 192}


@dataclasses.dataclass
class Plan:
  devices: int
  device_kind: str
  mesh: dict[str, int]
  params: float  # total parameters
  state_bytes_per_device: float  # params + optimizer state held by one device
  argument_bytes: float
  output_bytes: float
  alias_bytes: float
  temp_bytes: float
  peak_bytes: float  # arguments + temporaries + outputs not aliased to arguments
  hbm_bytes: float | None
  flops_per_device: float | None
  tokens_per_step: int

  @property
  def fits(self) -> bool | None:
    return None if not self.hbm_bytes else self.peak_bytes <= self.hbm_bytes

  def table(self) -> str:
    g = 1024 ** 3
    rows = [
        ("devices", f"{self.devices} x {self.device_kind}"),
        ("mesh", ", ".join(f"{k}={v}" for k, v in self.mesh.items())),
        ("parameters", f"{self.params / 1e9:.2f} B" if self.params >= 1e8 else f"{self.params / 1e6:.2f} M"),
        ("params + optimizer state / device", f"{self.state_bytes_per_device / g:.2f} GiB"),
        ("compiled arguments / device", f"{self.argument_bytes / g:.2f} GiB"),
        ("compiled temporaries / device", f"{self.temp_bytes / g:.2f} GiB"),
        ("peak / device", f"{self.peak_bytes / g:.2f} GiB"),
        ("device memory", "unknown" if not self.hbm_bytes else f"{self.hbm_bytes / g:.1f} GiB"),
        ("fits", {None: "unknown", True: "yes", False: "NO"}[self.fits]),
        ("tokens / step", f"{self.tokens_per_step:,}"),
    ]
    if self.flops_per_device:
      rows.append(("FLOPs / device / step", f"{self.flops_per_device:.3e}"))
    w = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{w}}  {v}" for k, v in rows)


def topology_devices(name: str):
  """The devices of a TPU slice such as 'v5p:4x4x4', for compiling from any host."""
  from jax.experimental import topologies
  try:
    topo = topologies.get_topology_desc(topology_name=name, platform="tpu")
  except Exception as e:  # missing libtpu, unknown name
    raise RuntimeError(f"--topology {name}: could not describe this TPU slice ({type(e).__name__}: {e}). "
                       "It needs libtpu: pip install -e '.[tpu]'") from e
  return list(topo.devices)


def device_memory(device) -> float | None:
  try:
    stats = device.memory_stats()
    if stats and stats.get("bytes_limit"):
      return float(stats["bytes_limit"])
  except Exception:  # topology devices and CPUs report nothing
    pass
  kind = str(getattr(device, "device_kind", "")).lower()
  for name, gib in sorted(HBM_GIB.items(), key=lambda kv: -len(kv[0])):
    if name in kind:
      return gib * 1024 ** 3
  return None


def make_plan(cfg, model_cfg, devices) -> Plan:
  """Lowers and compiles the real jitted train step on abstract, sharded inputs."""
  import jax
  import jax.numpy as jnp
  import numpy as np
  from jax.sharding import NamedSharding, PartitionSpec as P

  from numina_jax.model.attention import resolve_attention, splash_train_flops
  from numina_jax.model.params import count_params, param_specs
  from numina_jax.model.transformer import as_dtype
  from numina_jax.optim import make_optimizer
  from numina_jax.sharding import make_mesh, param_shardings
  from numina_jax.step import BATCH_KEYS, StepConfig, batch_shardings, host_flags_sharding, jit_train_step
  from numina_jax.trainer import NUM_FLAGS, opt_state_shardings

  mesh = make_mesh(dict(cfg.mesh), devices)
  specs = param_specs(model_cfg)
  p_shard = param_shardings(specs, mesh)
  pdt = as_dtype(cfg.model.param_dtype)
  params_abs = {k: jax.ShapeDtypeStruct(s.shape, pdt) for k, s in specs.items()}
  tx, schedule = make_optimizer(cfg, max(cfg.max_steps, 1000))
  o_shard = opt_state_shardings(tx, params_abs, p_shard, mesh)
  rep = NamedSharding(mesh, P())
  state_shard = {"step": rep, "params": p_shard, "opt_state": o_shard}
  opt_abs = jax.eval_shape(tx.init, params_abs)
  state_abs = {
      "step": jax.ShapeDtypeStruct((), jnp.int32, sharding=rep),
      "params": {k: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=p_shard[k]) for k, a in params_abs.items()},
      "opt_state": jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), opt_abs, o_shard),
  }
  b_shard = batch_shardings(mesh)
  shape = (cfg.global_batch_size, cfg.seq_len)
  batch_abs = {k: jax.ShapeDtypeStruct(shape, jnp.float32 if k == "loss_mask" else jnp.int32, sharding=b_shard[k])
               for k in BATCH_KEYS}
  sc = StepConfig.from_config(cfg, model_cfg)
  # The step exactly as the trainer runs it, with the hosts' flags.
  flags_abs = jax.ShapeDtypeStruct((mesh.size, NUM_FLAGS), jnp.int32, sharding=host_flags_sharding(mesh))
  step = jit_train_step(sc, tx, schedule, state_shard, mesh, host_flags=True)
  with jax.set_mesh(mesh):
    compiled = step.lower(state_abs, batch_abs, flags_abs).compile()
    splash = resolve_attention(cfg.model.attention) == "splash"
  mem = compiled.memory_analysis()
  cost = compiled.cost_analysis()
  if isinstance(cost, list):
    cost = cost[0] if cost else {}
  flops = (cost or {}).get("flops")
  if flops and splash:  # the Pallas kernels carry no cost estimate
    micro = cfg.microbatch_size or cfg.global_batch_size
    flops += splash_train_flops(model_cfg, micro, cfg.seq_len, mesh, recompute=cfg.remat_policy != "none") \
        * (cfg.global_batch_size // micro)

  def per_device_bytes(tree) -> float:
    total = 0.0
    for leaf in jax.tree.leaves(tree):
      shard = leaf.sharding.shard_shape(leaf.shape)
      total += float(np.prod(shard)) * jnp.dtype(leaf.dtype).itemsize
    return total

  arg = float(getattr(mem, "argument_size_in_bytes", 0))
  out = float(getattr(mem, "output_size_in_bytes", 0))
  alias = float(getattr(mem, "alias_size_in_bytes", 0))
  temp = float(getattr(mem, "temp_size_in_bytes", 0))
  return Plan(
      devices=len(devices), device_kind=str(getattr(devices[0], "device_kind", devices[0].platform)),
      mesh={k: int(v) for k, v in mesh.shape.items()}, params=float(count_params(model_cfg)),
      state_bytes_per_device=per_device_bytes({"p": state_abs["params"], "o": state_abs["opt_state"]}),
      argument_bytes=arg, output_bytes=out, alias_bytes=alias, temp_bytes=temp,
      peak_bytes=arg + temp + max(out - alias, 0.0), hbm_bytes=device_memory(devices[0]),
      flops_per_device=flops, tokens_per_step=shape[0] * shape[1])


def model_config_from(cfg, model_config_path: str | None):
  from numina_jax.model.config import GptOssConfig
  if model_config_path:
    return GptOssConfig.from_pretrained(model_config_path)
  if cfg.model.hf_path:
    if os.path.isdir(cfg.model.hf_path):
      return GptOssConfig.from_pretrained(cfg.model.hf_path)
    from huggingface_hub import hf_hub_download
    try:
      return GptOssConfig.from_pretrained(hf_hub_download(cfg.model.hf_path, "config.json"))
    except Exception as e:
      raise RuntimeError(f"could not fetch config.json of {cfg.model.hf_path} ({type(e).__name__}); "
                         "pass --model-config PATH (a config.json or checkpoint folder)") from e
  if cfg.model.init_checkpoint:
    from numina_jax.checkpoint import load_model_config
    return load_model_config(cfg.model.init_checkpoint)
  from numina_jax.data import load_tokenizer
  from numina_jax.trainer import model_config_for
  return model_config_for(cfg, load_tokenizer(cfg.data.tokenizer))


def main(argv=None) -> int:
  p = argparse.ArgumentParser(prog="python -m numina_jax.plan", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--config", default=None, help="training config file, `path[:arg]` (default: configs/default.py)")
  p.add_argument("--topology", default=None, help="TPU slice to compile for, e.g. v5p:4x4x4 (default: local devices)")
  p.add_argument("--model-config", default=None, help="config.json (or its folder) of the model, when the "
                 "config's model.hf_path is a Hub id and this host is offline")
  p.add_argument("--json", default=None, help="also write the plan as JSON to this file")
  args, overrides = p.parse_known_args(argv)
  bad = [a for a in overrides if not a.startswith("--config.")]
  if bad:
    p.error(f"unrecognized arguments: {' '.join(bad)}")

  from numina_jax.config import check_overrides, validate
  from numina_jax.train import DEFAULT_CONFIG, load_config_file
  try:
    cfg = load_config_file(args.config or DEFAULT_CONFIG)
    check_overrides(cfg, overrides)
    _apply_overrides(cfg, overrides)
    validate(cfg)
    import jax
    devices = topology_devices(args.topology) if args.topology else jax.devices()
    model_cfg = model_config_from(cfg, args.model_config)
    plan = make_plan(cfg, model_cfg, devices)
  except (FileNotFoundError, ValueError, RuntimeError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  print(plan.table())
  if args.json:
    with open(args.json, "w") as f:
      json.dump({**dataclasses.asdict(plan), "fits": plan.fits}, f, indent=2)
  return 0 if plan.fits in (True, None) else 1


def _apply_overrides(cfg, overrides: list[str]) -> None:
  """`--config.a.b=v` onto a config, parsing v as the field's type."""
  for arg in overrides:
    path, _, raw = arg[len("--config."):].partition("=")
    *parents, leaf = path.split(".")
    node = cfg
    for part in parents:
      node = node[part]
    current: Any = node[leaf]
    if isinstance(current, bool):
      value: Any = raw.lower() in ("1", "true", "yes")
    elif isinstance(current, int):
      value = int(raw)
    elif isinstance(current, float):
      value = float(raw)
    else:
      value = raw
    node[leaf] = value


if __name__ == "__main__":
  sys.exit(main())
