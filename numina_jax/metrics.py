"""What the user sees: metrics.jsonl, TensorBoard event files, a PNG plot (in a local or gs:// workdir), and FLOP
accounting for MFU."""

from __future__ import annotations

import dataclasses
import io
import json
import logging
import os
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import jax
from tensorboardX import SummaryWriter

from numina_jax import storage

log = logging.getLogger("numina_jax")
METRICS_FILE = "metrics.jsonl"

@dataclasses.dataclass(frozen=True)
class Chip:
  """One accelerator's vendor figures, for MFU and the plan's roofline."""
  peak_flops: float  # dense bf16 FLOP/s
  hbm_gib: float  # memory capacity
  hbm_bytes_per_s: float  # memory bandwidth
  ici_bytes_per_s: float  # chip-to-chip bandwidth of all its links, both directions together


# Keys are matched against `device.device_kind` in lower case, longest first (a v5p reports "TPU v5", a v5e
# "TPU v5 lite", a v6e "TPU v6 lite").
CHIPS = {
    # cloud.google.com/tpu/docs/v4: 275 TFLOP/s, 32 GiB at 1200 GB/s; ICI: 6 links at 45 GB/s each way
    # (jax-ml.github.io/scaling-book, "How to think about TPUs").
    "tpu v4": Chip(275e12, 32, 1200e9, 540e9),
    # cloud.google.com/tpu/docs/v5e: 197 TFLOP/s, 16 GB at 819 GB/s, 400 GB/s bidirectional ICI per chip.
    "tpu v5 lite": Chip(197e12, 16, 819e9, 400e9),
    "tpu v5e": Chip(197e12, 16, 819e9, 400e9),
    # cloud.google.com/tpu/docs/v5p: 459 TFLOP/s, 95 GiB at 2765 GB/s, 1200 GB/s bidirectional ICI per chip.
    "tpu v5": Chip(459e12, 95, 2765e9, 1200e9),
    "tpu v5p": Chip(459e12, 95, 2765e9, 1200e9),
    # cloud.google.com/tpu/docs/v6e: 918 TFLOP/s, 32 GB at 1638 GB/s, 800 GB/s bidirectional ICI per chip.
    "tpu v6 lite": Chip(918e12, 32, 1638e9, 800e9),
    "tpu v6e": Chip(918e12, 32, 1638e9, 800e9),
    # cloud.google.com/tpu/docs/tpu7x (Ironwood): 2307 TFLOP/s bf16, 192 GiB at 7.37 TB/s, 1.2 TB/s ICI.
    "tpu7x": Chip(2307e12, 192, 7370e9, 1200e9),
    # NVIDIA datasheets (SXM parts): dense bf16, HBM, NVLink bandwidth both directions.
    "h100": Chip(989e12, 80, 3350e9, 900e9),
    "h200": Chip(989e12, 141, 4800e9, 900e9),
    "a100": Chip(312e12, 80, 2039e9, 600e9),
    "b200": Chip(2250e12, 192, 8000e9, 1800e9),
}
PEAK_FLOPS = {k: c.peak_flops for k, c in CHIPS.items()}
CPU_FLOPS_PER_CORE = 117e9  # the measured fp32 matmul rate per core here


def chip(device_kind: str) -> Chip | None:
  """The figures of a device kind (`device.device_kind`), or None for an unknown one (CPUs)."""
  kind = device_kind.lower()
  for name, c in sorted(CHIPS.items(), key=lambda kv: -len(kv[0])):
    if name in kind:
      return c
  return None


def peak_flops_per_device() -> float:
  dev = jax.devices()[0]
  if dev.platform == "cpu":
    return CPU_FLOPS_PER_CORE * (os.cpu_count() or 1) / max(jax.local_device_count(), 1)
  c = chip(str(getattr(dev, "device_kind", "")))
  return c.peak_flops if c else 0.0


def mean_keys(seq_len: int, window: int | None) -> float:
  """Keys a query attends to, averaged over the positions of a causal sequence (window: the last `window`
  keys, self included)."""
  T = seq_len
  if window is None or window >= T:
    return (T + 1) / 2
  return (window * (window + 1) / 2 + (T - window) * window) / T


def flops_per_token(cfg, seq_len: int) -> float:
  """The model's training FLOPs per token: 3 x forward (forward, and backward at twice the forward).

  Forward per token: 2 x the active matmul parameters (attention q, k, v, o; the router; top-k experts'
  gate, up and down; the lm_head; not the embedding lookup) plus, per layer, 4 x heads x head_dim x the keys the
  query attends to (scores q.k and the weighted sum of v), with causal keys counted exactly: (T + 1) / 2 on
  full layers, the window on sliding ones (fewer near the start). Sequences are taken as one document: packing
  masks more, which no kernel here skips. Remat recomputation and any other work the compiled step adds are not
  counted: this is the figure MFU divides by.
  """
  D, I, L = cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers
  attn_params = D * (cfg.num_attention_heads + 2 * cfg.num_key_value_heads) * cfg.head_dim \
      + cfg.num_attention_heads * cfg.head_dim * D
  expert_params = cfg.num_experts_per_tok * 3 * D * I + D * cfg.num_local_experts
  active = L * (attn_params + expert_params) + D * cfg.vocab_size
  # Layers alternate sliding, full (layer 0 slides).
  keys = (L // 2) * (mean_keys(seq_len, cfg.sliding_window) + mean_keys(seq_len, None))
  attn = 4 * cfg.num_attention_heads * cfg.head_dim * keys
  return 3 * (2 * active + attn)


class MetricWriter:
  """The run's record: one JSON line per logged step in workdir/metrics.jsonl, TensorBoard events in workdir/tb.

  Object stores cannot append (gcsfs turns `open('a')` into an overwrite), so the writer never appends there:
  it keeps the run's lines and rewrites the whole object at each `flush`, at most every `flush_every_secs`
  (default 60 s remote; `flush()` and `close()` always write). On a local disk each line is appended and
  flushed at once. A trainer should `flush()` when it saves a checkpoint, so nothing up to it can be lost.

  `resume_step`: the checkpoint step the run restarts from (0 for a fresh start). Lines of an earlier attempt
  logged after that step are dropped, so after a crash and resume no step appears twice; None keeps all.
  TensorBoard gets the same cut as a purge event. Only the writing process (`enabled`) touches files.
  """

  def __init__(self, workdir: str, enabled: bool = True, *, resume_step: int | None = None,
               flush_every_secs: float | None = None):
    self.enabled = enabled
    self.workdir = workdir
    self.remote = storage.is_remote(workdir)
    self.flush_every_secs = (60.0 if self.remote else 0.0) if flush_every_secs is None else flush_every_secs
    self._path = storage.join(workdir, METRICS_FILE)
    self._lines: list[str] = []  # remote: every line of the run, rewritten whole at each flush
    self._dirty = False
    self._last_flush = time.monotonic()
    self._f = None
    self._tb = None
    self._tb_local = None
    if not enabled:
      return
    storage.makedirs(workdir)
    storage.refresh(workdir)
    old = storage.read_text(self._path)
    if old is not None:
      rows = _parse_lines(old, self._path)
      kept = [line for line, r in rows if resume_step is None or r.get("step", 0) <= resume_step]
      if len(kept) < len(rows):
        log.info("%s: dropping %d line(s) logged after step %s by an earlier attempt", self._path,
                 len(rows) - len(kept), resume_step)
      if len(kept) < len(rows) or (old and not old.endswith("\n")):
        storage.write_text(self._path, "".join(line + "\n" for line in kept))
      self._lines = kept
    if not self.remote:
      self._f = storage.path(self._path).open("a")
    self._open_tb(resume_step)

  def _open_tb(self, resume_step: int | None) -> None:
    # Remote: events go to a local folder, copied up on flush (tensorboardX's own gs:// writer re-uploads the
    # whole file on every flush and can block for minutes at exit if the storage went away).
    if self.remote:
      self._tb_local = tempfile.TemporaryDirectory(prefix="numina-tb-")
    logdir = self._tb_local.name if self.remote else storage.join(self.workdir, "tb")
    purge = None if resume_step is None else resume_step + 1
    # A unique suffix: a restart in the same second on the same host must not replace the earlier file.
    suffix = f".{os.getpid()}.{uuid.uuid4().hex[:8]}"
    self._tb = SummaryWriter(logdir, purge_step=purge, filename_suffix=suffix)

  def write_config(self, cfg, model_cfg) -> None:
    if not self.enabled:
      return
    storage.write_text(storage.join(self.workdir, "config.json"), cfg.to_json_best_effort(indent=2))
    storage.write_text(storage.join(self.workdir, "model_config.json"),
                       json.dumps(model_cfg.to_hf_dict(), indent=2))

  def write(self, step: int, record: dict[str, Any]) -> None:
    if not self.enabled:
      return
    record = {"step": step, "time": time.time(), **{k: v for k, v in record.items() if k != "step"}}
    line = json.dumps(record)
    if self._f is not None:
      self._f.write(line + "\n")
      self._f.flush()
    else:
      self._lines.append(line)
    self._dirty = True
    if self._tb is not None:
      for k, v in record.items():
        if k not in ("step", "time") and isinstance(v, (int, float)):
          self._tb.add_scalar(k, v, step)
    if time.monotonic() - self._last_flush >= self.flush_every_secs:
      self.flush()

  def flush(self) -> None:
    """Makes everything written so far visible in workdir (rewrites metrics.jsonl and uploads tb/ if remote)."""
    if not self.enabled:
      return
    self._last_flush = time.monotonic()
    if self._tb is not None:
      self._tb.flush()
    if not self._dirty:
      return
    if self.remote:
      storage.write_text(self._path, "".join(line + "\n" for line in self._lines))
      self._upload_tb()
    self._dirty = False

  def _upload_tb(self) -> None:
    if self._tb_local is None:
      return
    root = Path(self._tb_local.name)
    for f in sorted(root.rglob("*")):
      if f.is_file():
        storage.upload(f, storage.join(self.workdir, "tb", *f.relative_to(root).parts))

  def write_summary(self, summary: dict[str, Any]) -> None:
    if self.enabled:
      storage.write_text(storage.join(self.workdir, "summary.json"),
                         json.dumps(summary, indent=2, default=str))

  def close(self) -> None:
    if not self.enabled:
      return
    if self._tb is not None:
      self._tb.close()
      self._dirty = True  # close writes the last events
    self.flush()
    if self._f is not None:
      self._f.close()
      self._f = None
    self._tb = None
    if self._tb_local is not None:
      self._tb_local.cleanup()
      self._tb_local = None
    self.enabled = False


def _parse_lines(text: str, source: str) -> list[tuple[str, dict[str, Any]]]:
  """(line, record) per line of a metrics.jsonl; a bad line is an error naming it, except an unfinished last
  line (no newline: a writer stopped in the middle of it), which is left out with a warning."""
  lines = text.split("\n")
  out = []
  for i, line in enumerate(lines):
    if not line.strip():
      continue
    try:
      record = json.loads(line)
      if not isinstance(record, dict):
        raise ValueError("not a JSON object")
    except ValueError as e:
      if i == len(lines) - 1:
        log.warning("%s: leaving out the unfinished last line %d (%s)", source, i + 1, e)
        continue
      raise ValueError(f"{source} line {i + 1}: not a metrics record ({e}): {line[:200]!r}") from None
    out.append((line, record))
  return out


def read_metrics(workdir: str) -> list[dict[str, Any]]:
  """The records of workdir/metrics.jsonl (a local folder or a bucket), in order; [] when there is none."""
  path = storage.join(workdir, METRICS_FILE)
  storage.refresh(workdir)
  text = storage.read_text(path)
  return [] if text is None else [r for _, r in _parse_lines(text, path)]


def plot_metrics(workdir: str) -> str | None:
  """workdir/training.png: train and eval loss over steps, and the learning rate."""
  rows = read_metrics(workdir)
  train = [r for r in rows if "loss" in r]
  if not train:
    return None
  import matplotlib  # heavy (a second), and only for the plot
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
  buf = io.BytesIO()
  fig.savefig(buf, format="png", dpi=100)
  plt.close(fig)
  out = storage.join(workdir, "training.png")
  storage.write_bytes(out, buf.getvalue())
  return out
