"""Greedy decoding throughput of the JAX sampler against transformers' `generate`, on the same weights and prompts.

The bench config of bench_model.py (hidden 512, 4 layers, 16 experts top-4, vocab 8192, window 128), fp32. Each
side runs in its own subprocess pinned to `--threads` cores. A generate call with one new token times the prefill;
decode tokens/s is the remaining new tokens over the remaining time. Both sides' greedy tokens are compared.

  python benchmarks/bench_sampler.py                        # 8 prompts x 128 tokens, 128 new tokens
  python benchmarks/bench_sampler.py --batch 32 --new 64
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_model import BENCH, load_reference, make_params, peak_rss_mib, pin_threads, spawn  # noqa: E402


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--batch", type=int, default=8, help="prompts decoded together")
  p.add_argument("--prompt", type=int, default=128, help="tokens per prompt")
  p.add_argument("--new", type=int, default=128, help="new tokens per prompt")
  p.add_argument("--repeats", type=int, default=3, help="timed runs of each measurement (median)")
  p.add_argument("--kernel", default="auto", choices=["auto", "tiled", "ragged", "dense"], help="our MoE kernel")
  p.add_argument("--threads", type=int, default=2, help="CPU threads for each side")
  p.add_argument("--only", choices=["ours", "reference"], help="run one side in this process (internal)")
  return p.parse_args(argv)


def make_prompts(cfg, batch: int, length: int):
  import numpy as np
  return np.random.default_rng(3).integers(2, cfg.vocab_size, (batch, length)).tolist()


def median(xs):
  return sorted(xs)[len(xs) // 2]


def run_ours(args, cfg, prompts):
  from numina_jax.sampling import JaxSampler, SamplingParams
  sampler = JaxSampler(make_params(cfg), cfg, max_len=args.prompt + args.new, max_batch=args.batch,
                       moe_kernel=args.kernel, progress=False)

  def gen(n):
    t = time.perf_counter()
    out = sampler.generate(prompts, SamplingParams(temperature=0.0, max_tokens=n))
    return time.perf_counter() - t, [c[0].token_ids for c in out]

  gen(1), gen(args.new)  # compile every shape once
  prefill = median([gen(1)[0] for _ in range(args.repeats)])
  runs = [gen(args.new) for _ in range(args.repeats)]
  return prefill, median([t for t, _ in runs]), runs[0][1]


def run_reference(args, cfg, prompts):
  import torch
  torch.set_num_threads(args.threads)
  model = load_reference(cfg).eval()
  model.generation_config.eos_token_id = None  # both sides make exactly --new tokens
  ids = torch.tensor(prompts)

  def gen(n):
    t = time.perf_counter()
    with torch.no_grad():
      out = model.generate(ids, do_sample=False, max_new_tokens=n, min_new_tokens=n, pad_token_id=0)
    return time.perf_counter() - t, out[:, ids.shape[1]:].tolist()

  gen(1)
  prefill = median([gen(1)[0] for _ in range(args.repeats)])
  runs = [gen(args.new) for _ in range(args.repeats)]
  return prefill, median([t for t, _ in runs]), runs[0][1]


def child(args):
  pin_threads(args.threads)
  from numina_jax.model import tiny_config
  cfg = tiny_config(**BENCH, max_position_embeddings=max(4096, args.prompt + args.new))
  prompts = make_prompts(cfg, args.batch, args.prompt)
  fn = run_ours if args.only == "ours" else run_reference
  prefill, total, tokens = fn(args, cfg, prompts)
  print("RESULT " + json.dumps({"prefill_s": prefill, "total_s": total, "tokens": tokens,
                                "peak_rss_mib": peak_rss_mib()}))


def main(argv=None):
  argv = sys.argv[1:] if argv is None else argv
  args = parse_args(argv)
  if args.only:
    return child(args)
  print(f"bench config: {BENCH}; {args.batch} prompts x {args.prompt} tokens, {args.new} new tokens each, greedy, "
        f"fp32, {args.threads} threads; ours: kernel={args.kernel}")
  results = {side: spawn(side, argv, args.threads, script=__file__) for side in ("ours", "reference")}
  rates = {}
  for side, r in results.items():
    decode_s = r["total_s"] - r["prefill_s"]
    rates[side] = args.batch * (args.new - 1) / decode_s
    print(f"{side:9s}: decode {rates[side]:8.1f} tokens/s  prefill {r['prefill_s'] * 1e3:7.0f} ms  "
          f"generate {r['total_s']:6.2f} s  peak RSS {r['peak_rss_mib']:6.0f} MiB")
  ours, ref = results["ours"]["tokens"], results["reference"]["tokens"]
  same = sum(a == b for a, b in zip(ours, ref))
  prefix = sum(next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), len(a)) for a, b in zip(ours, ref))
  print(f"greedy tokens: {same}/{len(ours)} completions identical, {prefix}/{sum(map(len, ours))} tokens agree "
        "before the first difference")
  print(f"decode ours / reference: {rates['ours'] / rates['reference']:.2f}x; prefill ours / reference: "
        f"{results['reference']['prefill_s'] / results['ours']['prefill_s']:.2f}x")


if __name__ == "__main__":
  main()
