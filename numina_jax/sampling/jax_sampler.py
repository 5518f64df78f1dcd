"""The in-process JAX sampler: batched prefill and decode of the Flax gpt-oss over a KV cache, on the training
mesh or one device, behind the `Sampler` interface (token ids in, token ids out)."""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import functools
import sys
import time
from typing import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P
from jax.experimental import multihost_utils
from tqdm.auto import tqdm

from numina_jax.checkpoint import load_model_config, load_params
from numina_jax.hf import load_pretrained_params
from numina_jax.model.config import GptOssConfig
from numina_jax.model.moe import resolve_moe_kernel
from numina_jax.model.params import param_specs
from numina_jax.model.transformer import as_dtype, check_params
from numina_jax.sampling import kv_cache
from numina_jax.sampling.types import Completion, SamplingParams
from numina_jax.sharding import param_shardings

F32 = jnp.float32


def _pow2(n: int) -> int:
  return 1 << max(0, int(n) - 1).bit_length()


def _bucket(n: int, lo: int, hi: int) -> int:
  """The power of two >= n, at least lo, at most hi: bounds how many shapes get compiled."""
  return min(hi, max(lo, _pow2(n)))


def select_tokens(logits_bV, src_R, temperature_R, top_p_R, seed_R2, copy_R, step_R):
  """Next token and its log-probability for R rows, each reading logits row `src_R` (n samples share a prefill).

  Temperature 0 is greedy (argmax). Otherwise the logits are divided by the temperature, cut to the nucleus of
  mass `top_p`, and sampled with a key derived from (seed, copy, step) alone, so a row's samples do not depend on
  which other rows share the batch. The log-probability is that of the raw model (log-softmax of the unscaled
  logits), as vLLM returns by default; it is the same whatever the temperature and top_p.
  """
  logits = jnp.take(logits_bV, src_R, axis=0).astype(F32)
  logprobs_RV = jax.nn.log_softmax(logits, axis=-1)
  greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)
  hot = temperature_R > 0
  scaled = logits / jnp.where(hot, temperature_R, 1.0)[:, None]

  def nucleus(s):
    # Keep the highest-probability tokens until the mass before a token reaches top_p (the first always stays).
    sorted_desc = -jnp.sort(-s, axis=-1)
    probs = jax.nn.softmax(sorted_desc, axis=-1)
    kept = (jnp.cumsum(probs, axis=-1) - probs) < top_p_R[:, None]
    threshold = jnp.min(jnp.where(kept, sorted_desc, jnp.inf), axis=-1, keepdims=True)
    return jnp.where((s >= threshold) | (top_p_R[:, None] >= 1), s, -jnp.inf)

  scaled = jax.lax.cond(jnp.any(hot & (top_p_R < 1)), nucleus, lambda s: s, scaled)

  def draw(seed2, copy, step, row_logits):
    key = jax.random.fold_in(jax.random.key(seed2[0]), seed2[1])
    key = jax.random.fold_in(jax.random.fold_in(key, copy), step)
    return jax.random.categorical(key, row_logits).astype(jnp.int32)

  sampled = jax.vmap(draw)(seed_R2, copy_R, step_R, scaled)
  tokens = jnp.where(hot, sampled, greedy)
  return tokens, jnp.take_along_axis(logprobs_RV, tokens[:, None], axis=-1)[:, 0]


def _replicate(x):
  """Every device (and host) holds the whole array: the host loop reads it, and on many hosts each reads it."""
  mesh = jax.sharding.get_abstract_mesh()
  return x if mesh is None or mesh.empty else jax.lax.with_sharding_constraint(x, P())


@dataclasses.dataclass
class _Row:
  prompt: int  # index of the prompt in the generate call
  copy: int  # which of the prompt's n samples
  tokens: tuple[int, ...]
  params: SamplingParams
  seed: int
  out: list[int] = dataclasses.field(default_factory=list)
  logprobs: list[float] = dataclasses.field(default_factory=list)
  finish: str | None = None


class JaxSampler:
  """Samples completions from gpt-oss parameters in this process.

  Rows (n per prompt) share up to `max_batch` cache slots. A prompt is prefilled in chunks of up to
  `prefill_chunk` tokens (identical prompts once, then their cache rows are copied); all active rows then decode
  one token per step, the next tokens chosen in the same compiled step; a row that ends frees its slot for a
  waiting row at once. Shapes are bucketed to powers of two so few programs are compiled. Every row needs
  len(prompt) + max_tokens <= `max_len` positions.

  With `mesh`, parameters sit in their training shardings (`sharding.param_shardings`), the cache is split over
  rows (data, fsdp, expert) and kv heads (tensor), and every step runs under `jax.set_mesh(mesh)`. A mesh over many
  hosts makes `generate` a collective: every host calls it with the same prompts and params, in the same order,
  and gets the same completions (the sampled tokens are replicated; seeds left unset are process 0's).
  """

  def __init__(self, params: Mapping[str, jax.Array], model_cfg: GptOssConfig, *,
               mesh: jax.sharding.Mesh | None = None, dtype=None, max_len: int = 4096, max_batch: int = 32,
               moe_kernel: str = "auto", moe_tile: int = 0, prefill_chunk: int = 512, min_kv_len: int = 256,
               progress: bool | None = None, compiler_options: dict | None = None):
    """`dtype` is the compute dtype (default: the parameters' dtype); `progress` shows a bar over completions
    (default: when stderr is a terminal); `min_kv_len` is the smallest bucket of cached positions that the full
    layers attend to."""
    specs = param_specs(model_cfg)
    check_params(params, specs)
    for name, value, lo in (("max_len", max_len, 2), ("max_batch", max_batch, 1),
                            ("prefill_chunk", prefill_chunk, 1), ("min_kv_len", min_kv_len, 1)):
      if not isinstance(value, int) or value < lo:
        raise ValueError(f"JaxSampler {name} must be an integer >= {lo}, got {value!r}")
    if max_len > model_cfg.max_position_embeddings:
      raise ValueError(f"JaxSampler max_len {max_len} exceeds the model's max_position_embeddings "
                       f"({model_cfg.max_position_embeddings})")
    resolve_moe_kernel(moe_kernel)  # a bad name fails here, not at the first step
    self.cfg = model_cfg
    self.mesh = mesh
    self.max_len, self.max_batch = max_len, max_batch
    self.prefill_chunk, self.min_kv_len = prefill_chunk, min_kv_len
    self.progress = progress
    # Rows split over the batch mesh axes, and the MoE's expert parallelism needs every batch shard to hold rows:
    # cache and prefill batches are rounded up to a multiple of those axes (idle rows cost compute, not results).
    self.row_multiple = 1 if mesh is None else int(np.prod([mesh.shape[a] for a in ("data", "fsdp", "expert")
                                                                if a in mesh.shape]))
    if mesh is not None:
      shardings = param_shardings(specs, mesh)
      self.params = {k: jax.device_put(v, shardings[k]) for k, v in params.items()}
      self._replicated = NamedSharding(mesh, P())
    else:
      self.params = {k: jnp.asarray(v) for k, v in params.items()}
      self._replicated = None
    self.dtype = as_dtype(dtype) if dtype is not None else jnp.dtype(self.params["embed"].dtype)
    opts = dict(compiler_options=compiler_options) if compiler_options else {}
    step = functools.partial(kv_cache.extend, cfg=model_cfg, dtype=self.dtype, moe_kernel=moe_kernel,
                             moe_tile=moe_tile)
    self._extend = jax.jit(step, static_argnames=("kv_len", "all_logits"), donate_argnums=1, **opts)
    self._copy = jax.jit(kv_cache.copy_rows, donate_argnums=0, **opts)
    self._select = jax.jit(select_tokens, out_shardings=self._replicated, **opts)

    def decode(params, cache, tokens_B1, n_new_B, sampling, *, kv_len):
      logits, cache = step(params, cache, tokens_B1, n_new_B, jnp.zeros_like(n_new_B, bool), kv_len=kv_len)
      tokens, logprobs = select_tokens(logits, jnp.arange(logits.shape[0]), *sampling)
      return cache, _replicate(tokens), _replicate(logprobs)

    self._decode = jax.jit(decode, static_argnames="kv_len", donate_argnums=1, **opts)

  # Constructors -------------------------------------------------------------------------------
  @classmethod
  def from_checkpoint(cls, directory: str, step: int | None = None, *, mesh=None, dtype=None,
                      **kwargs) -> "JaxSampler":
    """From an Orbax checkpoint folder (a training run's or `convert import`'s); `step` defaults to the latest.
    `dtype` casts the parameters as they load (default: as saved)."""
    shardings = None
    if mesh is not None:
      shardings = param_shardings(param_specs(load_model_config(directory, step)), mesh)
    params, cfg = load_params(directory, step=step, shardings=shardings, dtype=dtype)
    return cls(params, cfg, mesh=mesh, **kwargs)

  @classmethod
  def from_hf(cls, path_or_hub_id: str, *, mesh=None, dtype="bfloat16", revision: str | None = None,
              **kwargs) -> "JaxSampler":
    """From a Hugging Face gpt-oss checkpoint (folder or Hub id, dense or MXFP4), loaded in `dtype`."""
    progress = kwargs.get("progress")
    params, cfg = load_pretrained_params(path_or_hub_id, as_dtype(dtype), mesh, revision=revision,
                                         progress=sys.stderr.isatty() if progress is None else bool(progress))
    return cls(params, cfg, mesh=mesh, **kwargs)

  # Sampling -----------------------------------------------------------------------------------
  def generate(self, prompts: Sequence[Sequence[int]],
               params: SamplingParams | Sequence[SamplingParams]) -> list[list[Completion]]:
    """For each prompt, `params.n` completions in order; `params` is one for all prompts or one per prompt."""
    rows = self._rows(prompts, params)
    if rows:
      with self._mesh_context():
        self._run(rows)
    out: list[list[Completion]] = [[] for _ in prompts]
    for r in rows:
      out[r.prompt].append(Completion(list(r.out), r.finish, list(r.logprobs) if r.params.logprobs else None))
    return out

  def _rows(self, prompts, params) -> list[_Row]:
    if isinstance(params, SamplingParams):
      per_prompt = [params] * len(prompts)
    else:
      per_prompt = list(params)
      if len(per_prompt) != len(prompts):
        raise ValueError(f"got {len(per_prompt)} SamplingParams for {len(prompts)} prompts; pass one, or one "
                         "per prompt")
    for i, sp in enumerate(per_prompt):
      if not isinstance(sp, SamplingParams):
        raise TypeError(f"params for prompt {i} is a {type(sp).__name__}, not SamplingParams")
    V = self.cfg.vocab_size
    seeds = self._seeds(per_prompt)
    rows = []
    for i, (prompt, sp) in enumerate(zip(prompts, per_prompt)):
      tokens = tuple(int(t) for t in prompt)
      if not tokens:
        raise ValueError(f"prompt {i} is empty: a completion needs at least one prompt token")
      bad = [(j, t) for j, t in enumerate(tokens) if not 0 <= t < V]
      if bad:
        raise ValueError(f"prompt {i}: token {bad[0][1]} at position {bad[0][0]} is outside the vocabulary "
                         f"[0, {V})")
      if len(tokens) + sp.max_tokens > self.max_len:
        raise ValueError(f"prompt {i}: {len(tokens)} prompt tokens + max_tokens {sp.max_tokens} = "
                         f"{len(tokens) + sp.max_tokens} exceeds the sampler's max_len {self.max_len}; raise "
                         "max_len or lower max_tokens")
      bad_stop = [t for t in sp.stop_token_ids if t >= V]
      if bad_stop:
        raise ValueError(f"prompt {i}: stop token {bad_stop[0]} is outside the vocabulary [0, {V})")
      if sp.seed is not None and not -2 ** 63 <= sp.seed < 2 ** 64:
        raise ValueError(f"prompt {i}: seed {sp.seed} must fit in 64 bits")
      rows += [_Row(i, j, tokens, sp, seeds[i]) for j in range(sp.n)]
    return rows

  @staticmethod
  def _seeds(per_prompt: Sequence[SamplingParams]) -> list[int]:
    """The given seeds; fresh random ones where none is given, drawn once and shared by every host."""
    # Two 32-bit words per seed: jax (without x64) would silently narrow 64-bit integers in the broadcast.
    drawn = np.random.default_rng().integers(0, 2 ** 32, size=(max(len(per_prompt), 1), 2), dtype=np.uint32)
    if jax.process_count() > 1:
      drawn = np.asarray(multihost_utils.broadcast_one_to_all(drawn))
    return [sp.seed if sp.seed is not None else (int(hi) << 32) | int(lo)
            for sp, (hi, lo) in zip(per_prompt, drawn)]

  def _mesh_context(self):
    return jax.set_mesh(self.mesh) if self.mesh is not None else contextlib.nullcontext()

  def _put(self, x):
    x = np.asarray(x)
    if self._replicated is None:
      return x
    if jax.process_count() > 1:
      # Every host passes the same host inputs (the callers agree on them). device_put would check that with an
      # all-gather per array, several per decoded token.
      return jax.make_array_from_callback(x.shape, self._replicated, lambda index: x[index])
    return jax.device_put(x, self._replicated)

  def _show_progress(self) -> bool:
    return sys.stderr.isatty() if self.progress is None else bool(self.progress)

  def _rows_for(self, n: int) -> int:
    """`n` rounded up to a multiple of the batch mesh axes."""
    return -(-n // self.row_multiple) * self.row_multiple

  def _run(self, rows: list[_Row]) -> None:
    B = self._rows_for(min(self.max_batch, _pow2(len(rows))))
    cache = kv_cache.init_cache(self.cfg, B, self.max_len, self.dtype, self.mesh)
    slot_row = [-1] * B  # the row decoding in each slot
    length = [0] * B  # tokens cached per slot (host copy of cache.length)
    pending = collections.deque(range(len(rows)))
    started, new_tokens = time.perf_counter(), 0
    bar = tqdm(total=len(rows), desc="sampling", unit="completion", disable=not self._show_progress(),
               dynamic_ncols=True)

    def record(row_ids, slots, tokens, logprobs):
      nonlocal new_tokens
      for r, s, t, lp in zip(row_ids, slots, tokens, logprobs):
        row = rows[r]
        row.out.append(int(t))
        row.logprobs.append(float(lp))
        new_tokens += 1
        if int(t) in row.params.stop_token_ids:
          row.finish = "stop"
        elif len(row.out) >= row.params.max_tokens:
          row.finish = "length"
        if row.finish:
          slot_row[s] = -1
          bar.update(1)
      bar.set_postfix_str(f"{new_tokens / max(time.perf_counter() - started, 1e-9):.0f} tok/s", refresh=False)

    try:
      while pending or any(r >= 0 for r in slot_row):
        free = [s for s in range(B) if slot_row[s] < 0]
        if pending and free:
          admit = [pending.popleft() for _ in range(min(len(free), len(pending)))]
          cache = self._admit(cache, rows, admit, free[:len(admit)], slot_row, length, record)
          continue  # rows that ended at once free their slots for the next admission
        active = [s for s in range(B) if slot_row[s] >= 0]
        tokens = np.zeros((B, 1), np.int32)
        n_new = np.zeros(B, np.int32)
        for s in active:
          tokens[s, 0] = rows[slot_row[s]].out[-1]
          n_new[s] = 1
          length[s] += 1
        kv_len = _bucket(max(length[s] for s in active), self.min_kv_len, self.max_len)
        cache, toks, lps = self._decode(self.params, cache, self._put(tokens), self._put(n_new),
                                        self._sampling_arrays(rows, slot_row), kv_len=kv_len)
        toks, lps = np.asarray(toks), np.asarray(lps)
        record([slot_row[s] for s in active], active, toks[active], lps[active])
    finally:
      bar.close()

  def _sampling_arrays(self, rows, row_ids):
    """Per-row temperature, top_p, seed words, copy and step arrays (row id -1: an idle slot, greedy)."""
    R = len(row_ids)
    temp, top_p = np.zeros(R, np.float32), np.ones(R, np.float32)
    seed, copy, step = np.zeros((R, 2), np.uint32), np.zeros(R, np.int32), np.zeros(R, np.int32)
    for j, r in enumerate(row_ids):
      if r < 0:
        continue
      row = rows[r]
      temp[j], top_p[j] = row.params.temperature, row.params.top_p
      s = row.seed % 2 ** 64
      seed[j] = (s >> 32, s & 0xFFFFFFFF)
      copy[j], step[j] = row.copy, len(row.out)
    return tuple(self._put(a) for a in (temp, top_p, seed, copy, step))

  def _admit(self, cache, rows, admit, slots, slot_row, length, record):
    """Prefills the admitted rows' prompts into `slots` and samples their first tokens."""
    B = len(slot_row)
    groups: dict[tuple[int, ...], list[int]] = {}  # prompt tokens -> positions in `admit`
    for j, r in enumerate(admit):
      groups.setdefault(rows[r].tokens, []).append(j)
    uniq = list(groups)
    first_slots = [slots[groups[t][0]] for t in uniq]
    b = min(B, self._rows_for(_pow2(len(uniq))))
    others = [s for s in range(B) if s not in set(first_slots)]
    prefill_slots = first_slots + others[:b - len(uniq)]  # padding rows: distinct slots, nothing written
    lengths = [len(t) for t in uniq]
    C = _bucket(max(lengths), min(32, self.prefill_chunk), self.prefill_chunk)  # one chunk shape for all rounds
    rounds = -(-max(lengths) // C)
    logits = None
    for k in range(rounds):
      # Each prompt's chunks are aligned to its end, so every prompt ends in the last round, whose logits are
      # the first-token logits of all of them.
      spans = [(max(0, n - (rounds - k) * C), max(0, n - (rounds - k - 1) * C)) for n in lengths]
      tokens = np.zeros((b, C), np.int32)
      n_new = np.zeros(b, np.int32)
      for j, (t, (s, e)) in enumerate(zip(uniq, spans)):
        tokens[j, :e - s] = t[s:e]
        n_new[j] = e - s
      reset = np.zeros(b, bool)
      reset[:len(uniq)] = k == 0
      kv_len = _bucket(max(e for _, e in spans), self.min_kv_len, self.max_len)
      logits, cache = self._extend(self.params, cache, self._put(tokens), self._put(n_new), self._put(reset),
                                   self._put(np.asarray(prefill_slots, np.int32)), kv_len=kv_len)
    copies = [(slots[groups[t][0]], slots[j]) for t in uniq for j in groups[t][1:]]
    if copies:
      n = min(B, _pow2(len(copies)))
      dst = {d for _, d in copies}
      pad = [(s, s) for s in range(B) if s not in dst][:n - len(copies)]
      src, dst_list = zip(*(copies + pad))
      cache = self._copy(cache, self._put(np.asarray(src, np.int32)), self._put(np.asarray(dst_list, np.int32)))
    for j, r in enumerate(admit):
      slot_row[slots[j]] = r
      length[slots[j]] = len(rows[r].tokens)
    R = min(B, _pow2(len(admit)))
    src_R = np.zeros(R, np.int32)
    index = {t: u for u, t in enumerate(uniq)}
    for j, r in enumerate(admit):
      src_R[j] = index[rows[r].tokens]
    sel = self._select(logits, self._put(src_R), *self._sampling_arrays(rows, admit + [-1] * (R - len(admit))))
    toks, lps = (np.asarray(a) for a in sel)
    record(admit, slots, toks[:len(admit)], lps[:len(admit)])
    return cache
