"""The train step: golden values held to transformers, learning, microbatching, packing invariance, and sharded ==
one device."""

import dataclasses

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from helpers import hf_model_from_params
from numina_jax.model import tiny_config
from numina_jax.model.params import init_params, param_specs
from numina_jax.optim import decay_mask, learning_rate_schedule, make_optimizer
from numina_jax.sharding import make_mesh, opt_state_shardings, param_shardings
from numina_jax.step import StepConfig, batch_shardings, jit_train_step, train_step

CFG = tiny_config(vocab_size=96, hidden_size=32, intermediate_size=24, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=8, num_local_experts=4, num_experts_per_tok=2,
                  sliding_window=5)


def _make_optim(lr, total):
  c = ml_collections.ConfigDict()
  c.lr, c.warmup_ratio = lr, 0.1
  c.optim = ml_collections.ConfigDict(dict(b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.01, clip_norm=1.0,
                                           schedule="cosine", final_lr_ratio=0.0))
  return make_optimizer(c, total)


def make_batch(rows=8, T=16, seed=0, packed=True):
  """Learnable rows (arithmetic progressions mod vocab), two documents per row when packed."""
  r = np.random.RandomState(seed)
  start = r.randint(2, 60, (rows, 1))
  stride = r.randint(1, 4, (rows, 1))
  ids = (start + stride * np.arange(T + 1)[None]) % CFG.vocab_size
  seg = np.ones((rows, T), np.int32)
  pos = np.broadcast_to(np.arange(T), (rows, T)).copy()
  mask = np.ones((rows, T), np.float32)
  mask[:, :2] = 0  # a prompt that carries no loss
  if packed:
    h = T // 2
    seg[:, h:] = 2
    pos[:, h:] -= h
    mask[:, h - 1] = 0  # the last token of a document predicts nothing
  mask[:, -1] = 0
  return {"input_ids": jnp.asarray(ids[:, :-1], jnp.int32), "targets": jnp.asarray(ids[:, 1:], jnp.int32),
          "loss_mask": jnp.asarray(mask), "segment_ids": jnp.asarray(seg), "positions": jnp.asarray(pos, jnp.int32)}


def new_state(tx, seed=0, mesh=None):
  mesh = mesh or make_mesh({"fsdp": 1}, jax.devices()[:1])
  params = init_params(CFG, jax.random.key(seed), jnp.float32, param_shardings(param_specs(CFG), mesh))
  return {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": tx.init(params)}


def sc(**kw):
  base = dict(model=CFG, dtype=jnp.float32, remat_policy="none", moe_kernel="tiled", moe_tile=8, loss_chunk=0)
  base.update(kw)
  return StepConfig(**base)


_JITTED = {}


def jitted_step(tx, sched, **kw):
  key = (id(tx), tuple(sorted(kw.items())))
  if key not in _JITTED:
    _JITTED[key] = jax.jit(lambda s, b: train_step(s, b, sc=sc(**kw), tx=tx, schedule=sched))
  return _JITTED[key]


_OPT = {}


def optim_cfg(lr=1e-2, total=50):
  if (lr, total) not in _OPT:
    _OPT[(lr, total)] = _make_optim(lr, total)
  return _OPT[(lr, total)]


def run(state, batch, tx, sched, steps=1, **kw):
  fn = jitted_step(tx, sched, **kw)
  ms = []
  for _ in range(steps):
    state, m = fn(state, batch)
    ms.append(jax.device_get(m))
  return state, ms


def close_trees(a, b, atol):
  for k in a:
    np.testing.assert_allclose(np.asarray(a[k]), np.asarray(b[k]), atol=atol, rtol=0, err_msg=k)


def test_one_step_golden_values():
  tx, sched = optim_cfg()
  state, ms = run(new_state(tx), make_batch(), tx, sched)
  # Golden values of this exact config, seed and batch (fp32, CPU). A change here means the maths changed.
  np.testing.assert_allclose(ms[0]["loss"], GOLDEN_LOSS, rtol=2e-5)
  np.testing.assert_allclose(ms[0]["grad_norm"], GOLDEN_GRAD_NORM, rtol=2e-4)
  np.testing.assert_allclose(ms[0]["lr"], 1e-2 / 5, rtol=1e-6)  # warmup step 0 of 5
  assert int(ms[0]["loss_tokens"]) == 8 * (16 - 4)
  # At init the loss is close to uniform over the vocabulary.
  assert abs(ms[0]["loss"] - np.log(CFG.vocab_size)) < 0.5


GOLDEN_LOSS = 4.557661533355713
GOLDEN_GRAD_NORM = 1.87978994846344


def transformers_loss_and_grad_norm(params, batch, cfg, aux_coef):
  """The step's loss and gradient norm by transformers' GptOssForCausalLM (fp32, CPU) holding `params`: its own
  causal-LM loss (the mean over the loss-masked targets) plus `aux_coef` times its load-balancing loss over every
  token, and the L2 norm of every parameter's gradient.

  transformers' gpt-oss cannot read packed rows (it builds its masks without the position ids, so a document would
  attend to the one before it), so each packed document goes in as a sequence of its own: the same tokens, targets,
  loss mask and token count, which is what packing must be equivalent to."""
  import torch
  model = hf_model_from_params(params, dataclasses.replace(cfg, router_aux_loss_coef=aux_coef))
  ids, targets, seg, pos = (np.asarray(batch[k]) for k in ("input_ids", "targets", "segment_ids", "positions"))
  mask = np.asarray(batch["loss_mask"]) > 0
  docs, labels = [], []
  for r in range(ids.shape[0]):
    for s in np.unique(seg[r][seg[r] > 0]):
      (at,) = np.nonzero(seg[r] == s)
      assert (pos[r, at] == np.arange(len(at))).all() and not mask[r, at[-1]]  # the last token predicts nothing
      docs.append(ids[r, at])
      # transformers shifts the labels: labels[t + 1] is the target of position t; -100 carries no loss.
      labels.append(np.concatenate([[-100], np.where(mask[r, at], targets[r, at], -100)[:-1]]))
  assert len(docs) == 2 * ids.shape[0] and sum((lab >= 0).sum() for lab in labels) == mask.sum()
  out = model(torch.as_tensor(np.stack(docs), dtype=torch.long), labels=torch.as_tensor(np.stack(labels)),
              output_router_logits=aux_coef > 0)
  out.loss.backward()
  assert all(p.grad is not None for p in model.parameters())
  grad_norm = torch.sqrt(sum((p.grad.double() ** 2).sum() for p in model.parameters()))
  return out.loss.item(), grad_norm.item()


@pytest.mark.parametrize("aux_coef", [0.0, 0.01], ids=["golden", "aux_loss"])
def test_one_step_matches_transformers(aux_coef):
  """The golden step (and the same step with the demo config's load-balancing coefficient) against an independent
  computation in torch on the same initial weights and the same documents."""
  tx, sched = optim_cfg()
  state, batch = new_state(tx), make_batch()
  params = jax.device_get(state["params"])
  _, ms = run(state, batch, tx, sched, **({"aux_coef": aux_coef} if aux_coef else {}))
  loss, grad_norm = transformers_loss_and_grad_norm(params, batch, CFG, aux_coef)
  # Measured: both agree to 2.4e-7 relative (fp32 summation order). Letting a document see the one packed before
  # it moves the loss by 1e-4.
  np.testing.assert_allclose(ms[0]["loss"], loss, rtol=2e-6)
  np.testing.assert_allclose(ms[0]["grad_norm"], grad_norm, rtol=2e-6)
  if aux_coef == 0:
    np.testing.assert_allclose([GOLDEN_LOSS, GOLDEN_GRAD_NORM], [loss, grad_norm], rtol=2e-6)
  else:
    assert ms[0]["aux_loss"] > 0 and abs(ms[0]["loss"] - GOLDEN_LOSS) > 1e-3  # the aux term is in both losses


def test_loss_falls():
  tx, sched = optim_cfg(lr=1e-2, total=40)
  state = new_state(tx)
  losses = []
  fn = jitted_step(tx, sched)
  for i in range(40):
    state, m = fn(state, make_batch(seed=i % 4))
    losses.append(float(m["loss"]))
  assert np.mean(losses[-5:]) < 0.6 * np.mean(losses[:5]), losses


def test_microbatches_equal_one_batch():
  tx, sched = optim_cfg()
  batch = make_batch(rows=32, seed=3)
  a, ma = run(new_state(tx), batch, tx, sched, steps=2)
  b, mb = run(new_state(tx), batch, tx, sched, steps=2, num_microbatches=4)
  for x, y in zip(ma, mb):
    np.testing.assert_allclose(x["loss"], y["loss"], rtol=1e-5)
    np.testing.assert_allclose(x["grad_norm"], y["grad_norm"], rtol=1e-4)
  # Adam divides by sqrt(v): float reassociation in the accumulated gradient moves a parameter by up to ~1%
  # of a step (2e-3) where its gradient is near zero; losses and gradient norms above agree tightly.
  close_trees(a["params"], b["params"], atol=1e-4)


def test_loss_is_mean_over_loss_tokens_whatever_the_packing():
  """The same documents packed two per row, or one per row with padding, give the same loss and gradient."""
  tx, sched = optim_cfg()
  packed = make_batch(rows=4, T=16, packed=True)
  h = 8
  unpacked = {}
  for k, v in packed.items():
    v = np.asarray(v)
    first, second = v[:, :h], v[:, h:]
    pad = np.zeros_like(first)
    rows = np.concatenate([np.concatenate([first, pad], 1), np.concatenate([second, pad], 1)], 0)
    unpacked[k] = jnp.asarray(rows)
  unpacked["segment_ids"] = jnp.asarray(np.concatenate(
      [np.concatenate([np.ones((8, h)), np.zeros((8, h))], 1)], 0).astype(np.int32))
  _, ma = run(new_state(tx), packed, tx, sched)
  _, mb = run(new_state(tx), unpacked, tx, sched)
  assert ma[0]["loss_tokens"] == mb[0]["loss_tokens"]
  np.testing.assert_allclose(ma[0]["loss"], mb[0]["loss"], rtol=1e-5)
  np.testing.assert_allclose(ma[0]["grad_norm"], mb[0]["grad_norm"], rtol=1e-4)


@pytest.mark.parametrize("mesh_shape", [{"fsdp": 8}, {"fsdp": 4, "tensor": 2}, {"expert": 4, "fsdp": 2},
                                        {"data": 2, "expert": 2, "tensor": 2}])
def test_sharded_step_equals_one_device(mesh_shape):
  if jax.device_count() < 8:
    pytest.skip("needs 8 devices (XLA_FLAGS=--xla_force_host_platform_device_count=8 before importing jax)")
  tx, sched = optim_cfg()
  batch = make_batch(rows=8, seed=5)
  ref, mref = run(new_state(tx), batch, tx, sched, steps=2)

  mesh = make_mesh(mesh_shape)
  specs = param_specs(CFG)
  p_shard = param_shardings(specs, mesh)
  params_abs = {k: jax.ShapeDtypeStruct(s.shape, jnp.float32) for k, s in specs.items()}
  o_shard = opt_state_shardings(tx, params_abs, p_shard, mesh)
  rep = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  state_shard = {"step": rep, "params": p_shard, "opt_state": o_shard}
  with jax.set_mesh(mesh):
    params = init_params(CFG, jax.random.key(0), jnp.float32, p_shard)
    state = {"step": jax.device_put(jnp.zeros((), jnp.int32), rep), "params": params,
             "opt_state": jax.jit(tx.init, out_shardings=o_shard)(params)}
    assert any(len(p.sharding.device_set) > 1 and p.sharding.spec != jax.sharding.PartitionSpec()
               for p in params.values() if hasattr(p.sharding, "spec")), "nothing was sharded"
    step = jit_train_step(sc(), tx, sched, state_shard, mesh)
    gb = jax.device_put(batch, batch_shardings(mesh))
    ms = []
    for _ in range(2):
      state, m = step(state, gb)
      ms.append(jax.device_get(m))
  for x, y in zip(mref, ms):
    np.testing.assert_allclose(x["loss"], y["loss"], rtol=2e-5)
    np.testing.assert_allclose(x["grad_norm"], y["grad_norm"], rtol=2e-4)
  # Adam (eps 1e-8) turns float reassociation in a near-zero gradient into up to ~1% of a step (2e-3).
  close_trees(ref["params"], jax.device_get(state["params"]), atol=1e-4)


def test_no_weight_decay_on_norms_biases_sinks():
  mask = decay_mask({k: None for k in param_specs(CFG)})
  assert {k for k, v in mask.items() if v} == {"embed", "lm_head", "layers/q_w", "layers/k_w", "layers/v_w",
                                               "layers/o_w", "layers/router_w", "layers/gate_w", "layers/up_w",
                                               "layers/down_w"}


def test_schedule_warmup_then_cosine():
  s = learning_rate_schedule(1.0, total_steps=100, warmup_ratio=0.1, final_lr_ratio=0.1)
  assert float(s(0)) == pytest.approx(0.1)
  assert float(s(9)) == pytest.approx(1.0)
  assert float(s(10)) == pytest.approx(1.0)
  assert float(s(55)) == pytest.approx(0.1 + 0.9 * 0.5, rel=1e-4)  # halfway through the cosine
  assert float(s(100)) == pytest.approx(0.1, rel=1e-4)


def test_remat_and_loss_chunking_do_not_change_the_step():
  tx, sched = optim_cfg()
  batch = make_batch()
  a, ma = run(new_state(tx), batch, tx, sched)
  b, mb = run(new_state(tx), batch, tx, sched, remat_policy="full", loss_chunk=4)
  np.testing.assert_allclose(ma[0]["loss"], mb[0]["loss"], rtol=1e-6)
  close_trees(a["params"], b["params"], atol=1e-4)  # Adam near-zero gradients, as above


def test_a_loss_chunk_that_does_not_divide_the_sequence_is_an_error():
  from numina_jax.loss import lm_head_ce
  h, w = jnp.ones((1, 6, 4)), jnp.ones((4, 8))
  t, m = jnp.zeros((1, 6), jnp.int32), jnp.ones((1, 6))
  with pytest.raises(ValueError, match="loss_chunk 4 does not divide the sequence length 6"):
    lm_head_ce(h, w, t, m, chunk=4, dtype=jnp.float32)
  whole = lm_head_ce(h, w, t, m, chunk=0, dtype=jnp.float32)
  np.testing.assert_allclose(lm_head_ce(h, w, t, m, chunk=3, dtype=jnp.float32), whole, rtol=1e-6)
  np.testing.assert_allclose(whole[0], 6 * np.log(8), rtol=1e-6)  # uniform logits: log V per token
