"""AdamW with linear warmup then cosine (or linear / constant) decay, clipping, a weight-decay mask, and optionally
skipping updates whose gradients are not finite."""

from __future__ import annotations

import optax

# Parameters that never decay: norms, biases, attention sinks.
NO_DECAY_SUFFIXES = ("_b", "_norm", "norm", "sinks")


def decay_mask(params: dict) -> dict:
  return {k: not k.split("/")[-1].endswith(NO_DECAY_SUFFIXES) for k in params}


def learning_rate_schedule(lr: float, total_steps: int, warmup_ratio: float, schedule: str = "cosine",
                           final_lr_ratio: float = 0.0) -> optax.Schedule:
  warmup = int(round(warmup_ratio * total_steps))
  decay_steps = max(total_steps - warmup, 1)
  final = lr * final_lr_ratio
  if schedule == "cosine":
    decay = optax.cosine_decay_schedule(lr, decay_steps, alpha=final_lr_ratio)
  elif schedule == "linear":
    decay = optax.linear_schedule(lr, final, decay_steps)
  elif schedule == "constant":
    decay = optax.constant_schedule(lr)
  else:
    raise ValueError(f"unknown schedule {schedule!r}")
  if warmup == 0:
    return decay
  # Step 0 trains at lr/warmup rather than 0, so no step is wasted (as transformers' schedulers do).
  return optax.join_schedules([optax.linear_schedule(lr / warmup, lr, warmup - 1), decay], [warmup])


def make_optimizer(cfg, total_steps: int) -> tuple[optax.GradientTransformation, optax.Schedule]:
  o = cfg.optim
  sched = learning_rate_schedule(cfg.lr, total_steps, cfg.warmup_ratio, o.schedule, o.final_lr_ratio)
  parts = []
  if o.clip_norm:
    parts.append(optax.clip_by_global_norm(o.clip_norm))
  parts.append(optax.adamw(sched, b1=o.b1, b2=o.b2, eps=o.eps, weight_decay=o.weight_decay, mask=decay_mask))
  tx = optax.chain(*parts)
  if o.get("skip_nonfinite", False):  # .get: partial optim configs (tests, benchmarks) predate the field
    # A skipped step leaves parameters and moments as they were; its count is `skipped_updates` in the metrics.
    # Past max_consecutive_skips optax applies the update, and the trainer stops on the non-finite parameters.
    tx = optax.apply_if_finite(tx, max_consecutive_errors=o.get("max_consecutive_skips", 5))
  return tx, sched

