"""Training-step throughput (forward + backward + AdamW) of our gpt-oss against transformers' GptOssForCausalLM.

Both sides run the bench config of shared/spec/performance-notes.md on CPU, with the same weights and the same
tokens, each in its own subprocess so that peak memory (max RSS) is measured per side:

  python benchmarks/bench_model.py                       # ours (auto kernel) vs transformers
  python benchmarks/bench_model.py --kernel dense --remat full --steps 3
  python benchmarks/bench_model.py --attention dense     # the reference attention (every score, masked)
  python benchmarks/bench_model.py --breakdown           # per-block fwd+bwd times: attention vs MoE
  python benchmarks/bench_model.py --json                # the same run, one JSON line on stdout
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import subprocess
import sys
import time

# hidden 512, 4 layers, 8 heads of 64, 2 kv heads, 16 experts top-4, expert width 512, vocab 8192.
BENCH = dict(vocab_size=8192, hidden_size=512, intermediate_size=512, num_hidden_layers=4, num_attention_heads=8,
             num_key_value_heads=2, head_dim=64, num_local_experts=16, num_experts_per_tok=4, sliding_window=128,
             pad_token_id=0, eos_token_id=1)
LR, WEIGHT_DECAY = 1e-4, 0.01


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--steps", type=int, default=5, help="timed steps (after the warm-up steps)")
  p.add_argument("--warmup", type=int, default=2, help="untimed steps first (compilation, allocator warm-up)")
  p.add_argument("--seq", type=int, default=1024, help="sequence length")
  p.add_argument("--batch", type=int, default=4, help="sequences per step")
  p.add_argument("--kernel", default="auto", choices=["auto", "tiled", "ragged", "gmm", "dense"], help="our MoE kernel")
  p.add_argument("--attention", default="auto", choices=["auto", "xla", "dense"],
                 help="our attention implementation (auto: blockwise xla on CPU)")
  p.add_argument("--tile", type=int, default=None,
                 help="row tile of the tiled MoE kernel (default: the model's; 256 is fastest on the bench config)")
  p.add_argument("--remat", default="save_dots",
                 help="our remat policy (numina_jax.model.REMAT_POLICIES; save_dots: least CPU time and memory here)")
  p.add_argument("--loss-chunk", type=int, default=128,
                 help="sequence chunk of our lm_head + cross-entropy (numina_jax.loss; 0: all logits at once)")
  p.add_argument("--threads", type=int, default=2, help="CPU threads for each side")
  p.add_argument("--only", choices=["ours", "reference"], help="run one side in this process (internal)")
  p.add_argument("--breakdown", action="store_true", help="time one attention block and one MoE block")
  p.add_argument("--json", action="store_true",
                 help="print one JSON line on stdout (ours_tokens_per_s, reference_tokens_per_s, ratio, ...); the "
                      "readable lines go to stderr")
  return p.parse_args(argv)


def pin_threads(n: int) -> None:
  cpus = sorted(os.sched_getaffinity(0))
  os.sched_setaffinity(0, cpus[:n])


def make_params(cfg, seed: int = 0):
  """Our flat fp32 params, as the model's own initializer would draw them (normal 0.02, zero biases, unit norms),
  but with numpy so the reference side can load the very same values."""
  import numpy as np
  from numina_jax.model.params import param_specs
  rng = np.random.default_rng(seed)
  out = {}
  for name, spec in param_specs(cfg).items():
    if spec.init == "zeros":
      out[name] = np.zeros(spec.shape, np.float32)
    elif spec.init == "ones":
      out[name] = np.ones(spec.shape, np.float32)
    else:
      out[name] = (cfg.initializer_range * rng.standard_normal(spec.shape, np.float32)).astype(np.float32)
  return out


def make_tokens(cfg, batch: int, seq: int):
  import numpy as np
  return np.random.default_rng(1).integers(0, cfg.vocab_size, (batch, seq)).astype(np.int32)


def peak_rss_mib() -> float:
  import resource
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def cpu_s() -> float:
  """User + system CPU seconds of this process, all threads: unlike wall time, barely moved by other jobs."""
  import resource
  r = resource.getrusage(resource.RUSAGE_SELF)
  return r.ru_utime + r.ru_stime


def run_ours(args, cfg):
  import jax
  import jax.numpy as jnp
  import optax
  from numina_jax.loss import lm_head_ce
  from numina_jax.model import forward
  params = jax.tree.map(jnp.asarray, make_params(cfg))
  ids = jnp.asarray(make_tokens(cfg, args.batch, args.seq))
  # The mean next-token cross-entropy over the first T-1 positions, as the reference's `labels=ids` loss.
  targets = jnp.concatenate([ids[:, 1:], jnp.zeros_like(ids[:, :1])], axis=1)
  mask = jnp.ones(ids.shape, jnp.float32).at[:, -1].set(0)
  opt = optax.adamw(LR, weight_decay=WEIGHT_DECAY)
  opt_state = opt.init(params)

  tile = {} if args.tile is None else {"moe_tile": args.tile}

  def loss_fn(p, ids):
    h = forward(p, ids, cfg, remat_policy=args.remat, moe_kernel=args.kernel, attention=args.attention,
                return_hidden=True, **tile)
    ce, _ = lm_head_ce(h, p["lm_head"], targets, mask, chunk=args.loss_chunk, dtype=jnp.float32)
    return ce / jnp.sum(mask)

  @functools.partial(jax.jit, donate_argnums=(0, 1))
  def step(p, s, ids):
    loss, g = jax.value_and_grad(loss_fn)(p, ids)
    updates, s = opt.update(g, s, p)
    return optax.apply_updates(p, updates), s, loss

  times, cpu, losses = [], [], []
  for i in range(args.warmup + args.steps):
    t, c = time.perf_counter(), cpu_s()
    params, opt_state, loss = step(params, opt_state, ids)
    losses.append(float(loss))  # blocks until the step is done
    times.append(time.perf_counter() - t)
    cpu.append(cpu_s() - c)
  return times[args.warmup:], cpu[args.warmup:], losses


def load_reference(cfg):
  import numpy as np
  import torch
  from transformers import GptOssConfig as HFConfig, GptOssForCausalLM
  from numina_jax.hf import keymap
  model = GptOssForCausalLM(HFConfig(**cfg.to_hf_dict()))
  params = make_params(cfg)
  state = {}
  for entry in keymap.ENTRIES:
    for layer in (range(cfg.num_hidden_layers) if entry.per_layer else [None]):
      src = {k: (v[layer] if layer is not None else v) for k, v in params.items()
             if k.startswith("layers/") == entry.per_layer}
      name = entry.hf_name.format(i=layer) if entry.per_layer else entry.hf_name
      state[name] = torch.from_numpy(np.ascontiguousarray(keymap.ours_to_hf(src, cfg, layer, entry)))
  missing, unexpected = model.load_state_dict(state, strict=False)
  assert not unexpected and not [m for m in missing if "rotary" not in m], (missing, unexpected)
  return model


def run_reference(args, cfg):
  import torch
  torch.set_num_threads(args.threads)
  model = load_reference(cfg).train()
  ids = torch.from_numpy(make_tokens(cfg, args.batch, args.seq)).long()
  opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=WEIGHT_DECAY)
  times, cpu, losses = [], [], []
  for i in range(args.warmup + args.steps):
    t, c = time.perf_counter(), cpu_s()
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    losses.append(float(loss))
    times.append(time.perf_counter() - t)
    cpu.append(cpu_s() - c)
  impl = (model.config._attn_implementation, model.config._experts_implementation)
  return times[args.warmup:], cpu[args.warmup:], losses, impl


def breakdown_ours(args, cfg, reps=5):
  """fwd+bwd seconds of one decoder layer's attention block and MoE block (sliding and full masks)."""
  import jax
  import jax.numpy as jnp
  import numpy as np
  from numina_jax.model import attention, layers, moe as moe_lib
  from numina_jax.model.config import yarn_inv_freq
  params = make_params(cfg)
  p = {k.split("/")[1]: jnp.asarray(v[0]) for k, v in params.items() if k.startswith("layers/")}
  B, T, D = args.batch, args.seq, cfg.hidden_size
  x = jnp.asarray(np.random.default_rng(2).standard_normal((B, T, D), np.float32))
  inv, factor = yarn_inv_freq(cfg)
  cos, sin = layers.rope_cos_sin(jnp.broadcast_to(jnp.arange(T), (B, T)), inv, factor, jnp.float32)
  seg = jnp.ones((B, T), jnp.int32)
  kernel = moe_lib.resolve_moe_kernel(args.kernel)
  impl = attention.resolve_attention(args.attention)

  def attn(p, x, window):
    return jnp.sum(attention.attention(p, x, cos, sin, seg, window=window, impl=impl))

  def moe(p, x):
    y, _, _ = moe_lib.moe(p, x, top_k=cfg.num_experts_per_tok, limit=cfg.swiglu_limit, alpha=cfg.swiglu_alpha,
                          kernel=kernel, tile=args.tile or 0)
    return jnp.sum(y)

  out = {}
  for name, fn, extra in [("attention_full", attn, (None,)), ("attention_sliding", attn, (cfg.sliding_window,)),
                          (f"moe_{kernel}", moe, ())]:
    g = jax.jit(jax.grad(fn, argnums=(0, 1)), static_argnums=(2,) if extra else ())
    jax.block_until_ready(g(p, x, *extra))
    t = time.perf_counter()
    for _ in range(reps):
      jax.block_until_ready(g(p, x, *extra))
    out[name] = (time.perf_counter() - t) / reps
  return out


def breakdown_reference(args, cfg, reps=5):
  import torch
  torch.set_num_threads(args.threads)
  model = load_reference(cfg).train()
  layer = model.model.layers[0]
  B, T, D = args.batch, args.seq, cfg.hidden_size
  x = torch.randn(B, T, D, requires_grad=True)
  pos = torch.arange(T)[None].expand(B, T)
  cos_sin = model.model.rotary_emb(x, pos)
  i, j = torch.arange(T)[:, None], torch.arange(T)[None, :]
  neg = torch.finfo(torch.float32).min

  def mask(allowed):
    return torch.where(allowed, 0.0, neg)[None, None].expand(B, 1, T, T)

  full, sliding = mask(j <= i), mask((j <= i) & (i - j < cfg.sliding_window))
  out = {}
  for name, fn in [("attention_full", lambda: layer.self_attn(x, cos_sin, full)[0]),
                   ("attention_sliding", lambda: layer.self_attn(x, cos_sin, sliding)[0]),
                   (f"moe_{model.config._experts_implementation}", lambda: layer.mlp(x)[0])]:
    fn().sum().backward()
    t = time.perf_counter()
    for _ in range(reps):
      fn().sum().backward()
    out[name] = (time.perf_counter() - t) / reps
  return out


def child(args):
  pin_threads(args.threads)
  from numina_jax.model import tiny_config
  cfg = tiny_config(**BENCH)
  if args.breakdown:
    fn = breakdown_ours if args.only == "ours" else breakdown_reference
    result = {"breakdown_s": fn(args, cfg)}
  elif args.only == "ours":
    times, cpu, losses = run_ours(args, cfg)
    result = {"times": times, "cpu_s": cpu, "losses": losses}
  else:
    times, cpu, losses, impl = run_reference(args, cfg)
    result = {"times": times, "cpu_s": cpu, "losses": losses, "impl": impl}
  result["peak_rss_mib"] = peak_rss_mib()
  print("RESULT " + json.dumps(result))


def median(xs):
  return sorted(xs)[len(xs) // 2]


def spawn(side: str, argv: list[str], threads: int, script: str = __file__) -> dict:
  """Runs `script argv --only side` in a fresh process on one CPU device and `threads` threads; its RESULT line."""
  env = dict(os.environ)
  env.setdefault("JAX_PLATFORMS", "cpu")
  env["OMP_NUM_THREADS"] = str(threads)
  env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=1").strip()
  out = subprocess.run([sys.executable, script, *argv, "--only", side], env=env, capture_output=True, text=True)
  lines = [line for line in out.stdout.splitlines() if line.startswith("RESULT ")]
  if out.returncode or not lines:
    sys.stderr.write(out.stderr[-4000:])
    raise SystemExit(f"{side} run failed (exit {out.returncode})")
  return json.loads(lines[-1][len("RESULT "):])


def main(argv=None):
  argv = sys.argv[1:] if argv is None else argv
  args = parse_args(argv)
  if args.only:
    return child(args)
  tokens = args.batch * args.seq
  log = sys.stderr if args.json else sys.stdout
  print(f"bench config: {BENCH}; batch {args.batch} x seq {args.seq} = {tokens} tokens/step, fp32, AdamW, "
        f"{args.threads} threads; ours: kernel={args.kernel} tile={args.tile or 'default'} remat={args.remat} "
        f"attention={args.attention} loss_chunk={args.loss_chunk}", file=log)
  results = {side: spawn(side, argv, args.threads) for side in ("ours", "reference")}
  setup = {"config": BENCH, "batch": args.batch, "seq": args.seq, "threads": args.threads, "kernel": args.kernel,
           "tile": args.tile, "remat": args.remat, "attention": args.attention, "loss_chunk": args.loss_chunk}
  if args.breakdown:
    for side, r in results.items():
      parts = ", ".join(f"{k} {v * 1e3:.0f} ms" for k, v in r["breakdown_s"].items())
      print(f"{side:9s}: fwd+bwd per block: {parts}", file=log)
    if args.json:
      print(json.dumps({**setup, "ours_breakdown_s": results["ours"]["breakdown_s"],
                        "reference_breakdown_s": results["reference"]["breakdown_s"]}))
    return
  rates, cpus = {}, {}
  out = dict(setup, steps=args.steps, warmup=args.warmup, load_average=os.getloadavg()[0])
  for side, r in results.items():
    med = median(r["times"])
    rates[side], cpus[side] = tokens / med, median(r["cpu_s"])
    extra = f" ({r['impl'][0]} attention, {r['impl'][1]} experts)" if "impl" in r else ""
    print(f"{side:9s}: {rates[side]:8.0f} tokens/s  median step {med:6.2f} s ({cpus[side]:6.2f} CPU s)  peak RSS "
          f"{r['peak_rss_mib']:6.0f} MiB  loss {r['losses'][0]:.4f} -> {r['losses'][-1]:.4f}{extra}", file=log)
    out.update({f"{side}_tokens_per_s": rates[side], f"{side}_median_step_s": med,
                f"{side}_cpu_s_per_step": cpus[side], f"{side}_peak_rss_mib": r["peak_rss_mib"],
                f"{side}_losses": r["losses"]})
  out["ratio"] = rates["ours"] / rates["reference"]
  out["cpu_ratio"] = cpus["reference"] / cpus["ours"]
  print(f"ours / reference: {out['ratio']:.2f}x wall, {out['cpu_ratio']:.2f}x CPU time "
        f"(load average {out['load_average']:.1f})", file=log)
  if args.json:
    print(json.dumps(out))


if __name__ == "__main__":
  main()
