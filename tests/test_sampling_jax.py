"""The JAX sampler: cached decoding against the full forward pass, greedy tokens against transformers' `generate`,
sampling semantics (seeds, temperature, top_p, n, stop tokens, logprobs), errors, meshes and constructors."""

import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from numina_jax.model import forward
from numina_jax.sampling import JaxSampler, SamplingParams
from numina_jax.sampling.jax_sampler import select_tokens
from numina_jax.sampling.kv_cache import init_cache, extend
from multihost import cpu_env, free_port

MAX_LEN = 64
# Prompt lengths straddle the sliding window (7): shorter, equal, longer, and longer than the prefill chunk (16).
PROMPT_LENS = (3, 7, 11, 20)
NEW_TOKENS = 16  # sequences reach 36 positions: the window wraps around several times


def _prompts(cfg, lens=PROMPT_LENS, seed=0):
  rng = np.random.RandomState(seed)
  return [list(rng.randint(2, cfg.vocab_size, n)) for n in lens]


@pytest.fixture(scope="module")
def model(tiny_hf):
  hf, cfg, params = tiny_hf
  assert hf.config._attn_implementation == "eager"
  assert cfg.sliding_window == 7
  return hf, cfg, {k: jnp.asarray(v) for k, v in params.items()}


@pytest.fixture(scope="module")
def sampler(model):
  """Shared by the tests so they reuse its compiled steps. Four slots: six rows wait for a slot in turn."""
  _, cfg, params = model
  return JaxSampler(params, cfg, max_len=MAX_LEN, max_batch=4, prefill_chunk=16, min_kv_len=MAX_LEN)


@functools.lru_cache(maxsize=None)
def _forward(cfg):
  return jax.jit(lambda p, ids: forward(p, ids, cfg))


def _full_logits(cfg, params, seqs):
  """Forward logits of each sequence (right-padded into one batch: causal, so padding changes nothing before it)."""
  assert len(seqs) <= 4 and max(len(s) for s in seqs) <= MAX_LEN
  ids = np.zeros((4, MAX_LEN), np.int32)  # one shape for every call: one compilation
  for i, s in enumerate(seqs):
    ids[i, :len(s)] = s
  return np.array(_forward(cfg)(params, jnp.asarray(ids)))[:len(seqs)]


# Cached decoding equals the full forward pass ------------------------------------------------------------
def test_cached_extend_equals_full_forward(model):
  _, cfg, params = model
  S, C = 48, 16  # positions used of the cache's 64 (full layers attend to the first 48 only), chunk size
  step = jax.jit(lambda p, c, t, n, r, rows, all_logits: extend(p, c, t, n, r, rows, cfg=cfg, dtype=jnp.float32,
                                                              kv_len=S, all_logits=all_logits),
             static_argnames="all_logits")
  rng = np.random.RandomState(1)
  seqs = [list(rng.randint(2, cfg.vocab_size, S)) for _ in range(3)]
  ref = _full_logits(cfg, params, seqs)
  assert np.abs(ref).max() > 1.0
  pos = [0, 0, 0]  # tokens of each row in the cache
  errs = []

  def chunk(rows, n_new, reset=(False,) * 3):
    """A chunk of up to C tokens on `rows` of the cache (in that order), checked at every new position."""
    tokens = np.zeros((3, C), np.int32)
    for j, (r, n) in enumerate(zip(rows, n_new)):
      tokens[j, :n] = seqs[r][pos[r]:pos[r] + n]
    out, new_cache = step(params, cache, tokens, np.asarray(n_new, np.int32), np.asarray(reset),
                          jnp.asarray(rows, jnp.int32), True)
    out = np.asarray(out)
    for j, (r, n) in enumerate(zip(rows, n_new)):
      errs.extend(np.abs(out[j, :n] - ref[r, pos[r]:pos[r] + n]).ravel())
      pos[r] += n
    return new_cache

  def decode(n_new=(1, 1, 1)):
    """One token on each row with n_new 1 (all rows of the cache, no `rows`), checked at that position."""
    tokens = np.asarray([[seqs[r][min(pos[r], S - 1)]] for r in range(3)], np.int32)
    out, new_cache = step(params, cache, tokens, np.asarray(n_new, np.int32), np.zeros(3, bool), None, False)
    out = np.asarray(out)
    for r in range(3):
      if n_new[r]:
        errs.extend(np.abs(out[r] - ref[r, pos[r]]))
        pos[r] += 1
    return new_cache

  cache = init_cache(cfg, 3, MAX_LEN)
  # Prefill prompts of 12 (> window), 5 and 2 tokens in one padded chunk, the rows in another order than the cache's.
  cache = chunk([1, 0, 2], [12, 5, 2], reset=(True,) * 3)
  # Decode, row 2 idle for the first three steps.
  for i in range(6):
    cache = decode((1, 1, int(i >= 3)))
  # A chunk in the middle (tool output) on rows 2 and 0, 9 and 4 tokens, row 1 idle: 9 > window, so the chunk
  # overwrites ring slots that its own first queries still read.
  cache = chunk([2, 0, 1], [9, 4, 0])
  # Decode the three rows past 40 positions: the ring of 7 slots wraps around several times.
  while max(pos) < 44:
    cache = decode()
  assert min(pos) > 5 * cfg.sliding_window, pos
  assert np.asarray(cache.length).tolist() == pos
  # A used slot restarts with a new sequence (reset) while another row continues with a chunk.
  seqs[1] = list(rng.randint(2, cfg.vocab_size, S))
  ref[1] = _full_logits(cfg, params, seqs)[1]
  pos[1] = 0
  cache = chunk([1, 2, 0], [13, 3, 0], reset=(True, False, False))
  cache = decode()
  assert len(errs) > 100 * cfg.vocab_size
  # Measured: 1.3e-6 at a logit scale of 2.4 (summation order over a shorter key axis).
  assert max(errs) < 2e-5, max(errs)


# Greedy tokens equal transformers' generate ---------------------------------------------------------------
@pytest.fixture(scope="module")
def greedy_run(model, sampler):
  _, cfg, _ = model
  prompts = _prompts(cfg)
  params = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, stop_token_ids=(cfg.eos_token_id,),
                          logprobs=True)
  return prompts, sampler.generate(prompts, params)


def test_greedy_equals_transformers_generate(model, greedy_run):
  hf, cfg, _ = model
  prompts, out = greedy_run
  assert [len(c) for c in out] == [1] * len(prompts)
  for prompt, (comp,) in zip(prompts, out):
    with torch.no_grad():
      gen = hf.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=NEW_TOKENS, output_logits=True,
                        return_dict_in_generate=True, eos_token_id=cfg.eos_token_id, pad_token_id=0)
    want = gen.sequences[0, len(prompt):].tolist()
    assert comp.token_ids == want
    assert comp.finish_reason == ("stop" if want[-1] == cfg.eos_token_id else "length")
    # Raw-model log-probabilities of the chosen tokens.
    hf_lp = [torch.log_softmax(lg[0].float(), -1)[t].item() for lg, t in zip(gen.logits, want)]
    np.testing.assert_allclose(comp.logprobs, hf_lp, atol=1e-4, rtol=0)
  assert max(len(p) for p in prompts) + NEW_TOKENS > 5 * cfg.sliding_window


# Sampling ---------------------------------------------------------------------------------------------------
def test_sampling_seeds_copies_and_top_p(model, sampler, greedy_run):
  _, cfg, params = model
  prompts, greedy = greedy_run
  p0, p1 = prompts[1], prompts[2]
  hot = SamplingParams(temperature=1.0, max_tokens=12, seed=7, n=3, logprobs=True)
  a = sampler.generate([p0, p1], hot)
  b = sampler.generate([p0, p1], hot)
  assert [[c.token_ids for c in cs] for cs in a] == [[c.token_ids for c in cs] for cs in b]
  assert [len(cs) for cs in a] == [3, 3]
  copies = [c.token_ids for c in a[0]]
  assert len({tuple(t) for t in copies}) == 3, copies  # n copies are independent samples
  assert a[0][0].token_ids != greedy[1][0].token_ids[:12]
  # Another seed; and top_p so small that only the most likely token survives: greedy, at any temperature.
  other, nucleus = sampler.generate([p0, p0], [SamplingParams(temperature=1.0, max_tokens=12, seed=8),
                                               SamplingParams(temperature=2.0, top_p=1e-6, max_tokens=12, seed=3)])
  assert other[0].token_ids != a[0][0].token_ids
  assert nucleus[0].token_ids == greedy[1][0].token_ids[:12]
  # A prompt's samples do not depend on the other prompts in the call (alone, or after another prompt).
  alone = sampler.generate([p1], hot)
  mixed = sampler.generate([prompts[0], p1], [SamplingParams(temperature=0.5, max_tokens=5), hot])
  assert [c.token_ids for c in alone[0]] == [c.token_ids for c in a[1]] == [c.token_ids for c in mixed[1]]

  # Logprobs are the raw model's: log-softmax of the full forward pass at the sampled tokens.
  seqs = [p0 + c.token_ids for c in a[0]]
  ref = _full_logits(cfg, params, seqs)
  for seq, comp, lg in zip(seqs, a[0], ref):
    lp = jax.nn.log_softmax(lg[len(p0) - 1:len(seq) - 1], -1)
    want = np.take_along_axis(np.asarray(lp), np.asarray(comp.token_ids)[:, None], -1)[:, 0]
    np.testing.assert_allclose(comp.logprobs, want, atol=1e-5, rtol=0)
  assert other[0].logprobs is None


def test_stop_tokens_and_finish_reasons(model, sampler, greedy_run):
  _, cfg, _ = model
  prompts, greedy = greedy_run
  full = greedy[3][0].token_ids
  stop = full[5]
  first = full.index(stop)
  out = sampler.generate([prompts[3], prompts[0]], [
      SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, stop_token_ids=(stop, cfg.vocab_size - 1)),
      SamplingParams(temperature=0.0, max_tokens=4)])
  (c,), (d,) = out
  assert c.token_ids == full[:first + 1] and c.finish_reason == "stop" and c.stop_token_id == stop
  assert d.token_ids == greedy[0][0].token_ids[:4] and d.finish_reason == "length" and d.stop_token_id is None
  # A stop token sampled as the very first token ends the row at once; max_tokens=1 too.
  e = sampler.generate([prompts[3]] * 2, [SamplingParams(temperature=0.0, max_tokens=5, stop_token_ids=(full[0],)),
                                          SamplingParams(temperature=0.0, max_tokens=1)])
  assert [e[0][0].token_ids, e[0][0].finish_reason] == [[full[0]], "stop"]
  assert [e[1][0].token_ids, e[1][0].finish_reason] == [[full[0]], "length"]


def test_select_tokens_distribution():
  # One row of 5 logits drawn 4000 times (4000 copies): frequencies follow softmax(logits / T), and top_p keeps
  # exactly the nucleus.
  logits = jnp.asarray([[2.0, 1.0, 0.5, 0.0, -1.0]])
  R = 4000
  fn = jax.jit(select_tokens)

  def draw(temperature, top_p):
    tok, lp = fn(logits, jnp.zeros(R, jnp.int32), jnp.full(R, temperature), jnp.full(R, top_p),
                 jnp.zeros((R, 2), jnp.uint32), jnp.arange(R), jnp.zeros(R, jnp.int32))
    return np.bincount(np.asarray(tok), minlength=5) / R, np.asarray(lp), np.asarray(tok)

  freq, lp, tok = draw(0.5, 1.0)
  want = np.asarray(jax.nn.softmax(logits[0] / 0.5))
  np.testing.assert_allclose(freq, want, atol=0.03)
  np.testing.assert_allclose(lp, np.asarray(jax.nn.log_softmax(logits[0]))[tok], rtol=1e-6)  # raw, not scaled
  # top_p 0.7 at T=1: probabilities are .61, .22, .14, ...; the mass before token 1 is .61 < .7, before token 2 it
  # is .83: the nucleus is {0, 1}, renormalised.
  p = np.asarray(jax.nn.softmax(logits[0]))
  freq, _, _ = draw(1.0, 0.7)
  np.testing.assert_allclose(freq, [p[0] / p[:2].sum(), p[1] / p[:2].sum(), 0, 0, 0], atol=0.03)
  assert freq[2:].sum() == 0
  freq, _, _ = draw(0.0, 1.0)
  assert freq[0] == 1.0


def test_errors_name_the_prompt(model, sampler):
  _, cfg, _ = model
  ok = [5, 6, 7]
  with pytest.raises(ValueError, match=r"prompt 1: 60 prompt tokens \+ max_tokens 5 = 65 exceeds .* max_len 64"):
    sampler.generate([ok, [3] * 60], SamplingParams(max_tokens=5))
  with pytest.raises(ValueError, match="prompt 1 is empty"):
    sampler.generate([ok, []], SamplingParams(max_tokens=5))
  with pytest.raises(ValueError, match=r"prompt 0: token 301 at position 2 is outside the vocabulary \[0, 301\)"):
    sampler.generate([[3, 4, 301]], SamplingParams(max_tokens=5))
  with pytest.raises(TypeError, match="params for prompt 1 is a dict, not SamplingParams"):
    sampler.generate([ok, ok], [SamplingParams(), {"max_tokens": 5}])
  with pytest.raises(ValueError, match="got 1 SamplingParams for 2 prompts"):
    sampler.generate([ok, ok], [SamplingParams()])
  with pytest.raises(ValueError, match="prompt 0: stop token 999"):
    sampler.generate([ok], SamplingParams(stop_token_ids=(999,), max_tokens=5))
  with pytest.raises(ValueError, match="max_len 5000 exceeds the model's max_position_embeddings"):
    JaxSampler(model[2], cfg, max_len=5000)
  with pytest.raises(ValueError, match="unknown moe_kernel 'fast'"):
    JaxSampler(model[2], cfg, max_len=64, moe_kernel="fast")
  with pytest.raises(ValueError, match="max_batch must be an integer >= 1, got 0"):
    JaxSampler(model[2], cfg, max_len=64, max_batch=0)
  assert sampler.generate([], SamplingParams()) == []


# On a mesh ------------------------------------------------------------------------------------------------
def test_mesh_greedy_equals_one_device(tiny_hf, model, greedy_run):
  # fsdp shards the weights' hidden axis, expert the experts, tensor the heads, kv heads and vocab; the rows of
  # the batch and cache go over fsdp x expert.
  shape = {"fsdp": 2, "expert": 2, "tensor": 2}
  from numina_jax.model import param_specs
  from numina_jax.sharding import make_mesh, param_shardings
  _, cfg, _ = model
  params = tiny_hf[2]  # host arrays: placed straight into their shardings
  prompts, want = greedy_run
  mesh = make_mesh(shape)
  s = JaxSampler(params, cfg, mesh=mesh, max_len=MAX_LEN, max_batch=4, prefill_chunk=32, min_kv_len=MAX_LEN)
  want_shardings = param_shardings(param_specs(cfg), mesh)
  assert all(s.params[k].sharding.spec == want_shardings[k].spec for k in params)
  assert s.params["layers/q_w"].sharding.spec[1:3] == ("fsdp", "tensor")
  assert s.params["layers/gate_w"].sharding.spec[1] == "expert"
  out = s.generate(prompts, SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS,
                                           stop_token_ids=(cfg.eos_token_id,)))
  assert [c[0].token_ids for c in out] == [c[0].token_ids for c in want[:len(prompts)]]


@pytest.mark.slow
def test_two_hosts_agree(tmp_path):
  # Two processes of 4 CPU devices each form one 8-device job (as two hosts of a slice); each runs the host loop
  # on its own, so their stop decisions and drawn seeds must agree.
  import os
  import subprocess
  import sys
  import multihost_sampler_worker as worker
  port = free_port()
  here = os.path.dirname(os.path.abspath(__file__))
  env = cpu_env(4)
  env["PYTHONPATH"] = os.pathsep.join([here, env["PYTHONPATH"]])
  procs = [subprocess.Popen([sys.executable, worker.__file__, str(port), str(i), str(tmp_path / f"{i}.json")],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in range(2)]
  try:
    logs = [p.communicate(timeout=600)[0] for p in procs]
  finally:
    for p in procs:
      p.kill()
  assert all(p.returncode == 0 for p in procs), "\n".join(log[-3000:] for log in logs)
  a, b = (json.loads((tmp_path / f"{i}.json").read_text()) for i in range(2))
  assert a == b
  assert [len(cs[0]) for cs in a["sampled"]] == [worker.NEW_TOKENS, worker.NEW_TOKENS - 3]
  assert a["sampled"][0][0] != a["greedy"][0]
  # Greedy tokens are the argmax of the full forward pass at each position.
  cfg, params = worker.model()
  seqs = [p + t for p, t in zip(worker.PROMPTS, a["greedy"])]
  ids = jnp.asarray([s + [0] * (max(map(len, seqs)) - len(s)) for s in seqs])
  logits = np.asarray(jax.jit(lambda p, x: forward(p, x, cfg))(params, ids))
  for prompt, seq, lg in zip(worker.PROMPTS, seqs, logits):
    assert seq[len(prompt):] == np.argmax(lg[len(prompt) - 1:len(seq) - 1], -1).tolist()


# Constructors ---------------------------------------------------------------------------------------------
def test_from_checkpoint_and_from_hf(model, tmp_path):
  from numina_jax.checkpoint import save_params
  hf, cfg, params = model
  save_params(str(tmp_path / "ckpt"), params, cfg, step=3)
  s = JaxSampler.from_checkpoint(str(tmp_path / "ckpt"), max_len=MAX_LEN)
  assert s.cfg == cfg and s.dtype == jnp.float32
  for k, v in params.items():
    np.testing.assert_array_equal(np.asarray(s.params[k]), np.asarray(v), err_msg=k)
  hf.save_pretrained(tmp_path / "hf")
  s = JaxSampler.from_hf(str(tmp_path / "hf"), dtype="float32", max_len=MAX_LEN)
  assert s.cfg == cfg
  for k, v in params.items():
    np.testing.assert_array_equal(np.asarray(s.params[k]), np.asarray(v), err_msg=k)
