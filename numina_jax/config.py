"""Training-config schema helpers: the shared base config, validation at start-up, and override checks."""

from __future__ import annotations

import copy
import difflib
import re
from typing import Iterable

import ml_collections

from numina_jax.model.attention import IMPLEMENTATIONS as ATTENTION_IMPLEMENTATIONS
from numina_jax.model.transformer import DTYPES, REMAT_POLICIES

MOE_KERNELS = ("auto", "tiled", "ragged", "gmm", "dense")


def base_config() -> ml_collections.ConfigDict:
  """Every training field, defined once. Config files in `configs/` start from this and change values."""
  from numina_jax.data import default_data_config

  c = ml_collections.ConfigDict()
  c.lr = 2e-5  # peak learning rate (AdamW), reached after warmup
  c.warmup_ratio = 0.0  # fraction of total steps spent warming up linearly from 0 to `lr`
  c.num_epochs = 3  # passes over the training split (ignored when max_steps > 0)
  c.max_steps = 0  # total optimizer steps; 0 derives them from num_epochs and the dataset size
  c.global_batch_size = 32  # packed sequences per optimizer step, over all hosts
  c.microbatch_size = 0  # sequences per forward/backward; 0 = the whole global batch (no accumulation)
  c.seq_len = 2048  # packed block length in tokens
  c.seed = 0  # seed for parameter init (random-init models) and data shuffling
  c.workdir = "runs/default"  # run directory (local or gs://): checkpoints, metrics.jsonl, TensorBoard, plot, export
  c.log_every_steps = 10  # steps between metric lines (metrics.jsonl, TensorBoard, progress bar)
  c.checkpoint_every_steps = 500  # steps between checkpoints (0 = only at the end and on preemption)
  c.checkpoint_every_secs = 1800  # also checkpoint when this many seconds passed since the last (0 = off)
  c.eval_every_steps = 500  # steps between evaluations on the held-out split (0 = only at the end)
  c.remat_policy = "full"  # activation rematerialization: none | full | save_dots | save_dots_no_batch | save_qkv_out
  c.stage = "cot"  # recipe stage trained by this config: cot (chain of thought) | tir (tool-integrated)
  c.export_hf = False  # write a Hugging Face checkpoint (safetensors) to workdir/hf at the end
  c.export_dtype = "bfloat16"  # dtype of the exported weights
  c.plot = True  # write workdir/training.png (loss and learning rate) at the end
  c.progress_bar = True  # show a tqdm progress bar on host 0

  c.model = ml_collections.ConfigDict()
  c.model.hf_path = ""  # Hugging Face checkpoint (hub id or local dir) to start from; "" = see init_checkpoint
  c.model.init_checkpoint = ""  # Orbax checkpoint dir to start from (convert import, or an earlier stage's checkpoints)
  c.model.init_step = -1  # step of init_checkpoint to load; -1 = its best by eval loss, else its latest
  c.model.config_path = ""  # config.json describing a randomly initialised model ("" = the tiny preset below)
  c.model.vocab_size = 0  # tiny preset: vocab size; 0 = the tokenizer's length rounded up to 64
  c.model.hidden_size = 64  # tiny preset: hidden size
  c.model.intermediate_size = 96  # tiny preset: per-expert intermediate size
  c.model.num_hidden_layers = 2  # tiny preset: layers (even: sliding/full pairs)
  c.model.num_attention_heads = 4  # tiny preset: query heads
  c.model.num_key_value_heads = 2  # tiny preset: key/value heads
  c.model.head_dim = 16  # tiny preset: head dim
  c.model.num_local_experts = 4  # tiny preset: experts
  c.model.num_experts_per_tok = 2  # tiny preset: experts per token
  c.model.sliding_window = 128  # tiny preset: keys seen by sliding layers (self included)
  c.model.param_dtype = "float32"  # master weights and optimizer state dtype
  c.model.dtype = "bfloat16"  # compute dtype of the forward/backward pass
  c.model.moe_kernel = "auto"  # auto (tiled on CPU, gmm on TPU, ragged on GPU) | tiled | ragged | gmm | dense
  c.model.moe_tile = 0  # rows per tile of the CPU tiled MoE kernel; 0 = chosen from the shapes
  c.model.moe_capacity_factor = 0.0  # 0 = dropless; > 0 caps each expert at factor x its even share, counts drops
  c.model.attention = "auto"  # auto (splash on TPU, xla elsewhere) | xla (blockwise) | dense (reference) | splash
  c.model.router_aux_loss_coef = 0.0  # weight of the load-balancing loss (the checkpoint's config says 0.9)
  c.model.z_loss_coef = 0.0  # weight of the z-loss (mean squared log-partition) on loss tokens
  c.model.loss_chunk = 512  # sequence chunk for the lm_head + cross-entropy, so full logits never exist at once

  c.data = default_data_config()

  c.mesh = ml_collections.ConfigDict()
  c.mesh.data = 1  # pure data-parallel replicas
  c.mesh.fsdp = -1  # fully sharded data parallel (params and optimizer state split); -1 = remaining devices
  c.mesh.expert = 1  # expert parallelism
  c.mesh.tensor = 1  # tensor parallelism (heads, expert intermediate, vocab)

  c.optim = ml_collections.ConfigDict()
  c.optim.b1 = 0.9  # AdamW beta1
  c.optim.b2 = 0.999  # AdamW beta2
  c.optim.eps = 1e-8  # AdamW epsilon
  c.optim.weight_decay = 0.0  # decoupled weight decay (never on norms, biases and sinks)
  c.optim.clip_norm = 1.0  # global gradient-norm clipping (0 = off)
  c.optim.schedule = "cosine"  # cosine | linear | constant, after warmup
  c.optim.final_lr_ratio = 0.0  # final learning rate as a fraction of `lr`
  c.optim.skip_nonfinite = False  # skip an update whose gradients are NaN/inf (counted as skipped_updates) instead of stopping
  c.optim.max_consecutive_skips = 5  # with skip_nonfinite: after this many skips in a row the run stops

  c.checkpoint = ml_collections.ConfigDict()
  c.checkpoint.max_to_keep = 3  # most recent checkpoints kept
  c.checkpoint.keep_best = 1  # best checkpoints by eval loss kept besides the recent ones
  c.checkpoint.async_save = True  # write checkpoints in the background

  c.stage2 = ml_collections.ConfigDict()
  c.stage2.enabled = False  # after this stage, run the TIR stage from its best checkpoint (in workdir/stage2_tir)
  c.stage2.dataset_name = ""  # TIR dataset (data.dataset_name of stage 2; stage 1's data.dataset_config is not carried over)
  c.stage2.mixture = ()  # weighted TIR sources (data.mixture of stage 2); () = stage2.dataset_name alone
  c.stage2.eval_dataset_name = ""  # eval source of stage 2; "" = held out from stage 2's own sources
  c.stage2.seq_len = 1024  # block length of stage 2
  c.stage2.num_epochs = 4  # epochs of stage 2
  c.stage2.max_steps = 0  # steps of stage 2 (0 = from epochs)
  c.stage2.warmup_ratio = 0.1  # warmup of stage 2
  c.stage2.lr = 2e-5  # peak learning rate of stage 2

  c.multihost = False  # start with jax.distributed.initialize() (multi-host slices and clusters)
  c.distributed = ml_collections.ConfigDict()
  c.distributed.coordinator_address = ""  # host:port of process 0; "" = auto-detect (Cloud TPU, SLURM, Open MPI, Kubernetes)
  c.distributed.num_processes = 0  # processes in the job; 0 = auto-detect
  c.distributed.process_id = -1  # this process's index; -1 = auto-detect
  c.distributed.initialization_timeout = 300  # seconds to wait for every process to connect to the coordinator
  return c


def _flat_keys(cfg: ml_collections.ConfigDict, prefix: str = "") -> list[str]:
  out = []
  for k, v in cfg.items():
    path = f"{prefix}{k}"
    out.append(path)
    if isinstance(v, ml_collections.ConfigDict):
      out += _flat_keys(v, path + ".")
  return out


def check_overrides(cfg: ml_collections.ConfigDict, argv: Iterable[str], flag: str = "config") -> None:
  """Raises ValueError naming an unknown `--config.X` override and the closest valid names."""
  keys = _flat_keys(cfg)
  for arg in argv:
    m = re.match(rf"^--{flag}\.([^=\s]+)", arg)
    if not m:
      continue
    name = m.group(1)
    if name not in keys:
      close = difflib.get_close_matches(name, keys, n=3, cutoff=0.7)
      hint = f"; did you mean {', '.join('--' + flag + '.' + c for c in close)}?" if close else ""
      raise ValueError(f"unknown config field --{flag}.{name}{hint}")


def validate(cfg: ml_collections.ConfigDict) -> None:
  """Start-up checks; each error names the field and the allowed values."""
  def need(ok: bool, field: str, msg: str):
    if not ok:
      raise ValueError(f"config.{field}: {msg}")

  need(cfg.lr > 0, "lr", f"must be > 0, got {cfg.lr}")
  need(0 <= cfg.warmup_ratio < 1, "warmup_ratio", f"must be in [0, 1), got {cfg.warmup_ratio}")
  need(cfg.max_steps >= 0, "max_steps", f"must be >= 0, got {cfg.max_steps}")
  need(cfg.max_steps > 0 or cfg.num_epochs > 0, "num_epochs", "must be > 0 when max_steps is 0")
  need(cfg.global_batch_size > 0, "global_batch_size", f"must be > 0, got {cfg.global_batch_size}")
  need(cfg.microbatch_size >= 0, "microbatch_size", f"must be >= 0, got {cfg.microbatch_size}")
  if cfg.microbatch_size:
    need(cfg.global_batch_size % cfg.microbatch_size == 0, "microbatch_size",
         f"{cfg.microbatch_size} does not divide global_batch_size {cfg.global_batch_size}")
  need(cfg.seq_len > 1, "seq_len", f"must be > 1, got {cfg.seq_len}")
  for f in ("log_every_steps",):
    need(cfg[f] > 0, f, f"must be > 0, got {cfg[f]}")
  for f in ("checkpoint_every_steps", "checkpoint_every_secs", "eval_every_steps"):
    need(cfg[f] >= 0, f, f"must be >= 0, got {cfg[f]}")
  need(cfg.remat_policy in REMAT_POLICIES, "remat_policy",
       f"{cfg.remat_policy!r} is not one of {', '.join(REMAT_POLICIES)}")
  need(cfg.stage in ("cot", "tir"), "stage", f"{cfg.stage!r} is not one of cot, tir")
  need(bool(cfg.workdir), "workdir", "must be set")
  need(cfg.export_dtype in DTYPES, "export_dtype", f"{cfg.export_dtype!r} is not one of {', '.join(DTYPES)}")
  m = cfg.model
  need(m.param_dtype in DTYPES, "model.param_dtype", f"{m.param_dtype!r} is not one of {', '.join(DTYPES)}")
  need(m.dtype in DTYPES, "model.dtype", f"{m.dtype!r} is not one of {', '.join(DTYPES)}")
  need(m.moe_kernel in MOE_KERNELS, "model.moe_kernel", f"{m.moe_kernel!r} is not one of {', '.join(MOE_KERNELS)}")
  need(m.moe_tile >= 0, "model.moe_tile", f"must be >= 0 (0 = auto), got {m.moe_tile}")
  need(m.moe_capacity_factor >= 0, "model.moe_capacity_factor",
       f"must be >= 0 (0 = dropless), got {m.moe_capacity_factor}")
  need(not (m.moe_capacity_factor and m.moe_kernel == "dense"), "model.moe_capacity_factor",
       "needs a grouped moe_kernel (auto, tiled, ragged or gmm); dense is the dropless reference")
  need(m.attention in ATTENTION_IMPLEMENTATIONS, "model.attention",
       f"{m.attention!r} is not one of {', '.join(ATTENTION_IMPLEMENTATIONS)}")
  need(m.loss_chunk >= 0, "model.loss_chunk", f"must be >= 0, got {m.loss_chunk}")
  need(m.router_aux_loss_coef >= 0, "model.router_aux_loss_coef", "must be >= 0")
  need(m.z_loss_coef >= 0, "model.z_loss_coef", "must be >= 0")
  need(not (m.hf_path and m.init_checkpoint), "model.hf_path",
       "set either model.hf_path or model.init_checkpoint, not both")
  for ax in ("data", "fsdp", "expert", "tensor"):
    need(cfg.mesh[ax] == -1 or cfg.mesh[ax] >= 1, f"mesh.{ax}", f"must be >= 1 or -1, got {cfg.mesh[ax]}")
  need([cfg.mesh[a] for a in ("data", "fsdp", "expert", "tensor")].count(-1) <= 1, "mesh",
       "at most one axis may be -1")
  o = cfg.optim
  need(0 <= o.b1 < 1 and 0 <= o.b2 < 1, "optim.b1", "betas must be in [0, 1)")
  need(o.eps > 0, "optim.eps", "must be > 0")
  need(o.weight_decay >= 0, "optim.weight_decay", "must be >= 0")
  need(o.clip_norm >= 0, "optim.clip_norm", "must be >= 0")
  need(o.schedule in ("cosine", "linear", "constant"), "optim.schedule",
       f"{o.schedule!r} is not one of cosine, linear, constant")
  need(0 <= o.final_lr_ratio <= 1, "optim.final_lr_ratio", "must be in [0, 1]")
  need(cfg.checkpoint.max_to_keep >= 1, "checkpoint.max_to_keep", "must be >= 1")
  need(cfg.checkpoint.keep_best >= 0, "checkpoint.keep_best", "must be >= 0")
  need(o.max_consecutive_skips >= 1, "optim.max_consecutive_skips", "must be >= 1")
  d = cfg.distributed
  need(d.num_processes >= 0, "distributed.num_processes", f"must be >= 0 (0 = auto), got {d.num_processes}")
  need(d.process_id >= -1, "distributed.process_id", f"must be >= 0, or -1 for auto, got {d.process_id}")
  need(not (d.num_processes and d.process_id >= d.num_processes), "distributed.process_id",
       f"{d.process_id} is not below distributed.num_processes {d.num_processes}")
  need(d.initialization_timeout > 0, "distributed.initialization_timeout", "must be > 0 seconds")
  if not cfg.multihost:
    for f, unset in (("coordinator_address", ""), ("num_processes", 0), ("process_id", -1)):
      need(d[f] == unset, f"distributed.{f}", "is set but config.multihost is False; add --config.multihost=True")
  from numina_jax.data import validate_data_config
  validate_data_config(cfg.data)
  if cfg.stage2.enabled:
    need(bool(cfg.stage2.dataset_name) or bool(cfg.stage2.mixture), "stage2.dataset_name",
         "set stage2.dataset_name or stage2.mixture when stage2.enabled")
    need(cfg.stage2.seq_len > 1, "stage2.seq_len", "must be > 1")
    need(cfg.stage2.lr > 0, "stage2.lr", "must be > 0")
    from numina_jax.data.sources import source_specs
    data2 = stage2_data_config(cfg)
    try:
      validate_data_config(data2)
    except ValueError as e:
      raise ValueError(f"stage 2 (config.stage2.dataset_name / stage2.mixture): {e}") from None

    def sources(data):
      return sorted((s.name, s.config, s.split) for s in source_specs(data) if s.weight > 0)
    need(sources(data2) != sources(cfg.data), "stage2.dataset_name",
         f"stage 2 would train on stage 1's data {[s[0] for s in sources(cfg.data)]}; set stage2.dataset_name or "
         f"stage2.mixture to the TIR data")


def stage2_data_config(cfg: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The `data` section of stage 2: stage 1's rendering and packing options with stage 2's own sources."""
  data = copy.deepcopy(cfg.data)
  with data.unlocked():
    data.dataset_name = cfg.stage2.dataset_name
    data.mixture = cfg.stage2.mixture
    data.dataset_config = ""
    data.eval_dataset_name = cfg.stage2.eval_dataset_name
  return data
