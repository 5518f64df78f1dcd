"""The training loop: start (or resume), step, log, evaluate, checkpoint, survive preemption, export.

How hosts agree. Every decision that leads into a collective (save, evaluate, stop) is taken for the same step by
every host. Evaluation and step-based checkpoints are functions of the step number. What one host alone may know
(SIGTERM, the runtime's preemption notice, its clock saying a time-based checkpoint is due) goes into the jitted
train step as a row of int flags per device; the step returns their maximum over all devices as a replicated
output, read with that step's metrics. Metrics are read one step late, so the flags fed to step s take effect after
step s + 1 on every host alike, at no cost of an extra blocking collective. The loss, gradient norm and parameter
norm are replicated outputs too: every host finds the same step non-finite and stops there.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import os
import signal
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from jax.sharding import NamedSharding, PartitionSpec as P
from jax.experimental import multihost_utils

from numina_jax import checkpoint as ckpt
from numina_jax import config as config_lib
from numina_jax import data as data_lib
from numina_jax import distributed
from numina_jax import storage
from numina_jax.data.packing import BATCH_KEYS
from numina_jax.eval.datasets import held_out_set
from numina_jax.eval.report import write_evaluation
from numina_jax.eval.sctir import SCTIRConfig
from numina_jax.hf import load_pretrained_params, save_pretrained
from numina_jax.metrics import MetricWriter, flops_per_token, peak_flops_per_device, plot_metrics
from numina_jax.model.params import init_params, param_specs
from numina_jax.model.transformer import as_dtype
from numina_jax.optim import make_optimizer
from numina_jax.progress import Progress
from numina_jax.sampling.jax_sampler import JaxSampler
from numina_jax.sharding import make_mesh, opt_state_shardings, param_shardings
from numina_jax.step import (CHECKPOINT_DUE, NUM_FLAGS, STOP, StepConfig, batch_shardings, host_flags_sharding,
                             jit_eval_step, jit_train_step)

log = logging.getLogger("numina_jax")

# Test hooks, read only by tests: this host's clock runs this many times faster (hosts whose clocks disagree about
# when a time-based checkpoint is due), and the loss of this 1-based step becomes NaN.
CLOCK_RATE_ENV = "NUMINA_JAX_TEST_CLOCK_RATE"
NAN_AT_STEP_ENV = "NUMINA_JAX_TEST_NAN_AT_STEP"


class NonFiniteLossError(RuntimeError):
  pass


class _NonFinite(Exception):
  def __init__(self, step: int, what: list[str]):
    super().__init__(step, what)
    self.step, self.what = step, what


class HostSignals:
  """This host's own view, as the flags it feeds into each train step (columns STOP and CHECKPOINT_DUE).

  STOP: SIGTERM arrived (a preempted spot VM), or the distributed runtime reached its preemption sync point.
  CHECKPOINT_DUE: `checkpoint_every_secs` passed on this host's clock since its last save.
  """

  def __init__(self, checkpoint_every_secs: float):
    self.every = float(checkpoint_every_secs)
    self.rate = float(os.environ.get(CLOCK_RATE_ENV, "1"))
    self.sigterm = False
    self._old = None
    self._last_save = self._clock()

  def _clock(self) -> float:
    return time.monotonic() * self.rate

  def __enter__(self) -> "HostSignals":
    def handler(signum, frame):
      self.sigterm = True
      log.warning("SIGTERM received: every host saves a checkpoint after the next step, then exits")
    try:
      self._old = signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread
      self._old = None
    return self

  def __exit__(self, *exc):
    if self._old is not None:
      signal.signal(signal.SIGTERM, self._old)

  def flags(self, step: int) -> np.ndarray:
    """The flags for `step` (1-based), the step about to be dispatched."""
    stop = self.sigterm or _preemption_notice(step)
    due = self.every > 0 and self._clock() - self._last_save >= self.every
    return np.array([stop, due], np.int32)

  def saved(self) -> None:
    self._last_save = self._clock()


def _preemption_notice(step: int) -> bool:
  if jax.process_count() == 1:
    return False
  # A notice the runtime got by other means than our SIGTERM handler; it names the same step on every host.
  return multihost_utils.reached_preemption_sync_point(step)


@dataclasses.dataclass(frozen=True)
class Agreed:
  """The host flags as every host read them from the metrics of `step`."""
  step: int = 0
  stop: bool = False
  checkpoint_due: bool = False


# Model ---------------------------------------------------------------------------------------------
def load_start_params(cfg, model_cfg, shardings, mesh) -> dict[str, jax.Array]:
  m = cfg.model
  dtype = as_dtype(m.param_dtype)
  if m.hf_path:
    log.info("loading Hugging Face weights from %s", m.hf_path)
    params, _ = load_pretrained_params(m.hf_path, dtype, mesh, shardings=shardings)
    return params
  if m.init_checkpoint:
    step = None if m.init_step < 0 else m.init_step
    if step is None:
      step = ckpt.best_step(m.init_checkpoint)
    log.info("starting from checkpoint %s (step %s)", m.init_checkpoint, step)
    params, _ = ckpt.load_params(m.init_checkpoint, step=step, shardings=shardings, dtype=dtype)
    return params
  return init_params(model_cfg, jax.random.key(cfg.seed), dtype, shardings)


# Stages ----------------------------------------------------------------------------------------------
def train(cfg: ml_collections.ConfigDict, *, next_config: Callable[[str], ml_collections.ConfigDict] | None = None,
          stop_at_step: int | None = None) -> dict[str, Any]:
  """Trains the configured stage, then, while a stage names a `next_stage`, that stage (`next_config(name)`: the
  same config file's `get_config(name)`) from the previous one's best checkpoint. A chain writes stage k to
  `<workdir>/stage<k>_<stage>`. Restarting the same command resumes: finished stages stop at once."""
  config_lib.validate(cfg)  # touches no JAX backend: with multihost, initialize() must be the first JAX call
  if cfg.multihost:
    distributed.initialize(cfg.distributed)
  if not cfg.next_stage:
    return Trainer(cfg, stop_at_step=stop_at_step).run()
  if next_config is None:
    raise ValueError(f"config.next_stage={cfg.next_stage!r} needs the config file's get_config({cfg.next_stage!r}): "
                     f"run it with python -m numina_jax.train --config FILE, or pass next_config")
  c = copy.deepcopy(cfg)
  with c.unlocked():
    c.workdir = storage.join(cfg.workdir, f"stage1_{cfg.stage}")
    c.export_hf = False
  results = {"stage1": Trainer(c, stop_at_step=stop_at_step).run()}
  prev, index, seen = c, 1, [cfg.stage]
  while prev.next_stage and not results[f"stage{index}"].get("preempted"):
    if prev.next_stage in seen:
      raise ValueError(f"config.next_stage: the chain {' -> '.join(seen + [prev.next_stage])} comes back to a stage")
    seen.append(prev.next_stage)
    index += 1
    nxt = config_lib.next_stage_config(prev, next_config(prev.next_stage), root=cfg.workdir, index=index,
                                       previous_workdir=prev.workdir)
    results[f"stage{index}"] = Trainer(nxt).run()
    prev = nxt
  results["preempted"] = results[f"stage{index}"].get("preempted", False)
  return results


class Trainer:
  """One stage: `Trainer(cfg).run()` starts or resumes, trains, and returns a summary dict.

  The loop dispatches step s, then reads step s - 1's metrics (`_read`: non-finite check, log, agreed host
  flags), then asks `_due(s)` what happens after step s: "eval", "every N steps", "time", "stop". Each of those
  is a function of the step number and of flags all hosts read alike, so all hosts act together.
  """

  def __init__(self, cfg: ml_collections.ConfigDict, *, stop_at_step: int | None = None):
    self.cfg, self.stop_at_step = cfg, stop_at_step
    self.workdir = cfg.workdir
    storage.makedirs(self.workdir)
    self.is_main = jax.process_index() == 0
    self.mesh = make_mesh(dict(cfg.mesh))
    n_batch_shards = self.mesh.shape["data"] * self.mesh.shape["fsdp"] * self.mesh.shape["expert"]
    micro = cfg.microbatch_size or cfg.global_batch_size
    if micro % n_batch_shards:
      raise ValueError(f"config.microbatch_size ({micro}) must divide by the batch-sharded mesh axes "
                       f"data*fsdp*expert = {n_batch_shards} (mesh {dict(self.mesh.shape)})")
    if cfg.global_batch_size % jax.process_count():
      raise ValueError(f"config.global_batch_size ({cfg.global_batch_size}) must divide by the number of hosts "
                       f"({jax.process_count()})")

    self.tokenizer = data_lib.load_tokenizer(cfg.data.tokenizer)
    self.model_cfg = config_lib.model_config_for(cfg, self.tokenizer)
    self.specs = param_specs(self.model_cfg)
    self.p_shard = param_shardings(self.specs, self.mesh)
    pipe_kwargs = dict(seq_len=cfg.seq_len, global_batch_size=cfg.global_batch_size, seed=cfg.seed,
                       process_index=jax.process_index(), process_count=jax.process_count(),
                       allgather=multihost_utils.process_allgather if jax.process_count() > 1 else None)
    self.train_it = data_lib.make_pipeline(cfg.data, self.tokenizer, split="train", **pipe_kwargs)
    self.eval_batches = list(data_lib.make_pipeline(cfg.data, self.tokenizer, split="eval", **pipe_kwargs))
    self.steps_per_epoch = self.train_it.steps_per_epoch
    self.total_steps = cfg.max_steps or self.steps_per_epoch * cfg.num_epochs
    if self.total_steps <= 0:
      raise ValueError(f"the training split of {cfg.data.dataset_name!r} gives no full batch of "
                       f"{cfg.global_batch_size} x {cfg.seq_len} tokens; lower global_batch_size or seq_len")

    self.tx, self.schedule = make_optimizer(cfg, self.total_steps)
    nan_at = int(os.environ.get(NAN_AT_STEP_ENV, "0"))
    self.sc = dataclasses.replace(StepConfig.from_config(cfg, self.model_cfg), nan_at_step=nan_at)
    self.params_abstract = {k: jax.ShapeDtypeStruct(s.shape, as_dtype(cfg.model.param_dtype))
                            for k, s in self.specs.items()}
    rep = NamedSharding(self.mesh, P())
    self.state_shard = {"step": rep, "params": self.p_shard,
                        "opt_state": opt_state_shardings(self.tx, self.params_abstract, self.p_shard, self.mesh)}
    self.b_shard = batch_shardings(self.mesh)
    self.flags_shard = host_flags_sharding(self.mesh)
    self.mgr = _manager(cfg)

    self.state: dict[str, Any] = {}
    self.step = self.start_step = self.last_saved_step = 0
    self.pending: tuple[int, Any] | None = None  # (step, metrics on device) of the step in flight
    self.agreed = Agreed()
    self.last_record: dict[str, Any] | None = None
    self.eval_loss: float | None = None
    self.sctir_maj: float | None = None  # SC-TIR maj@N of the latest sctir.every_steps evaluation
    self._sctir_setup = None  # (eval set, SCTIRConfig, JaxSampler), built at the first SC-TIR
    self.writer: MetricWriter | None = None
    self.progress: Progress | None = None
    self.signals: HostSignals | None = None
    self._window = {"t": time.time(), "tokens": 0, "loss_tokens": 0.0, "steps": 0}

  # -- the run ------------------------------------------------------------------------------------------------------

  def run(self) -> dict[str, Any]:
    preempted, failure = False, None
    try:
      with jax.set_mesh(self.mesh), HostSignals(self.cfg.checkpoint_every_secs) as self.signals:
        try:
          self._start()
          preempted = self._loop()
          if not preempted:
            self._end_of_training()
        except _NonFinite as e:
          failure = e
        finally:
          # Checkpoints already handed to the async writer hold good states: let them land even if we fail.
          self.mgr.wait_until_finished()
        if failure is not None:
          raise NonFiniteLossError(self._nonfinite_message(failure)) from None
        return self._finish(preempted)
    finally:
      self._close()

  def _start(self) -> None:
    cfg = self.cfg
    start = self.mgr.latest_step()
    if start is not None:
      self.state, meta = _restore(self.mgr, start, self.state_shard, self.tx, self.params_abstract)
      self.train_it.set_state(meta["data_state"])
      log.info("resumed from %s at step %d", self.mgr.directory, start)
    else:
      params = load_start_params(cfg, self.model_cfg, self.p_shard, self.mesh)
      opt_state = jax.jit(self.tx.init, out_shardings=self.state_shard["opt_state"])(params)
      self.state = {"step": jax.device_put(jnp.zeros((), jnp.int32), self.state_shard["step"]), "params": params,
                    "opt_state": opt_state}
    self.step = self.start_step = self.last_saved_step = int(jax.device_get(self.state["step"]))
    self.step_fn = jit_train_step(self.sc, self.tx, self.schedule, self.state_shard, self.mesh, host_flags=True)
    self.eval_fn = jit_eval_step(self.sc, self.p_shard, self.mesh)
    self.writer = MetricWriter(self.workdir, enabled=self.is_main, resume_step=self.start_step)
    self.writer.write_config(cfg, self.model_cfg)
    self.flops_per_token = flops_per_token(self.model_cfg, cfg.seq_len)
    self.peak_flops = peak_flops_per_device() * jax.device_count()
    self.progress = Progress(f"train[{cfg.stage}]", self.total_steps, self.step, cfg.log_every_steps,
                             enabled=cfg.progress_bar and self.is_main)

  def _loop(self) -> bool:
    """Trains up to total_steps; True when stopped early (SIGTERM, preemption, stop_at_step) after a save."""
    while self.step < self.total_steps:
      local = next(self.train_it)
      flags = self.signals.flags(self.step + 1)
      self.state, metrics = self.step_fn(self.state, self._global_batch(local), self._host_flags(flags))
      self.step += 1
      self._window["tokens"] += int(np.prod(local["input_ids"].shape)) * jax.process_count()
      self._read()
      self.pending = (self.step, metrics)
      self.progress.update(self.step)
      if self.step == self.total_steps:
        break
      reasons = self._due(self.step)
      if reasons:
        self._read()  # never save a state whose step was not checked
        if "eval" in reasons:
          self.eval_loss = self.evaluate(self.step)
        if "sctir" in reasons:
          self.sctir_maj = self.sctir_eval(self.step)
        self.save(self.step, reasons)
        if "stop" in reasons:
          return True
    return False

  def _due(self, step: int) -> list[str]:
    """What happens after `step`, the same on every host."""
    cfg, reasons = self.cfg, []
    if self.eval_batches and cfg.eval_every_steps and step % cfg.eval_every_steps == 0:
      reasons.append("eval")
    if cfg.sctir.every_steps and step % cfg.sctir.every_steps == 0:
      reasons.append("sctir")
    if cfg.checkpoint_every_steps and step % cfg.checkpoint_every_steps == 0:
      reasons.append(f"every {cfg.checkpoint_every_steps} steps")
    # A flag raised before the last save is stale: that save already answered it.
    if self.agreed.checkpoint_due and self.agreed.step > self.last_saved_step:
      reasons.append("time")
    if self.agreed.stop or (self.stop_at_step is not None and step >= self.stop_at_step):
      reasons.append("stop")
    return reasons

  def _end_of_training(self) -> None:
    self._read()
    trained = self.step > self.start_step
    if self.eval_batches:
      self.eval_loss = self.evaluate(self.step, write=trained)
    if self.cfg.sctir.every_steps and self.last_saved_step != self.step:
      self.sctir_maj = self.sctir_eval(self.step, write=trained)
    if self.last_saved_step != self.step:
      self.save(self.step, ["end"])

  # -- periodic actions -----------------------------------------------------------------------------------------------

  def _read(self) -> None:
    """Reads the metrics of the step in flight: its agreed host flags, the non-finite check, the log line."""
    if self.pending is None:
      return
    s, m = self.pending
    self.pending = None
    m = jax.device_get(m)
    flags = m.pop("host_flags")
    self.agreed = Agreed(step=s, stop=bool(flags[STOP]), checkpoint_due=bool(flags[CHECKPOINT_DUE]))
    bad = [f"{k} is {float(m[k])}" for k in ("loss", "grad_norm") if not np.isfinite(m[k])]
    if not np.isfinite(m["param_norm"]):
      raise _NonFinite(s, bad + [f"param_norm is {float(m['param_norm'])}"])
    if bad and not self.cfg.optim.skip_nonfinite:
      raise _NonFinite(s, bad)
    if bad:
      log.warning("step %d: %s; update skipped (%d skipped in this run's history)", s, ", ".join(bad),
                  int(m["skipped_updates"]))
    self.log(s, m)

  def log(self, step: int, m: dict[str, Any]) -> None:
    w = self._window
    w["loss_tokens"] += float(m["loss_tokens"])
    w["steps"] += 1
    rec = {k: float(v) for k, v in m.items()}
    self.last_record = rec
    if step % self.cfg.log_every_steps and step != self.total_steps:
      return
    dt = max(time.time() - w["t"], 1e-9)
    tok_s = w["tokens"] / dt
    rec.update(step=step, epoch=(step - 1) // max(self.steps_per_epoch, 1), tokens_per_s=tok_s,
               loss_tokens_per_s=w["loss_tokens"] / dt, steps_per_s=w["steps"] / dt,
               mfu=self.flops_per_token * tok_s / self.peak_flops if self.peak_flops else 0.0)
    self.writer.write(step, rec)
    self.progress.note(rec)
    self._window = {"t": time.time(), "tokens": 0, "loss_tokens": 0.0, "steps": 0}

  def evaluate(self, step: int, write: bool = True) -> float:
    ce, n = 0.0, 0.0
    for b in self.eval_batches:
      c, t = self.eval_fn(self.state["params"], _global_batch(b, self.b_shard, self.cfg.global_batch_size))
      ce, n = ce + float(c), n + float(t)
    value = ce / max(n, 1.0)
    if write:
      self.writer.write(step, {"step": step, "eval_loss": value, "eval_tokens": n})
    return value

  def save(self, step: int, reasons: list[str]) -> None:
    log.info("checkpoint at step %d (%s)", step, ", ".join(reasons))
    meta = {"step": step, "data_state": self.train_it.get_state(), "config": self.cfg.to_json(),
            "total_steps": self.total_steps}
    with_eval = "eval" in reasons or (reasons == ["end"] and self.eval_batches)
    with_sctir = "sctir" in reasons or (reasons == ["end"] and self.cfg.sctir.every_steps)
    metrics = {}  # what `checkpoint.score` ranks the steps by: only steps where best_metric was measured
    if self.cfg.checkpoint.best_metric == "sctir_maj":
      if with_sctir:
        metrics = {"sctir_maj": self.sctir_maj, "score": self.sctir_maj}
    elif with_eval:
      metrics = {"eval_loss": self.eval_loss, "score": -self.eval_loss}
    self.mgr.save(step, args=ocp.args.Composite(**{
        ckpt.PARAMS: ocp.args.StandardSave(self.state["params"]),
        ckpt.OPT_STATE: ocp.args.StandardSave(self.state["opt_state"]),
        ckpt.MODEL_CONFIG: ocp.args.JsonSave(self.model_cfg.to_hf_dict()),
        ckpt.TRAIN_META: ocp.args.JsonSave(meta),
    }), metrics=metrics or None, force=True)
    self.writer.flush()  # on gs:// metrics.jsonl is rewritten whole, not appended: keep it in step with checkpoints
    self.last_saved_step = step
    self.signals.saved()

  # -- the end ------------------------------------------------------------------------------------------------------

  def _finish(self, preempted: bool) -> dict[str, Any]:
    self.progress.close()
    result: dict[str, Any] = {
        "workdir": self.workdir, "total_steps": self.total_steps, "start_step": self.start_step,
        "final_step": self.step, "preempted": preempted, "eval_loss": self.eval_loss,
        "data_stats": getattr(self.train_it, "stats", None)}
    if self.last_record is not None:
      result["final_loss"] = self.last_record["loss"]
      if "skipped_updates" in self.last_record:
        result["skipped_updates"] = int(self.last_record["skipped_updates"])
    if preempted:
      log.warning("stopped at step %d; checkpoint saved in %s; rerun the same command to resume", self.step,
                  self.mgr.directory)
    else:
      if self.cfg.plot and self.is_main:
        self.writer.flush()  # the plot reads metrics.jsonl back
        result["plot"] = plot_metrics(self.workdir)
      if self.cfg.export_hf:  # every host takes part in gathering the tensors; process 0 writes
        out = storage.join(self.workdir, "hf")
        save_pretrained(self.state["params"], out, cfg=self.model_cfg, dtype=as_dtype(self.cfg.export_dtype),
                        tokenizer=self.tokenizer, overwrite=True, progress=self.progress.interactive)
        result["hf_export"] = out
      if self.cfg.sctir.at_end:
        result["sctir"] = self._sctir(storage.join(self.workdir, "sctir"), echo=self.is_main)
    self.writer.write_summary(result)
    return result

  def _sctir(self, out_dir: str, *, echo: bool) -> dict[str, Any]:
    """SC-TIR on the stage's held-out problems with the live parameters, written to `out_dir` by the same code as
    `python -m numina_jax.evaluate`; returns the headline metrics. One sampler per run: its compiled programs
    take the parameters as an argument.

    On many hosts every host runs it (the sampler is one program over the mesh); process 0 runs the model's python
    and writes; the metrics returned are process 0's on every host, since the best checkpoint is chosen by them."""
    s = self.cfg.sctir
    if self._sctir_setup is None:
      self._sctir_setup = sctir_setup(self.cfg, self.model_cfg, self.state["params"], self.mesh)
    eval_set, cfg, sampler = self._sctir_setup
    sampler.params = self.state["params"]
    out = storage.path(out_dir)
    if self.is_main:
      storage.makedirs(out)
    log.info("SC-TIR at step %d: %d held-out problems x %d traces, %d rounds", self.step, len(eval_set), s.samples,
             s.rounds)
    backend = {"kind": "training", "workdir": self.workdir, "step": self.step, "mesh": dict(self.mesh.shape),
               "hosts": jax.process_count()}
    m = write_evaluation(eval_set, sampler, self.tokenizer, cfg, out, backend, echo=echo,
                         hosts=distributed.JaxHosts())["metrics"]
    return distributed.broadcast_json({
        "dir": str(out), "num_problems": m["num_problems"], "n": m["n"], "maj_at_n": m["maj_at"][m["n"]],
        "mean_at_1": m["mean_at_1"], "no_answer_rate": m["no_answer_rate"],
        "tool_calls_per_trace": m["tool_calls_per_trace"]})

  def sctir_eval(self, step: int, write: bool = True) -> float:
    """SC-TIR during training (sctir.every_steps): metrics.jsonl gets sctir_maj, sctir_mean1, ...; returns maj@N."""
    r = self._sctir(storage.join(self.workdir, "sctir", f"step_{step}"), echo=False)
    if write:
      self.writer.write(step, {"step": step, "sctir_maj": r["maj_at_n"], "sctir_mean1": r["mean_at_1"],
                               "sctir_no_answer": r["no_answer_rate"], "sctir_tool_calls": r["tool_calls_per_trace"]})
    log.info("step %d: SC-TIR maj@%d %.1f%%, mean@1 %.1f%% on %d held-out problems", step, r["n"],
             100 * r["maj_at_n"], 100 * r["mean_at_1"], r["num_problems"])
    return r["maj_at_n"]

  def _nonfinite_message(self, e: _NonFinite) -> str:
    last = self.mgr.latest_step()
    where = (f"the last good checkpoint is step {last} in {self.mgr.directory}" if last is not None else
             f"no checkpoint was saved yet in {self.mgr.directory}")
    return (f"{', '.join(e.what)} at step {e.step}: stopping; nothing from step {e.step} on was saved, {where}. "
            f"Lower config.lr, check the data, raise optim.clip_norm, or set optim.skip_nonfinite=True to skip "
            f"such updates.")

  def _close(self) -> None:
    for closer in (getattr(self.progress, "close", None), getattr(self.writer, "close", None), self.mgr.close,
                   getattr(self.train_it, "close", None)):
      if closer is not None:
        closer()

  # -- inputs -----------------------------------------------------------------------------------------------------

  def _global_batch(self, local: dict[str, np.ndarray]) -> dict[str, jax.Array]:
    return _global_batch(local, self.b_shard, self.cfg.global_batch_size)

  def _host_flags(self, flags: np.ndarray) -> jax.Array:
    """This host's flags as its rows of the [devices, flags] array whose maximum the step returns."""
    return jax.make_array_from_callback((self.mesh.size, NUM_FLAGS), self.flags_shard, lambda _: flags[None])


def sctir_setup(cfg: ml_collections.ConfigDict, model_cfg, params: dict[str, jax.Array],
                mesh: jax.sharding.Mesh) -> tuple[Any, SCTIRConfig, JaxSampler]:
  """What a stage's SC-TIR runs with (`config.sctir`): its held-out problems, the SCTIRConfig, and a JaxSampler of
  `params` on `mesh`."""
  s = cfg.sctir
  eval_set = held_out_set(cfg.data, limit=s.limit or None)
  sctir_cfg = SCTIRConfig(samples=s.samples, rounds=s.rounds, temperature=s.temperature, seed=s.seed,
                          max_tokens_per_round=s.max_tokens_per_round, max_context=s.max_len)
  sampler = JaxSampler(params, model_cfg, mesh=mesh, max_len=s.max_len,
                       max_batch=max(1, min(len(eval_set), sctir_cfg.concurrent_problems)) * s.samples,
                       moe_kernel=cfg.model.moe_kernel, progress=False)
  return eval_set, sctir_cfg, sampler


def _global_batch(local: dict[str, np.ndarray], shardings, global_rows: int):
  out = {}
  for k in BATCH_KEYS:
    arr = np.asarray(local[k])
    out[k] = jax.make_array_from_process_local_data(shardings[k], arr, (global_rows, *arr.shape[1:]))
  return out


def _manager(cfg) -> ocp.CheckpointManager:
  return ckpt.training_manager(storage.join(cfg.workdir, "checkpoints"), max_to_keep=cfg.checkpoint.max_to_keep,
                               keep_best=cfg.checkpoint.keep_best, async_save=cfg.checkpoint.async_save)


def _restore(mgr, step, state_shard, tx, params_abstract):
  def target(tree_abs, shard):
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), tree_abs, shard)

  opt_abs = jax.eval_shape(tx.init, params_abstract)
  try:
    r = mgr.restore(step, args=ocp.args.Composite(**{
        ckpt.PARAMS: ocp.args.StandardRestore(target(params_abstract, state_shard["params"])),
        ckpt.OPT_STATE: ocp.args.StandardRestore(target(opt_abs, state_shard["opt_state"])),
        ckpt.TRAIN_META: ocp.args.JsonRestore(),
    }))
  except Exception as e:
    raise ValueError(f"could not resume from checkpoint {mgr.directory}/{step}: {type(e).__name__}: {e}. "
                     f"If that step folder is damaged, move it away to resume from the one before.") from e
  meta = r[ckpt.TRAIN_META]
  state = {"step": jax.device_put(jnp.asarray(meta["step"], jnp.int32), state_shard["step"]),
           "params": r[ckpt.PARAMS], "opt_state": r[ckpt.OPT_STATE]}
  return state, meta
