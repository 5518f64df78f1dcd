"""The training config: its schema (every field once), the loader every CLI shares, validation at start-up, and
the model architecture it names."""

from __future__ import annotations

import copy
import difflib
import importlib.util
import math
import os
import re
from typing import Iterable, Sequence

import ml_collections
from absl import flags
from ml_collections import config_flags

from numina_jax import checkpoint as ckpt
from numina_jax import storage
from numina_jax.data import default_data_config, validate_data_config
from numina_jax.data.sources import source_specs
from numina_jax.hf.load import resolve_checkpoint
from numina_jax.model.attention import IMPLEMENTATIONS as ATTENTION_IMPLEMENTATIONS
from numina_jax.model.config import GptOssConfig
from numina_jax.model.moe import MOE_KERNELS as _KERNELS
from numina_jax.model.transformer import DTYPES, REMAT_POLICIES

MOE_KERNELS = ("auto", *_KERNELS)

REPO_CONFIGS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")
DEFAULT_CONFIG = os.path.join(REPO_CONFIGS, "default.py")


def base_config() -> ml_collections.ConfigDict:
  """Every training field, defined once. Config files in `configs/` start from this and change values."""
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
  c.next_stage = ""  # then train get_config(next_stage) of the same config file, from this stage's best checkpoint
  c.export_hf = False  # write a Hugging Face checkpoint (safetensors) to workdir/hf at the end
  c.export_dtype = "bfloat16"  # dtype of the exported weights
  c.plot = True  # write workdir/training.png (loss and learning rate) at the end
  c.progress_bar = True  # show a tqdm progress bar on host 0
  c.topology = ""  # TPU slice the config is written for, e.g. v5p:4x4x4 (what numina_jax.plan compiles for); "" = local

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
  c.model.load_balancing_loss_coef = 0.0  # weight of the MoE load-balancing loss in our training loss (not the checkpoint's router_aux_loss_coef)
  c.model.z_loss_coef = 0.0  # weight of the z-loss (mean squared log-partition) on loss tokens
  c.model.loss_chunk = 512  # sequence chunk of the lm_head + cross-entropy (divides seq_len; 0 = whole sequence)

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
  c.checkpoint.keep_best = 1  # best checkpoints (by best_metric) kept besides the recent ones
  c.checkpoint.best_metric = "eval_loss"  # eval_loss (lowest) | sctir_maj (highest SC-TIR maj@N; sctir.every_steps)
  c.checkpoint.async_save = True  # write checkpoints in the background

  c.sctir = ml_collections.ConfigDict()
  c.sctir.at_end = False  # after the stage, SC-TIR (JAX sampler, sandboxed python) on its held-out problems
  c.sctir.every_steps = 0  # also every N steps during training (and at the end), logged as sctir_*; 0 = off
  c.sctir.limit = 8  # held-out problems evaluated (the first N of data.eval_size's rows); 0 = all
  c.sctir.samples = 4  # traces per problem, the majority vote's N
  c.sctir.rounds = 2  # sampling rounds per trace; every round but the last may end in a python call
  c.sctir.max_tokens_per_round = 256  # new tokens per round
  c.sctir.temperature = 0.8  # sampling temperature (Numina's)
  c.sctir.max_len = 1024  # the sampler's context: prompt, every round and the tool replies
  c.sctir.seed = 0  # seed of every trace's sampling

  c.multihost = False  # start with jax.distributed.initialize() (multi-host slices and clusters)
  c.distributed = ml_collections.ConfigDict()
  c.distributed.coordinator_address = ""  # host:port of process 0; "" = auto-detect (Cloud TPU, SLURM, Open MPI, Kubernetes)
  c.distributed.num_processes = 0  # processes in the job; 0 = auto-detect
  c.distributed.process_id = -1  # this process's index; -1 = auto-detect
  c.distributed.initialization_timeout = 300  # seconds to wait for every process to connect to the coordinator
  return c


def model_config_for(cfg: ml_collections.ConfigDict, tokenizer) -> GptOssConfig:
  """The architecture: from the starting checkpoint, a config.json, or the tiny preset."""
  m = cfg.model
  if m.hf_path:
    return GptOssConfig.from_pretrained(resolve_checkpoint(m.hf_path))
  if m.init_checkpoint:
    return ckpt.load_model_config(m.init_checkpoint)
  if m.config_path:
    return GptOssConfig.from_pretrained(m.config_path)
  vocab = m.vocab_size or int(math.ceil(len(tokenizer) / 64) * 64)
  if vocab < len(tokenizer):
    raise ValueError(f"config.model.vocab_size={vocab} is smaller than the tokenizer ({len(tokenizer)} tokens)")
  pad = tokenizer.convert_tokens_to_ids("<|endoftext|>")
  eos = tokenizer.convert_tokens_to_ids("<|return|>")
  return GptOssConfig(
      vocab_size=vocab, hidden_size=m.hidden_size, intermediate_size=m.intermediate_size,
      num_hidden_layers=m.num_hidden_layers, num_attention_heads=m.num_attention_heads,
      num_key_value_heads=m.num_key_value_heads, head_dim=m.head_dim, num_local_experts=m.num_local_experts,
      num_experts_per_tok=m.num_experts_per_tok, sliding_window=m.sliding_window,
      rope_original_max_position_embeddings=max(cfg.seq_len, 64),
      pad_token_id=pad, eos_token_id=eos)


def _flat_keys(cfg: ml_collections.ConfigDict, prefix: str = "") -> list[str]:
  out = []
  for k, v in cfg.items():
    path = f"{prefix}{k}"
    out.append(path)
    if isinstance(v, ml_collections.ConfigDict):
      out += _flat_keys(v, path + ".")
  return out


# Fields that were renamed, so that an old command line gets a message naming the new field.
RENAMED = {
    "model.router_aux_loss_coef": "model.load_balancing_loss_coef",  # the checkpoint's config has a field of
                                                                     # that name with another value (0.9)
    "data.num_epochs": "data.stream_epochs",  # not the training epochs (num_epochs): where the data stream ends
}


def check_overrides(cfg: ml_collections.ConfigDict, argv: Iterable[str], flag: str = "config") -> None:
  """Raises ValueError naming an unknown `--config.X` override and the closest valid names."""
  keys = _flat_keys(cfg)
  for arg in argv:
    m = re.match(rf"^--{flag}\.([^=\s]+)", arg)
    if not m:
      continue
    name = m.group(1)
    if name in RENAMED and name not in keys:
      raise ValueError(f"--{flag}.{name} was renamed --{flag}.{RENAMED[name]}")
    if name.startswith("stage2.") and "stage2" not in cfg:
      raise ValueError(f"--{flag}.{name}: the stage2 block is gone; a stage is its config file's get_config(stage) "
                       f"(`--config path:tir`), and --{flag}.next_stage=tir runs it after this one")
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
  need(cfg.topology == "" or re.fullmatch(r"v[0-9a-z]+:[0-9]+(x[0-9]+)*", cfg.topology) is not None, "topology",
       f"{cfg.topology!r} is not a TPU slice such as v5p:4x4x4 (or '' for the local devices)")
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
  need(not m.loss_chunk or m.loss_chunk >= cfg.seq_len or cfg.seq_len % m.loss_chunk == 0, "model.loss_chunk",
       f"{m.loss_chunk} does not divide seq_len {cfg.seq_len}; use a divisor of it (or 0 for the whole sequence "
       f"at once)")
  need(m.load_balancing_loss_coef >= 0, "model.load_balancing_loss_coef", "must be >= 0")
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
  validate_data_config(cfg.data)
  s = cfg.sctir
  for f, lo in (("limit", 0), ("samples", 1), ("rounds", 1), ("max_tokens_per_round", 1), ("max_len", 64),
                ("every_steps", 0)):
    need(isinstance(s[f], int) and s[f] >= lo, f"sctir.{f}", f"must be an integer >= {lo}, got {s[f]!r}")
  need(s.temperature > 0 or s.samples == 1, "sctir.temperature", "must be > 0 (or sctir.samples 1 for greedy)")
  need(cfg.checkpoint.best_metric in ("eval_loss", "sctir_maj"), "checkpoint.best_metric",
       f"{cfg.checkpoint.best_metric!r} is not one of eval_loss, sctir_maj")
  need(cfg.checkpoint.best_metric != "sctir_maj" or s.every_steps > 0, "checkpoint.best_metric",
       "sctir_maj needs SC-TIR during training: set sctir.every_steps > 0")
  need(cfg.next_stage != cfg.stage, "next_stage", f"is this stage ({cfg.stage!r}); name the stage that follows it")


def next_stage_config(prev: ml_collections.ConfigDict, nxt: ml_collections.ConfigDict, *, root: str, index: int,
                      previous_workdir: str) -> ml_collections.ConfigDict:
  """Stage `index` (2, 3, ...) of a chain: `nxt` is the config file's `get_config(prev.next_stage)`, which
  describes the stage; the chain only places it. It writes to `<root>/stage<index>_<stage>`, starts from the
  previous stage's best checkpoint, and must not train on the previous stage's sources."""
  c = copy.deepcopy(nxt)
  with c.unlocked():
    c.model.hf_path = ""
    c.model.init_checkpoint = storage.join(previous_workdir, "checkpoints")
    c.model.init_step = -1
    c.workdir = storage.join(root, f"stage{index}_{c.stage}")
  validate(c)

  def sources(data):
    return sorted((s.name, s.config, s.split) for s in source_specs(data) if s.weight > 0)
  if sources(c.data) == sources(prev.data):
    raise ValueError(f"config.next_stage: stage {c.stage!r} would train on stage {prev.stage!r}'s data "
                     f"{[s[0] for s in sources(prev.data)]}; get_config({prev.next_stage!r}) must set its own "
                     f"data.dataset_name or data.mixture")
  return c


def load_config_file(spec: str) -> ml_collections.ConfigDict:
  """The config of `path[:arg]`, built the way `ml_collections.config_flags` builds it (`get_config(arg)`)."""
  path, _, arg = spec.partition(":")
  if not os.path.exists(path):
    raise FileNotFoundError(f"--config: no config file at {path}")
  mod_spec = importlib.util.spec_from_file_location("_numina_config", path)
  mod = importlib.util.module_from_spec(mod_spec)
  mod_spec.loader.exec_module(mod)
  return mod.get_config(arg) if arg else mod.get_config()


def config_spec(argv: Sequence[str], default: str = DEFAULT_CONFIG) -> str:
  """The `path[:arg]` given as `--config=...` or `--config ...` in argv, else `default`."""
  for i, a in enumerate(argv):
    if a.startswith("--config="):
      return a.split("=", 1)[1]
    if a == "--config" and i + 1 < len(argv):
      return argv[i + 1]
  return default


def config_overrides(argv: Sequence[str]) -> list[str]:
  """The `--config.X=V` (or `--config.X V`) flags of argv, in order."""
  out = []
  for i, a in enumerate(argv):
    if a.startswith("--config."):
      out.append(a)
      if "=" not in a and i + 1 < len(argv) and not argv[i + 1].startswith("--"):
        out.append(argv[i + 1])
  return out


def load_config(argv: Sequence[str], default: str = DEFAULT_CONFIG) -> ml_collections.ConfigDict:
  """The config every CLI trains or plans with: `--config path[:arg]` plus its `--config.X=V` overrides, parsed
  by `ml_collections.config_flags` exactly as `python -m numina_jax.train` parses them. argv holds only those
  flags. A missing file or an unknown field is an error naming it (and the closest valid field names)."""
  argv = list(argv)
  spec = config_spec(argv, default)
  check_overrides(load_config_file(spec), argv)
  fv = flags.FlagValues()
  full_argv = ["numina_jax", *argv]
  holder = config_flags.DEFINE_config_file("config", default, "training config file", flag_values=fv,
                                           lock_config=True, sys_argv=full_argv)
  try:
    fv(full_argv)
  except flags.Error as e:
    raise ValueError(str(e)) from None
  return holder.value
