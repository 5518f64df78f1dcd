"""Import speed and host memory of a gpt-oss checkpoint in the real MXFP4 on-disk layout (20b-shaped layers, sharded
safetensors with an index) through `load_pretrained_params`, side by side with transformers' dequantizing load.

  python benchmarks/bench_import.py                          # 2 layers, real vocab: a 3.3 GB checkpoint
  python benchmarks/bench_import.py --layers 4 --dtypes bfloat16 --json
  python benchmarks/bench_import.py --vocab 32000 --devices 8 --no-reference

The checkpoint is written once into `--dir` (default /tmp/numina_import_bench) and reused while it matches the
flags. Every import runs in a fresh subprocess: ours on one CPU device and on an 8-device fsdp mesh (fake CPU
devices), transformers' `from_pretrained(..., quantization_config=Mxfp4Config(dequantize=True))` on torch CPU.
On CPU the loaded parameters live in host memory, so "host peak" is the peak resident memory of the load minus the
bytes of the parameters it returns: what a host needs beyond them, as when they land in accelerator memory. (The
parameters only grow during a load and its temporaries are bounded by a piece, so the peak comes at the end.) The
loader's promise is host peak <= 2x the largest shard file.
Wall times on a shared machine follow its load; CPU seconds (user + system of the child) much less so.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

DEFAULT_DIR = "/tmp/numina_import_bench"
REAL_CONFIG = ROOT.parent / "shared" / "hf" / "gpt-oss-20b" / "config.json"
MARKER = "numina_bench_checkpoint.json"
GIB = 1 << 30
ITEMSIZE = {"float32": 4, "bfloat16": 2}


# The checkpoint ------------------------------------------------------------------------------------------------
def bench_config(layers: int, vocab: int, source: Path) -> dict:
  """The released 20b config.json cut to `layers` layers (and `vocab` tokens); our own 20b defaults when the shared
  folder is absent."""
  if source.exists():
    config = json.loads(source.read_text())
  else:
    from numina_jax.model.config import GptOssConfig
    config = GptOssConfig().to_hf_dict()
    config["quantization_config"] = {"quant_method": "mxfp4", "modules_to_not_convert": [
        "model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"]}
    config["torch_dtype"] = "bfloat16"
  config["num_hidden_layers"] = layers
  config["layer_types"] = ["sliding_attention", "full_attention"] * (layers // 2)
  config["vocab_size"] = vocab
  # A shrunk vocabulary must still hold the special tokens (transformers checks padding_idx < vocab).
  for key, back in (("pad_token_id", 1), ("eos_token_id", 2)):
    if isinstance(config.get(key), int) and config[key] >= vocab:
      config[key] = vocab - back
  return config


def tensor_table(config: dict) -> dict[str, tuple[tuple[int, ...], str]]:
  """{name: (shape, safetensors dtype)} of the released MXFP4 checkpoint (shared/spec/gpt-oss.md, section 2), in
  the module order transformers saves: embedding, layers, final norm, lm_head."""
  V, D, I = config["vocab_size"], config["hidden_size"], config["intermediate_size"]
  E, L = config["num_local_experts"], config["num_hidden_layers"]
  q, kv = config["num_attention_heads"] * config["head_dim"], config["num_key_value_heads"] * config["head_dim"]
  table = {"model.embed_tokens.weight": ((V, D), "BF16")}
  for i in range(L):
    p = f"model.layers.{i}."
    table.update({
        p + "input_layernorm.weight": ((D,), "BF16"),
        p + "self_attn.q_proj.weight": ((q, D), "BF16"), p + "self_attn.q_proj.bias": ((q,), "BF16"),
        p + "self_attn.k_proj.weight": ((kv, D), "BF16"), p + "self_attn.k_proj.bias": ((kv,), "BF16"),
        p + "self_attn.v_proj.weight": ((kv, D), "BF16"), p + "self_attn.v_proj.bias": ((kv,), "BF16"),
        p + "self_attn.o_proj.weight": ((D, q), "BF16"), p + "self_attn.o_proj.bias": ((D,), "BF16"),
        p + "self_attn.sinks": ((config["num_attention_heads"],), "BF16"),
        p + "post_attention_layernorm.weight": ((D,), "BF16"),
        p + "mlp.router.weight": ((E, D), "BF16"), p + "mlp.router.bias": ((E,), "BF16"),
        # MXFP4: [experts, out rows, in / 32 groups, 16 bytes] and one scale byte per group.
        p + "mlp.experts.gate_up_proj_blocks": ((E, 2 * I, D // 32, 16), "U8"),
        p + "mlp.experts.gate_up_proj_scales": ((E, 2 * I, D // 32), "U8"),
        p + "mlp.experts.gate_up_proj_bias": ((E, 2 * I), "BF16"),
        p + "mlp.experts.down_proj_blocks": ((E, D, I // 32, 16), "U8"),
        p + "mlp.experts.down_proj_scales": ((E, D, I // 32), "U8"),
        p + "mlp.experts.down_proj_bias": ((E, D), "BF16"),
    })
  table["model.norm.weight"] = ((D,), "BF16")
  table["lm_head.weight"] = ((V, D), "BF16")
  return table


def nbytes(spec) -> int:
  shape, dtype = spec
  return math.prod(shape) * (2 if dtype == "BF16" else 1)


def random_tensor(rng: np.random.Generator, name: str, spec):
  """Random but valid values: bf16 of magnitude 2^-9..0.5 with random sign and mantissa; any MXFP4 nibble (all 16
  codes are values); scale bytes 116..124 (2^-11..2^-3, the range of trained weights)."""
  import torch

  shape, dtype = spec
  n = math.prod(shape)
  if dtype == "U8":
    raw = np.frombuffer(rng.bytes(n), np.uint8)
    if name.endswith("_scales"):
      raw = 116 + raw % 9
    return torch.from_numpy(raw.reshape(shape).copy())
  bits = np.frombuffer(rng.bytes(2 * n), np.uint16)
  exponent = 118 + (bits >> 7 & 0x7).astype(np.uint16)  # 118..125 of bias 127
  bits = (bits & 0x807F) | (exponent << 7)
  return torch.from_numpy(bits.reshape(shape)).view(torch.bfloat16)


def write_checkpoint(directory: Path, config: dict, max_shard_size: str, seed: int) -> dict:
  """Writes config.json, zero-numbered `model-0000k-of-0000n.safetensors` shards (split the way transformers'
  save_pretrained splits a state dict, by huggingface_hub) and the index; returns the marker written last."""
  from huggingface_hub import split_state_dict_into_shards_factory
  from safetensors.torch import save_file
  from tqdm.auto import tqdm

  table = tensor_table(config)
  split = split_state_dict_into_shards_factory(table, get_storage_size=nbytes, filename_pattern="{suffix}",
                                               max_shard_size=max_shard_size, get_storage_id=lambda spec: None)
  groups = list(split.filename_to_tensors.values())
  files = [f"model-{k:05d}-of-{len(groups) - 1:05d}.safetensors" for k in range(len(groups))]
  directory.mkdir(parents=True, exist_ok=True)
  # The marker says the folder is ours (so a rerun may replace it); until the end it says the write is unfinished.
  (directory / MARKER).write_text(json.dumps({"state": "writing"}))
  for stale in directory.glob("model*.safetensors"):
    stale.unlink()
  rng = np.random.default_rng(seed)
  weight_map = {}
  with tqdm(total=sum(map(nbytes, table.values())), desc=f"writing {directory}", unit="B", unit_scale=True,
            disable=not sys.stderr.isatty()) as bar:
    for file, names in zip(files, groups):
      tensors = {}
      for name in names:
        tensors[name] = random_tensor(rng, name, table[name])
        weight_map[name] = file
        bar.update(nbytes(table[name]))
      save_file(tensors, str(directory / file), metadata={"format": "pt"})
      del tensors
  total = sum(map(nbytes, table.values()))
  (directory / "model.safetensors.index.json").write_text(
      json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
  (directory / "config.json").write_text(json.dumps(config, indent=2))
  marker = {"state": "done", "config": config, "max_shard_size": max_shard_size, "seed": seed,
            "files": {f: (directory / f).stat().st_size for f in files}}
  (directory / MARKER).write_text(json.dumps(marker, indent=2))
  return marker


def ensure_checkpoint(args) -> dict:
  """The checkpoint in `--dir`: reused when its marker matches the flags and every file has its recorded size."""
  directory = Path(args.dir)
  config = bench_config(args.layers, args.vocab, Path(args.config))
  marker_path = directory / MARKER
  if marker_path.exists():
    marker = json.loads(marker_path.read_text())
    same = (marker.get("state") == "done" and marker.get("config") == config and marker.get("max_shard_size") == args.shard_size
            and marker.get("seed") == args.seed)
    sizes_ok = all((directory / f).exists() and (directory / f).stat().st_size == size
                   for f, size in marker.get("files", {}).items())
    if same and sizes_ok:
      return marker
  elif directory.exists() and any(directory.iterdir()):
    raise SystemExit(f"{directory} is not empty and holds no benchmark checkpoint ({MARKER}); nothing there is "
                     "replaced: pass an empty or new --dir")
  need = sum(map(nbytes, tensor_table(config).values()))
  free = os.statvfs(directory.parent if not directory.exists() else directory)
  if free.f_bavail * free.f_frsize < need * 1.05:
    raise SystemExit(f"writing the checkpoint needs {need / 1e9:.1f} GB, {directory} has "
                     f"{free.f_bavail * free.f_frsize / 1e9:.1f} GB free: pass fewer --layers or a smaller --vocab")
  return write_checkpoint(directory, config, args.shard_size, args.seed)


# Measuring a child ---------------------------------------------------------------------------------------------
def _status() -> dict[str, int]:
  out = {}
  with open("/proc/self/status") as f:
    for line in f:
      if line.startswith(("VmRSS:", "VmHWM:")):
        out[line.split(":")[0]] = int(line.split()[1]) * 1024
  return out


class Measure:
  """Wall and CPU seconds, and the resident peak (VmHWM, reset to the current size at the start through
  /proc/self/clear_refs, so the interpreter's and the libraries' start-up do not count) of the code in its block."""

  def __enter__(self):
    try:
      with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
      self.reset = True
    except OSError:  # then the peak includes the start-up
      self.reset = False
    self.baseline_rss = _status()["VmRSS"]
    self._cpu, self._wall = time.process_time(), time.perf_counter()
    return self

  def __exit__(self, *exc):
    self.seconds = time.perf_counter() - self._wall
    self.cpu_seconds = time.process_time() - self._cpu
    self.peak_rss = _status()["VmHWM"]

  def result(self, params_held: int, params_bytes: int) -> dict:
    return {"seconds": self.seconds, "cpu_seconds": self.cpu_seconds, "baseline_rss": self.baseline_rss,
            "peak_rss": self.peak_rss, "params_held": params_held, "params_bytes": params_bytes,
            "host_peak": self.peak_rss - params_held, "peak_reset_at_start": self.reset}


def child_ours(args):
  import jax
  import jax.numpy as jnp
  from numina_jax.hf import load
  from numina_jax.sharding import make_mesh

  if args.device_writes:
    load._fills_on_host = lambda devices: False
  mesh = make_mesh({"fsdp": -1}) if args.ndev > 1 else None
  assert len(jax.devices()) == args.ndev, jax.devices()
  with Measure() as m:
    params, _ = load.load_pretrained_params(args.dir, jnp.dtype(args.dtype), mesh, progress=False)
    jax.block_until_ready(params)
  # Replicas that share one host buffer (CPU devices adopt it without a copy) count once.
  held = {(s.data.unsafe_buffer_pointer(), s.data.nbytes) for a in params.values() for s in a.addressable_shards}
  return m.result(sum(n for _, n in held), sum(a.nbytes for a in params.values()))


def child_reference(args):
  import torch
  from transformers import AutoModelForCausalLM, Mxfp4Config

  with Measure() as m:
    model = AutoModelForCausalLM.from_pretrained(args.dir, quantization_config=Mxfp4Config(dequantize=True),
                                                 dtype=getattr(torch, args.dtype))
  held = sum(p.nbytes for p in model.parameters()) + sum(b.nbytes for b in model.buffers())
  return {**m.result(held, sum(p.nbytes for p in model.parameters())), "threads": torch.get_num_threads()}


def spawn(args, side: str, dtype: str, ndev: int) -> dict:
  env = dict(os.environ)
  env["JAX_PLATFORMS"] = "cpu"
  env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={ndev}").strip()
  env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
  cmd = [sys.executable, __file__, "--dir", args.dir, "--only", side, "--dtype", dtype, "--ndev", str(ndev)]
  cmd += ["--device-writes"] if args.device_writes else []
  out = subprocess.run(cmd, env=env, capture_output=True, text=True)
  lines = [line for line in out.stdout.splitlines() if line.startswith("RESULT ")]
  if out.returncode or not lines:
    sys.stderr.write(out.stdout[-2000:] + out.stderr[-4000:])
    raise SystemExit(f"the {side} import ({dtype}, {ndev} devices) failed with exit code {out.returncode}"
                     + (" (killed: out of memory?)" if out.returncode in (-9, 137) else ""))
  return json.loads(lines[-1][len("RESULT "):])


def warm_page_cache(directory: Path, files) -> None:
  buf = bytearray(16 << 20)
  for file in files:
    with open(directory / file, "rb", buffering=0) as f:
      while f.readinto(buf):
        pass


def mem_available() -> int:
  with open("/proc/meminfo") as f:
    for line in f:
      if line.startswith("MemAvailable:"):
        return int(line.split()[1]) * 1024
  return 0


# Main -----------------------------------------------------------------------------------------------------------
def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--dir", default=DEFAULT_DIR, help="where the checkpoint is written once and reused (default "
                 "%(default)s; a few GB)")
  p.add_argument("--layers", type=int, default=2,
                 help="20b-shaped decoder layers, an even count (about 0.48 GB each on disk)")
  p.add_argument("--vocab", type=int, default=201088,
                 help="vocabulary of the embedding and lm_head (real: 201088, 1.16 GB each in bf16)")
  p.add_argument("--shard-size", default="1GB",
                 help="max_shard_size of the split, as transformers' save_pretrained takes it (a tensor larger "
                      "than this gets a shard of its own)")
  p.add_argument("--seed", type=int, default=0, help="seed of the random checkpoint values")
  p.add_argument("--config", default=str(REAL_CONFIG), help="config.json to cut down (default: the released 20b)")
  p.add_argument("--dtypes", default="float32,bfloat16", help="comma-separated parameter dtypes to import into")
  p.add_argument("--devices", default="1,8",
                 help="comma-separated device counts: 1 device, or an fsdp mesh of that many fake CPU devices")
  p.add_argument("--no-reference", dest="reference", action="store_false",
                 help="skip transformers' load of the same checkpoint")
  p.add_argument("--margin-gb", type=float, default=3.0,
                 help="skip an import that would leave less than this much memory available (GiB)")
  p.add_argument("--device-writes", action="store_true",
                 help="ours writes large shards piece by piece into device buffers, as on TPU and GPU, instead of "
                      "filling host buffers that CPU devices adopt (slow for bf16 on CPU: XLA:CPU writes bf16 "
                      "through f32)")
  p.add_argument("--json", action="store_true", help="print one JSON line instead of the table")
  p.add_argument("--only", choices=["ours", "reference"], help=argparse.SUPPRESS)
  p.add_argument("--dtype", help=argparse.SUPPRESS)
  p.add_argument("--ndev", type=int, default=1, help=argparse.SUPPRESS)
  args = p.parse_args(argv)
  if not args.only:
    if args.layers < 2 or args.layers % 2 or args.vocab < 3:
      p.error("--layers must be a positive even count (the decoder scans sliding, full layer pairs) and --vocab "
              "at least 3")
    args.dtype_list = [d for d in args.dtypes.split(",") if d]
    if not args.dtype_list or set(args.dtype_list) - set(ITEMSIZE):
      p.error(f"--dtypes takes {' and/or '.join(ITEMSIZE)}, comma-separated; got {args.dtypes!r}")
    try:
      args.device_list = [int(n) for n in args.devices.split(",") if n]
    except ValueError:
      args.device_list = []
    if not args.device_list or any(n < 1 for n in args.device_list):
      p.error(f"--devices takes positive device counts, comma-separated; got {args.devices!r}")
  return args


def main(argv=None):
  args = parse_args(argv)
  if args.only:
    result = child_ours(args) if args.only == "ours" else child_reference(args)
    print("RESULT " + json.dumps(result))
    return

  marker = ensure_checkpoint(args)
  files = marker["files"]
  ckpt_bytes, largest = sum(files.values()), max(files.values())
  cfg = marker["config"]
  log = sys.stderr if args.json else sys.stdout
  print(f"checkpoint {args.dir}: {cfg['num_hidden_layers']} layers of gpt-oss-20b shape (MXFP4 experts), vocab "
        f"{cfg['vocab_size']}, {ckpt_bytes / 1e9:.2f} GB in {len(files)} files, largest {largest / 1e9:.2f} GB; "
        f"{os.cpu_count()} cpus, load average {os.getloadavg()[0]:.1f}", file=log)
  from numina_jax.model.config import GptOssConfig
  from numina_jax.model.params import count_params
  n_params = count_params(GptOssConfig.from_hf_dict(cfg))

  plan = [("ours", d, n) for d in args.dtype_list for n in args.device_list]
  if args.reference:
    plan += [("reference", d, 1) for d in args.dtype_list]
  runs, skipped = [], []
  for side, dtype, ndev in plan:
    name = f"{'ours' if side == 'ours' else 'transformers'} {dtype}" + (f", {ndev} devices" if ndev > 1 else "")
    # What the child will hold: the parameters, plus the host peak seen here (ours: under a shard; transformers:
    # about the parameters again).
    held = n_params * ITEMSIZE[dtype]
    need = held + (largest if side == "ours" else held) + args.margin_gb * GIB
    if need > mem_available():
      print(f"{name:27s} skipped: needs about {need / GIB:.1f} GiB (margin {args.margin_gb} GiB included), "
            f"{mem_available() / GIB:.1f} GiB available; fewer --layers or a smaller --vocab would fit", file=log)
      skipped.append({"side": side, "dtype": dtype, "devices": ndev, "needs_bytes": need})
      continue
    warm_page_cache(Path(args.dir), files)  # every import reads from the page cache, none from the disk
    r = spawn(args, side, dtype, ndev)
    r.update(side=side, dtype=dtype, devices=ndev, ckpt_gb_per_s=ckpt_bytes / r["seconds"] / 1e9,
             out_gb_per_s=r["params_bytes"] / r["seconds"] / 1e9,
             ckpt_gb_per_cpu_s=ckpt_bytes / r["cpu_seconds"] / 1e9,
             host_peak_per_largest_shard=r["host_peak"] / largest)
    runs.append(r)
    print(f"{name:27s} {r['seconds']:6.1f} s ({r['cpu_seconds']:5.1f} CPU s)  read {r['ckpt_gb_per_s']:5.3f} GB/s "
          f"({r['ckpt_gb_per_cpu_s']:5.3f} per CPU s), produced {r['out_gb_per_s']:5.3f} GB/s  peak RSS "
          f"{r['peak_rss'] / GIB:5.2f} GiB holding {r['params_held'] / GIB:5.2f} GiB of params: host peak "
          f"{r['host_peak'] / GIB:4.2f} GiB = {r['host_peak_per_largest_shard']:.2f}x largest shard", file=log)

  ratios = {}
  for dtype in args.dtype_list:
    ours = next((r for r in runs if r["side"] == "ours" and r["dtype"] == dtype and r["devices"] == 1), None)
    ref = next((r for r in runs if r["side"] == "reference" and r["dtype"] == dtype), None)
    if ours and ref:
      ratios[dtype] = {k: ours[k] / ref[k] for k in ("seconds", "cpu_seconds", "peak_rss", "host_peak")}
      print(f"ours / transformers, {dtype}, one device: wall time {ratios[dtype]['seconds']:.2f}x, CPU time "
            f"{ratios[dtype]['cpu_seconds']:.2f}x, peak RSS {ratios[dtype]['peak_rss']:.2f}x, host peak "
            f"{ratios[dtype]['host_peak']:.2f}x", file=log)
  worst = max((r["host_peak_per_largest_shard"] for r in runs if r["side"] == "ours"), default=0.0)
  print(f"ours: host memory at most {worst:.2f}x the largest shard ({'within' if worst <= 2 else 'ABOVE'} the 2x "
        "bound)", file=log)
  if args.json:
    print(json.dumps({"device_writes": args.device_writes, "checkpoint": {"dir": args.dir, "layers": cfg["num_hidden_layers"], "vocab": cfg["vocab_size"],
                                     "bytes": ckpt_bytes, "files": len(files), "largest_file_bytes": largest},
                      "cpus": os.cpu_count(), "load_avg_1m": os.getloadavg()[0], "runs": runs, "skipped": skipped,
                      "ours_vs_transformers": ratios, "ours_worst_host_peak_per_largest_shard": worst}))


if __name__ == "__main__":
  main()
