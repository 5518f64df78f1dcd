"""What the user sees: metrics.jsonl, TensorBoard event files, a PNG plot, and FLOP accounting for MFU."""

from __future__ import annotations

import json
import os
import time
from typing import Any

import jax

# Dense bf16 peak FLOP/s per chip (vendor figures); CPU figure is the measured fp32 matmul rate per core here.
PEAK_FLOPS = {
    "tpu v4": 275e12, "tpu v5 lite": 197e12, "tpu v5e": 197e12, "tpu v5p": 459e12, "tpu v5": 459e12,
    "tpu v6 lite": 918e12, "tpu v6e": 918e12, "tpu7x": 2307e12,
    "h100": 989e12, "h200": 989e12, "a100": 312e12, "b200": 2250e12,
}
CPU_FLOPS_PER_CORE = 117e9


def peak_flops_per_device() -> float:
  dev = jax.devices()[0]
  kind = str(getattr(dev, "device_kind", "")).lower()
  if dev.platform == "cpu":
    return CPU_FLOPS_PER_CORE * (os.cpu_count() or 1) / max(jax.local_device_count(), 1)
  for name, flops in sorted(PEAK_FLOPS.items(), key=lambda kv: -len(kv[0])):
    if name in kind:
      return flops
  return 0.0


def flops_per_token(cfg, seq_len: int) -> float:
  """Training FLOPs per token: 6 x active matmul parameters + causal attention (scores and values)."""
  D, I, L = cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers
  attn_params = D * (cfg.num_attention_heads + 2 * cfg.num_key_value_heads) * cfg.head_dim \
      + cfg.num_attention_heads * cfg.head_dim * D
  expert_params = cfg.num_experts_per_tok * 3 * D * I + D * cfg.num_local_experts
  active = L * (attn_params + expert_params) + D * cfg.vocab_size
  # Sliding layers see at most `window` keys; full layers on average seq_len / 2.
  keys = (min(cfg.sliding_window, seq_len) + seq_len / 2) / 2
  attn = L * 2 * 2 * cfg.num_attention_heads * cfg.head_dim * keys
  return 6 * active + 3 * attn


class MetricWriter:
  """One JSON line per logged step in workdir/metrics.jsonl, and TensorBoard events in workdir/tb."""

  def __init__(self, workdir: str, enabled: bool = True, resume_step: int | None = None):
    """`resume_step`: the step the run restarts from; lines logged after it (by a run that stopped later than its
    last checkpoint) are dropped, so no step appears twice."""
    self.enabled = enabled
    self.workdir = workdir
    self._tb = None
    self._f = None
    if enabled:
      path = os.path.join(workdir, "metrics.jsonl")
      if resume_step is not None and os.path.exists(path):
        kept = [r for r in read_metrics(workdir) if r.get("step", 0) <= resume_step]
        with open(path, "w") as f:
          f.writelines(json.dumps(r) + "\n" for r in kept)
      self._f = open(path, "a")
      try:
        from tensorboardX import SummaryWriter
        self._tb = SummaryWriter(os.path.join(workdir, "tb"))
      except ImportError:  # optional: metrics.jsonl stays the record
        self._tb = None

  def write_config(self, cfg, model_cfg) -> None:
    if not self.enabled:
      return
    with open(os.path.join(self.workdir, "config.json"), "w") as f:
      f.write(cfg.to_json_best_effort(indent=2))
    with open(os.path.join(self.workdir, "model_config.json"), "w") as f:
      json.dump(model_cfg.to_hf_dict(), f, indent=2)

  def write(self, step: int, record: dict[str, Any]) -> None:
    if not self.enabled:
      return
    record = {"step": step, "time": time.time(), **{k: v for k, v in record.items() if k != "step"}}
    self._f.write(json.dumps(record) + "\n")
    self._f.flush()
    if self._tb is not None:
      for k, v in record.items():
        if k not in ("step", "time") and isinstance(v, (int, float)):
          self._tb.add_scalar(k, v, step)
      self._tb.flush()

  def write_summary(self, summary: dict[str, Any]) -> None:
    if self.enabled:
      with open(os.path.join(self.workdir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2, default=str)

  def close(self) -> None:
    if self._f:
      self._f.close()
    if self._tb is not None:
      self._tb.close()


def read_metrics(workdir: str) -> list[dict[str, Any]]:
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.exists(path):
    return []
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


def plot_metrics(workdir: str) -> str | None:
  """workdir/training.png: train and eval loss over steps, and the learning rate."""
  rows = read_metrics(workdir)
  train = [r for r in rows if "loss" in r]
  if not train:
    return None
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  evals = [r for r in rows if "eval_loss" in r]
  fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(7, 6), sharex=True)
  ax1.plot([r["step"] for r in train], [r["loss"] for r in train], label="train loss")
  if evals:
    ax1.plot([r["step"] for r in evals], [r["eval_loss"] for r in evals], "o-", label="eval loss")
  ax1.set_ylabel("loss")
  ax1.legend()
  ax1.grid(alpha=0.3)
  ax2.plot([r["step"] for r in train], [r["lr"] for r in train], color="tab:green")
  ax2.set_ylabel("learning rate")
  ax2.set_xlabel("step")
  ax2.grid(alpha=0.3)
  fig.tight_layout()
  out = os.path.join(workdir, "training.png")
  fig.savefig(out, dpi=100)
  plt.close(fig)
  return out
