"""Our forward pass against transformers' GptOssForCausalLM on a tiny random model (fp32 and bf16), the router
aux loss, remat policies, packed sequences and padding."""

import copy
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from helpers import TINY_SEQ, hf_logits, token_ids
from numina_jax.model import REMAT_POLICIES, forward
from numina_jax.model.moe import load_balancing_loss

FP32_TOL = 1e-4


def _default_pos_seg(ids, positions, segment_ids):
  # Always passed explicitly, so calls that differ only in these share one compiled function.
  B, T = ids.shape
  positions = np.broadcast_to(np.arange(T), (B, T)) if positions is None else positions
  segment_ids = np.ones((B, T)) if segment_ids is None else segment_ids
  return jnp.asarray(positions, jnp.int32), jnp.asarray(segment_ids, jnp.int32)


@functools.lru_cache(maxsize=None)
def _jit_forward(cfg, **kwargs):
  return jax.jit(lambda p, ids, pos, seg: forward(p, ids, cfg, positions_BT=pos, segment_ids_BT=seg, **kwargs))


def _fwd(cfg, params, ids, positions=None, segment_ids=None, **kwargs):
  pos, seg = _default_pos_seg(ids, positions, segment_ids)
  out = _jit_forward(cfg, **kwargs)(params, jnp.asarray(ids), pos, seg)
  return jax.tree.map(lambda x: np.asarray(x).astype(np.float32), out)


def _token_ce(logits, ids, valid):
  """Next-token cross entropy (fp32), mean over positions whose target is valid."""
  logp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32), axis=-1)
  nll = -jnp.take_along_axis(logp, ids[:, 1:, None], axis=-1)[..., 0]
  w = valid[:, 1:].astype(jnp.float32)
  return jnp.sum(nll * w) / jnp.sum(w)


@functools.lru_cache(maxsize=None)
def _jit_loss_and_grad(cfg, policy):
  """((loss, logits), grads) of the next-token loss over tokens of non-zero segments."""
  def loss(p, ids, pos, seg):
    logits = forward(p, ids, cfg, positions_BT=pos, segment_ids_BT=seg, remat_policy=policy)
    return _token_ce(logits, ids, seg > 0), logits
  return jax.jit(jax.value_and_grad(loss, has_aux=True))


def _loss_and_grad(cfg, params, ids, positions=None, segment_ids=None, policy="none"):
  pos, seg = _default_pos_seg(ids, positions, segment_ids)
  out = _jit_loss_and_grad(cfg, policy)(params, jnp.asarray(ids), pos, seg)
  return jax.tree.map(np.asarray, out)


@pytest.fixture(scope="module")
def hf_ref(tiny_hf):
  model, cfg, params = tiny_hf
  ids = token_ids(cfg.vocab_size)
  return ids, hf_logits(model, ids)


@pytest.mark.parametrize("kernel,tile", [("dense", 64), ("ragged", 64), ("tiled", 64), ("tiled", 3)])
def test_fp32_logits_match_transformers(tiny_hf, hf_ref, kernel, tile):
  _, cfg, params = tiny_hf
  ids, ref = hf_ref
  assert cfg.sliding_window < ids.shape[1]
  out = _fwd(cfg, params, ids, moe_kernel=kernel, moe_tile=tile)
  assert np.abs(ref).max() > 1.0  # a scale at which 1e-4 means something
  np.testing.assert_allclose(out, ref, atol=FP32_TOL, rtol=0)


@pytest.mark.parametrize("attention", ["xla", "dense"])
def test_fp32_long_sequence_matches_transformers(tiny_hf, attention):
  # 300 tokens: sliding layers run five 64-query blocks, full layers the folded triangle of two 150-token
  # blocks (the 23-token tests fit in one block, where the xla path is the dense one).
  model, cfg, params = tiny_hf
  ids = token_ids(cfg.vocab_size, batch=1, seq=300, seed=6)
  out = _fwd(cfg, params, ids, attention=attention)
  np.testing.assert_allclose(out, hf_logits(model, ids), atol=FP32_TOL, rtol=0)


def test_yarn_long_positions_match_transformers(tiny_hf):
  # RoPE sees only position differences, so the rows use strides: row 0 crosses
  # original_max_position_embeddings (64), row 1 spans most of the scaled range (up to 2048).
  model, cfg, params = tiny_hf
  assert cfg.rope_factor > 1
  ids = token_ids(cfg.vocab_size, seed=1)
  T = ids.shape[1]
  positions = np.stack([40 + 2 * np.arange(T), 1500 + 21 * np.arange(T)])
  assert positions.min() < cfg.rope_original_max_position_embeddings < positions.max()
  assert positions.max() < cfg.max_position_embeddings
  ref = hf_logits(model, ids, position_ids=torch.tensor(positions))
  out = _fwd(cfg, params, ids, positions=positions, moe_kernel="tiled")
  np.testing.assert_allclose(out, ref, atol=FP32_TOL, rtol=0)
  # The positions matter: the default 0..T-1 gives different logits.
  assert np.abs(_fwd(cfg, params, ids, moe_kernel="tiled") - ref).max() > 100 * FP32_TOL


def test_bf16_close_to_fp32(tiny_hf, hf_ref):
  # bf16 params and activations against the fp32 reference, ours and transformers'. Measured on this model
  # (logit scale 2.4): max |ours bf16 - fp32| = 0.130, transformers' bf16 - fp32 = 0.132, ours vs transformers'
  # bf16 = 0.053; mean |ours bf16 - fp32| = 0.0041 (transformers' 0.0042); argmax agrees on 96% of positions.
  # The bounds leave 2-3x room for other seeds.
  model, cfg, params = tiny_hf
  ids, ref32 = hf_ref
  p16 = {k: jnp.asarray(v, jnp.bfloat16) for k, v in params.items()}
  ours16 = _fwd(cfg, p16, ids, dtype="bfloat16")
  hf16 = hf_logits(copy.deepcopy(model).to(torch.bfloat16), ids)  # the shared fp32 model stays untouched
  ours_err = np.abs(ours16 - ref32).max()
  hf_err = np.abs(hf16 - ref32).max()
  assert ours_err < 0.3, ours_err
  assert ours_err < 1.5 * hf_err, (ours_err, hf_err)  # no worse than transformers' own bf16 rounding
  assert np.abs(ours16 - hf16).max() < 0.15
  assert np.mean(np.abs(ours16 - ref32)) < 0.012
  assert (np.argmax(ours16, -1) == np.argmax(ref32, -1)).mean() > 0.9


@pytest.mark.parametrize("padded", [False, True])
def test_router_aux_loss_matches_transformers(tiny_hf, padded):
  model, cfg, params = tiny_hf
  ids = token_ids(cfg.vocab_size, seed=2)
  B, T = ids.shape
  mask = np.ones((B, T), np.int64)
  if padded:
    mask[1, 15:] = 0  # right padding in row 1
  labels = np.where(mask == 1, ids, -100)
  with torch.no_grad():
    out = model(torch.tensor(ids), attention_mask=torch.tensor(mask), labels=torch.tensor(labels),
                output_router_logits=True)
  # The tiny model carries the checkpoint's coefficient (0.9), not transformers' class default (0.001).
  assert model.config.router_aux_loss_coef == cfg.router_aux_loss_coef == 0.9
  logits, router = _fwd(cfg, params, ids, segment_ids=mask, return_router_logits=True)  # padding: segment 0
  assert router.shape == (cfg.num_hidden_layers, B * T, cfg.num_local_experts)
  aux = load_balancing_loss(jnp.asarray(router), jnp.asarray(mask.reshape(-1) > 0), cfg.num_experts_per_tok)
  np.testing.assert_allclose(float(aux), float(out.aux_loss), rtol=1e-5)
  # Router logits of real tokens agree layer by layer.
  real = mask.reshape(-1) == 1
  for layer, hf_layer in enumerate(out.router_logits):
    np.testing.assert_allclose(router[layer][real], hf_layer.numpy()[real], atol=FP32_TOL)
  # transformers' loss = CE + coef * aux.
  ce = _token_ce(jnp.asarray(logits), jnp.asarray(ids), jnp.asarray(mask))
  np.testing.assert_allclose(float(ce + cfg.router_aux_loss_coef * aux), float(out.loss), rtol=1e-5)


def test_aux_loss_hand_computed():
  # Two experts, top-1, two layers of three tokens each, the last token padding.
  logits = jnp.asarray([[[2.0, 0.0], [0.0, 1.0], [5.0, -5.0]],
                        [[1.0, 3.0], [0.5, 0.0], [-5.0, 5.0]]])
  valid = jnp.asarray([True, True, False])
  p = np.asarray(jax.nn.softmax(logits[:, :2], axis=-1)).reshape(4, 2)
  # Over the 4 real rows, expert 0 is picked twice (layer 0 token 0, layer 1 token 1), expert 1 twice.
  f = np.array([2, 2]) / 4
  want = 2 * np.sum(f * p.mean(0))
  np.testing.assert_allclose(float(load_balancing_loss(logits, valid, 1)), want, rtol=1e-6)
  # With k = E every expert is always picked: f = 1 and aux = E * sum(P) = E.
  np.testing.assert_allclose(float(load_balancing_loss(logits, valid, 2)), 2.0, rtol=1e-6)


@pytest.fixture(scope="module")
def remat_reference(tiny_hf):
  _, cfg, params = tiny_hf
  ids = token_ids(cfg.vocab_size, seed=3)
  return ids, _loss_and_grad(cfg, params, ids)


@pytest.mark.parametrize("policy", sorted(p for p in REMAT_POLICIES if p != "none"))
def test_remat_policies_same_logits_and_grads(tiny_hf, remat_reference, policy):
  _, cfg, params = tiny_hf
  ids, ((loss0, logits0), grads0) = remat_reference
  (loss, logits), grads = _loss_and_grad(cfg, params, ids, policy=policy)
  # Recomputation runs the same ops on the same values. Measured: logits bit-identical, gradients within 4e-8
  # (fusion order); the bound is 1e-6 relative to each gradient's scale.
  np.testing.assert_allclose(logits, logits0, atol=1e-6, rtol=0)
  np.testing.assert_allclose(loss, loss0, rtol=1e-6)
  assert set(grads) == set(grads0)
  for k, g0 in grads0.items():
    assert np.abs(g0).max() > 0, k
    np.testing.assert_allclose(grads[k], g0, atol=1e-6 * max(1.0, np.abs(g0).max()), rtol=0, err_msg=k)


def test_packed_sequences_match_separate(tiny_hf):
  model, cfg, params = tiny_hf
  n = 11  # each document is longer than the sliding window
  assert cfg.sliding_window < n
  docs = np.random.RandomState(4).randint(0, cfg.vocab_size, (2, n))
  sep = _fwd(cfg, params, docs)
  packed = docs.reshape(1, 2 * n)
  seg = np.repeat([[1, 2]], n, axis=1)
  pos = np.tile(np.arange(n), 2)[None]
  out = _fwd(cfg, params, packed, positions=pos, segment_ids=seg)
  np.testing.assert_allclose(out[0, :n], sep[0], atol=1e-5, rtol=0)
  np.testing.assert_allclose(out[0, n:], sep[1], atol=1e-5, rtol=0)
  np.testing.assert_allclose(out[0, n:], hf_logits(model, docs[1:])[0], atol=FP32_TOL, rtol=0)
  # Without segment ids the second document sees the first: the comparison above can fail.
  unseg = _fwd(cfg, params, packed, positions=pos)
  assert np.abs(unseg[0, n:] - sep[1]).max() > 1e-2


def test_padding_does_not_affect_real_tokens(tiny_hf):
  _, cfg, params = tiny_hf
  rng = np.random.RandomState(5)
  n_real, T = 14, TINY_SEQ
  real = rng.randint(2, cfg.vocab_size // 2, (2, n_real))
  seg = np.concatenate([np.ones((2, n_real)), np.zeros((2, T - n_real))], 1)
  # Two different paddings, drawn from token ids that the real tokens never use.
  pads = [rng.randint(cfg.vocab_size // 2, cfg.vocab_size, (2, T - n_real)) for _ in range(2)]
  results = [_loss_and_grad(cfg, params, np.concatenate([real, pad], 1), segment_ids=seg) for pad in pads]
  ((l0, logits0), g0), ((l1, logits1), g1) = results
  np.testing.assert_array_equal(logits0[:, :n_real], logits1[:, :n_real])
  assert np.abs(logits0[:, n_real:] - logits1[:, n_real:]).max() > 1e-2  # the padding itself did change
  np.testing.assert_array_equal(l0, l1)
  for k in g0:
    np.testing.assert_allclose(g1[k], g0[k], atol=1e-6, rtol=0, err_msg=k)
  # Embedding rows of padding-only tokens get exactly zero gradient; rows of real inputs do not.
  emb = g0["embed"]
  pad_only = sorted(set(pads[0].ravel()) - set(real.ravel()))
  assert pad_only and np.all(emb[pad_only] == 0)
  assert np.all(np.abs(emb[np.unique(real[:, :-1])]).max(axis=1) > 0)
