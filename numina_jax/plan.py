"""Ahead-of-time plan: compile a config's train step for a TPU slice (or the local devices) without running it, and
report per-device memory, the compiled FLOPs against the model's, collective bytes and a roofline step time.

  python -m numina_jax.plan --config configs/oss120b_v5.py          # the slice the config names (config.topology)
  python -m numina_jax.plan --config configs/oss20b_gpu.py --model-config path/to/config.json
  python -m numina_jax.plan --config configs/oss120b_v5.py --sweep '' 'mesh.fsdp=32,mesh.expert=1'

TPU topologies need libtpu (`pip install -e '.[tpu]'`); compiling for them works from a CPU host. Exit status 0
when the step fits the device memory (with --sweep: when a candidate does), 1 when it does not, 2 on bad input.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import subprocess
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
from huggingface_hub import hf_hub_download
from jax.experimental import topologies
from jax.sharding import NamedSharding, PartitionSpec as P
from tqdm.auto import tqdm

from numina_jax import hlo
from numina_jax.checkpoint import load_model_config
from numina_jax.config import DEFAULT_CONFIG, load_config, model_config_for, validate
from numina_jax.data import load_tokenizer
from numina_jax.data.packing import BATCH_KEYS
from numina_jax.metrics import Chip, chip, flops_per_token
from numina_jax.model.attention import resolve_attention, splash_train_flops
from numina_jax.model.config import GptOssConfig
from numina_jax.model.moe import EXPERT_PARAMS, resolve_moe_kernel
from numina_jax.model.params import count_params, param_specs
from numina_jax.model.transformer import as_dtype
from numina_jax.optim import make_optimizer
from numina_jax.sharding import logical_to_spec, make_mesh, opt_state_shardings, param_shardings
from numina_jax.step import NUM_FLAGS, StepConfig, batch_shardings, host_flags_sharding, jit_train_step

@dataclasses.dataclass
class Plan:
  devices: int
  device_kind: str
  topology: str  # the TPU slice compiled for; "" = the local devices
  mesh: dict[str, int]
  remat_policy: str
  params: float  # total parameters
  state_bytes_per_device: float  # params + optimizer state held by one device
  argument_bytes: float
  output_bytes: float
  alias_bytes: float
  temp_bytes: float
  peak_bytes: float  # arguments + temporaries + outputs not aliased to arguments
  hbm_bytes: float | None
  tokens_per_step: int
  # FLOPs per device per step. model: what the model needs (metrics.flops_per_token x tokens / devices).
  # compiled: the whole compiled step (XLA's cost model over every op, loop bodies times their trips, plus the
  # Pallas kernels' own estimates, plus splash attention counted analytically since it carries no estimate).
  model_flops: float
  compiled_flops: float
  xla_flops: float  # the XLA ops of the compiled step (every loop body times its trips)
  kernel_flops: dict[str, float]  # Pallas kernels with a cost estimate (megablox gmm: its whole buffer)
  splash_flops: float  # splash attention, counted analytically (0 when the step does not use it)
  useful_flops: float  # compiled, with the grouped matmuls at the mean routed rows instead of their whole buffer
  cost_analysis_flops: float  # XLA's own figure for the program: each loop body once (for reference)
  hbm_traffic_bytes: float  # bytes the step reads and writes in HBM (cost model, loops times trips, kernels)
  kernel_bytes: dict[str, float]  # of which the Pallas kernels' estimates (megablox: its whole buffer)
  useful_hbm_bytes: float  # hbm_traffic_bytes with the grouped matmuls at the mean routed rows
  collectives: dict[str, dict[str, float]]  # kind -> {count, bytes, ici_bytes} per device per step
  unknown_loops: list[str]  # loops whose trip count could not be read (counted once)
  roofline: dict[str, float]  # compute_s, hbm_s (both at the routed rows), ici_s, step_s, mfu; 0: unknown chip

  @property
  def fits(self) -> bool | None:
    return None if not self.hbm_bytes else self.peak_bytes <= self.hbm_bytes

  @property
  def flops_ratio(self) -> float:
    return self.compiled_flops / self.model_flops if self.model_flops else 0.0

  def as_json(self) -> dict:
    return {**dataclasses.asdict(self), "fits": self.fits, "flops_ratio": self.flops_ratio}

  def table(self) -> str:
    g = 1024 ** 3
    rows = [
        ("devices", f"{self.devices} x {self.device_kind}" + (f" ({self.topology})" if self.topology else "")),
        ("mesh", ", ".join(f"{k}={v}" for k, v in self.mesh.items())),
        ("remat policy", self.remat_policy),
        ("parameters", f"{self.params / 1e9:.2f} B" if self.params >= 1e8 else f"{self.params / 1e6:.2f} M"),
        ("params + optimizer state / device", f"{self.state_bytes_per_device / g:.2f} GiB"),
        ("compiled arguments / device", f"{self.argument_bytes / g:.2f} GiB"),
        ("compiled temporaries / device", f"{self.temp_bytes / g:.2f} GiB"),
        ("peak / device", f"{self.peak_bytes / g:.2f} GiB"
         + (f" ({self.peak_bytes / self.hbm_bytes:.0%} of HBM)" if self.hbm_bytes else "")),
        ("device memory", "unknown" if not self.hbm_bytes else f"{self.hbm_bytes / g:.1f} GiB"),
        ("fits", {None: "unknown", True: "yes", False: "NO"}[self.fits]),
        ("tokens / step", f"{self.tokens_per_step:,}"),
        ("model FLOPs / device / step", f"{self.model_flops:.3e}"),
        ("compiled FLOPs / device / step", f"{self.compiled_flops:.3e} ({self.flops_ratio:.2f} x model)"),
    ]
    for name, f in sorted(self.kernel_flops.items()):
      rows.append((f"  of which {name} kernels", f"{f:.3e}"))
    if self.splash_flops:
      rows.append(("  of which splash (analytic)", f"{self.splash_flops:.3e}"))
    if self.useful_flops != self.compiled_flops:
      rows.append(("  at the mean routed rows", f"{self.useful_flops:.3e} ({self.useful_flops / self.model_flops:.2f}"
                   " x model)"))
    rows.append(("HBM traffic / device / step", f"{self.hbm_traffic_bytes / g:.1f} GiB"))
    if self.useful_hbm_bytes != self.hbm_traffic_bytes:
      rows.append(("  at the mean routed rows", f"{self.useful_hbm_bytes / g:.1f} GiB"))
    for kind, c in self.collectives.items():
      if c["count"]:
        rows.append((f"{kind} / device / step", f"{c['bytes'] / g:.2f} GiB in {c['count']:.0f} ops"))
    r = self.roofline
    if r.get("step_s"):
      rows.append(("roofline step (compute, HBM, ICI)",
                   f"{r['step_s']:.3f} s ({r['compute_s']:.3f}, {r['hbm_s']:.3f}, {r['ici_s']:.3f})"))
      rows.append(("roofline MFU", f"{r['mfu']:.1%}"))
    if self.unknown_loops:
      rows.append(("loops counted once", ", ".join(self.unknown_loops)))
    w = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{w}}  {v}" for k, v in rows)


def roofline(model_flops: float, flops: float, hbm_bytes: float, ici_bytes: float, c: Chip | None):
  """Step time per device if it ran at the chip's peaks, and the MFU that implies.

  Each of compute (`flops` at the bf16 peak), memory (HBM traffic at its bandwidth) and communication (bytes each
  chip sends at half its bidirectional ICI bandwidth, i.e. all its links busy) alone takes at least its time; the
  step is taken as the largest, the three perfectly overlapped: a lower bound, so the MFU is an upper bound.
  """
  if c is None:
    return {"compute_s": 0.0, "hbm_s": 0.0, "ici_s": 0.0, "step_s": 0.0, "mfu": 0.0}
  compute_s = flops / c.peak_flops
  hbm_s = hbm_bytes / c.hbm_bytes_per_s
  ici_s = ici_bytes / (c.ici_bytes_per_s / 2)
  step_s = max(compute_s, hbm_s, ici_s)
  return {"compute_s": compute_s, "hbm_s": hbm_s, "ici_s": ici_s, "step_s": step_s,
          "mfu": model_flops / (step_s * c.peak_flops) if step_s else 0.0}


def topology_devices(name: str):
  """The devices of a TPU slice such as 'v5p:4x4x4', for compiling from any host."""
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
  c = chip(str(getattr(device, "device_kind", "")))
  return c.hbm_gib * 1024 ** 3 if c else None


def compile_step(cfg, model_cfg, devices):
  """The real jitted train step, lowered and compiled on abstract, sharded inputs: (compiled, mesh, state_abs)."""


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
  return compiled, mesh, state_abs


def moe_buffer_fill(cfg, model_cfg, mesh) -> float:
  """The mean share of a device's grouped-matmul rows that hold routed tokens: the MoE sizes its receive buffer
  for the worst case (every peer's assignments landing on one device), while an even load fills X x K of it."""


  micro = cfg.microbatch_size or cfg.global_batch_size
  tokens = micro * cfg.seq_len
  E, K = model_cfg.num_local_experts, model_cfg.num_experts_per_tok
  spec = logical_to_spec(EXPERT_PARAMS["gate_w"], mesh=mesh,
                         shape=(E, model_cfg.hidden_size, model_cfg.intermediate_size))
  token_spec = logical_to_spec(("batch",), mesh=mesh, shape=(tokens,))[0]

  def size(entry) -> int:
    axes = () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)
    return math.prod(mesh.shape[a] for a in axes)

  ep, X = size(spec[0]), tokens // size(token_spec)
  F = E // ep
  buffer = ep * X * min(K, F)
  if cfg.model.moe_capacity_factor:
    buffer = min(buffer, F * math.ceil(cfg.model.moe_capacity_factor * X * ep * K / E))
  return min(X * K, buffer) / buffer


def make_plan(cfg, model_cfg, devices, topology: str = "") -> Plan:
  """Compiles the train step for `devices` and accounts its memory, FLOPs, collectives and roofline time."""


  compiled, mesh, state_abs = compile_step(cfg, model_cfg, devices)
  with jax.set_mesh(mesh):
    splash = resolve_attention(cfg.model.attention) == "splash"
    gmm = resolve_moe_kernel(cfg.model.moe_kernel) == "gmm"
  mem = compiled.memory_analysis()
  cost = compiled.cost_analysis()
  if isinstance(cost, list):
    cost = cost[0] if cost else {}
  costs = hlo.analyze(compiled.as_text(), len(devices))
  micro = cfg.microbatch_size or cfg.global_batch_size
  splash_flops = 0.0
  if splash:  # the Pallas kernels carry no cost estimate
    splash_flops = splash_train_flops(model_cfg, micro, cfg.seq_len, mesh, recompute=cfg.remat_policy != "none") \
        * (cfg.global_batch_size // micro)
  # Kernels without an estimate are uncounted work, unless they are splash's, counted above.
  unexplained = {k for k in costs.kernels_without_estimate if not (splash and "splash" in k)}
  compiled_flops = costs.flops + splash_flops
  gmm_flops = sum(f for k, f in costs.kernel_flops.items() if "gmm" in k)
  gmm_bytes = sum(b for k, b in costs.kernel_bytes.items() if "gmm" in k)
  waste = 1 - moe_buffer_fill(cfg, model_cfg, mesh) if gmm else 0.0
  # Megablox visits only the row tiles that hold routed rows, reading the weights once per such tile.
  useful, useful_bytes = compiled_flops - gmm_flops * waste, costs.hbm_bytes - gmm_bytes * waste
  tokens = cfg.global_batch_size * cfg.seq_len
  model_flops = flops_per_token(model_cfg, cfg.seq_len) * tokens / len(devices)
  c = chip(str(getattr(devices[0], "device_kind", "")))

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
      topology=topology, mesh={k: int(v) for k, v in mesh.shape.items()}, remat_policy=cfg.remat_policy,
      params=float(count_params(model_cfg)),
      state_bytes_per_device=per_device_bytes({"p": state_abs["params"], "o": state_abs["opt_state"]}),
      argument_bytes=arg, output_bytes=out, alias_bytes=alias, temp_bytes=temp,
      peak_bytes=arg + temp + max(out - alias, 0.0), hbm_bytes=device_memory(devices[0]), tokens_per_step=tokens,
      model_flops=model_flops, compiled_flops=compiled_flops, xla_flops=costs.xla_flops,
      kernel_flops=dict(costs.kernel_flops), splash_flops=splash_flops, useful_flops=useful,
      cost_analysis_flops=float((cost or {}).get("flops", 0.0)), hbm_traffic_bytes=costs.hbm_bytes,
      kernel_bytes=dict(costs.kernel_bytes), useful_hbm_bytes=useful_bytes,
      collectives={k: dataclasses.asdict(v) for k, v in costs.collectives.items()},
      unknown_loops=costs.unknown_loops + [f"kernel {k} (no cost estimate)" for k in sorted(unexplained)],
      # Megablox runs only the tiles that hold routed rows (its grid is sized at run time), so the roofline
      # charges the grouped matmuls at the routed rows.
      roofline=roofline(model_flops, useful, useful_bytes, costs.ici_bytes, c))


def model_config_from(cfg, model_config_path: str | None):
  if model_config_path:
    return GptOssConfig.from_pretrained(model_config_path)
  if cfg.model.hf_path:
    if os.path.isdir(cfg.model.hf_path):
      return GptOssConfig.from_pretrained(cfg.model.hf_path)
    try:
      return GptOssConfig.from_pretrained(hf_hub_download(cfg.model.hf_path, "config.json"))
    except Exception as e:
      raise RuntimeError(f"could not fetch config.json of {cfg.model.hf_path} ({type(e).__name__}); "
                         "pass --model-config PATH (a config.json or checkpoint folder)") from e
  if cfg.model.init_checkpoint:
    return load_model_config(cfg.model.init_checkpoint)
  return model_config_for(cfg, load_tokenizer(cfg.data.tokenizer))


def main(argv=None) -> int:
  p = argparse.ArgumentParser(prog="python -m numina_jax.plan", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--config", default=None, help="training config file, `path[:arg]` (default: configs/default.py)")
  p.add_argument("--topology", default=None, help="TPU slice to compile for, e.g. v5p:4x4x4 (default: the "
                 "config's `topology`; 'local' or an empty one: the local devices)")
  p.add_argument("--model-config", default=None, help="config.json (or its folder) of the model, when the "
                 "config's model.hf_path is a Hub id and this host is offline")
  p.add_argument("--json", default=None, help="also write the plan (with --sweep: every candidate's) as JSON here")
  p.add_argument("--sweep", nargs="+", default=None, metavar="CANDIDATE",
                 help="compare candidates instead: each is comma-separated config overrides, e.g. "
                 "'mesh.fsdp=32,mesh.expert=1' or 'remat_policy=save_dots' ('' = the config as is), compiled one "
                 "at a time in a subprocess; prints a table and the fitting candidate with the shortest roofline step")
  p.add_argument("--sweep-logs", default=None, metavar="DIR",
                 help="with --sweep: keep each candidate's output and JSON plan in DIR")
  args, overrides = p.parse_known_args(argv)
  bad = [a for a in overrides if not a.startswith("--config.")]
  if bad:
    p.error(f"unrecognized arguments: {' '.join(bad)}")

  try:
    cfg = load_config([f"--config={args.config or DEFAULT_CONFIG}", *overrides])
    validate(cfg)
    topology = cfg.topology if args.topology is None else args.topology
    topology = "" if topology == "local" else topology
    if args.sweep is not None:
      return sweep(args, overrides, topology, args.sweep)
    devices = topology_devices(topology) if topology else jax.devices()
    model_cfg = model_config_from(cfg, args.model_config)
    plan = make_plan(cfg, model_cfg, devices, topology)
  except (FileNotFoundError, ValueError, RuntimeError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  print(plan.table())
  if args.json:
    with open(args.json, "w") as f:
      json.dump(plan.as_json(), f, indent=2)
  return 0 if plan.fits in (True, None) else 1


def candidate_overrides(candidate: str) -> list[str]:
  """'mesh.fsdp=32,remat_policy=save_dots' -> ['--config.mesh.fsdp=32', '--config.remat_policy=save_dots']."""
  out = []
  for part in filter(None, (x.strip() for x in candidate.split(","))):
    if "=" not in part:
      raise ValueError(f"--sweep candidate {candidate!r}: {part!r} is not KEY=VALUE (e.g. mesh.fsdp=32)")
    out.append("--config." + part.removeprefix("--config."))
  return out


def sweep(args, overrides: list[str], topology: str, candidates: list[str]) -> int:
  """Plans each candidate in its own process (a compile's memory goes back when it exits) and compares them."""

  runs = [(c, candidate_overrides(c)) for c in candidates]
  for c, extra in runs:  # catch a typo or a bad value before minutes of compiling
    validate(load_config([f"--config={args.config or DEFAULT_CONFIG}", *overrides, *extra]))
  logs = args.sweep_logs or tempfile.mkdtemp(prefix="plan_sweep_")
  os.makedirs(logs, exist_ok=True)
  results = []
  for i, (c, extra) in enumerate(tqdm(runs, desc="plan candidates", unit="compile", disable=not sys.stderr.isatty())):
    out_json = os.path.join(logs, f"candidate_{i}.json")
    cmd = [sys.executable, "-m", "numina_jax.plan", "--config", args.config or DEFAULT_CONFIG, "--topology",
           topology or "local", "--json", out_json, *(["--model-config", args.model_config] if args.model_config
                                                      else []), *overrides, *extra]
    t0 = time.time()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    with open(os.path.join(logs, f"candidate_{i}.log"), "w") as f:
      f.write(f"$ {' '.join(cmd)}\n{proc.stdout}\n{proc.stderr}")
    if proc.returncode in (0, 1) and os.path.exists(out_json):
      with open(out_json) as f:
        results.append({"candidate": c, "seconds": time.time() - t0, **json.load(f)})
    else:
      err = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")] or proc.stderr.splitlines()[-1:]
      results.append({"candidate": c, "seconds": time.time() - t0, "error": err[-1] if err else "failed"})
  print(sweep_table(results))
  fitting = [r for r in results if r.get("fits") and r["roofline"]["step_s"]]
  if fitting:
    best = min(fitting, key=lambda r: r["roofline"]["step_s"])
    print(f"\nshortest roofline step that fits: {best['candidate'] or '(the config as is)'}")
  print(f"logs: {logs}")
  if args.json:
    with open(args.json, "w") as f:
      json.dump(results, f, indent=2)
  return 0 if fitting else 1


def sweep_table(results: list[dict]) -> str:
  """A Markdown table of sweep results, one row per candidate."""
  g = 1024 ** 3
  head = ["candidate", "mesh (data, fsdp, expert, tensor)", "remat", "fits", "peak GiB (% HBM)", "compiled / model",
          "useful / model", "HBM GiB (routed)", "all-gather GiB", "reduce-scatter GiB", "all-reduce GiB", "all-to-all GiB",
          "roofline step s (compute, HBM, ICI)", "MFU", "compile s"]
  lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  for r in results:
    if "error" in r:
      lines.append("| " + " | ".join([f"`{r['candidate']}`", r["error"]] + [""] * (len(head) - 2)) + " |")
      continue
    m, col, rf = r["mesh"], r["collectives"], r["roofline"]
    a2a = col["all-to-all"]["bytes"] + col["ragged-all-to-all"]["bytes"]
    pct = f" ({r['peak_bytes'] / r['hbm_bytes']:.0%})" if r.get("hbm_bytes") else ""
    lines.append("| " + " | ".join([
        f"`{r['candidate']}`" if r["candidate"] else "(config)",
        " x ".join(str(m.get(k, 1)) for k in ("data", "fsdp", "expert", "tensor")), r["remat_policy"],
        {None: "?", True: "yes", False: "NO"}[r["fits"]], f"{r['peak_bytes'] / g:.1f}{pct}",
        f"{r['flops_ratio']:.2f}", f"{r['useful_flops'] / r['model_flops']:.2f}",
        f"{r['hbm_traffic_bytes'] / g:.0f} ({r['useful_hbm_bytes'] / g:.0f})",
        f"{col['all-gather']['bytes'] / g:.1f}", f"{col['reduce-scatter']['bytes'] / g:.1f}",
        f"{col['all-reduce']['bytes'] / g:.1f}", f"{a2a / g:.1f}",
        f"{rf['step_s']:.3f} ({rf['compute_s']:.3f}, {rf['hbm_s']:.3f}, {rf['ici_s']:.3f})",
        f"{rf['mfu']:.1%}", f"{r['seconds']:.0f}"]) + " |")
  return "\n".join(lines)


if __name__ == "__main__":
  sys.exit(main())
