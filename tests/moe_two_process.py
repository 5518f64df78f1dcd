"""One of two processes (4 CPU devices each) running the MoE under shard_map on one 8-device mesh whose expert axis
spans both processes; checks values and gradients against the dense reference and exits non-zero on a mismatch.

  python tests/moe_two_process.py PROCESS_ID PORT
"""

import os
import sys

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
os.environ["JAX_PLATFORMS"] = "cpu"

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.experimental import multihost_utils  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402

sys.path.insert(0, os.path.dirname(__file__))
from helpers import random_params  # noqa: E402
from numina_jax.model import param_specs, tiny_config  # noqa: E402
from numina_jax.model import moe  # noqa: E402
from numina_jax.sharding import logical_to_spec, make_mesh  # noqa: E402

CFG = tiny_config(vocab_size=64, hidden_size=32, intermediate_size=24, num_hidden_layers=2, num_local_experts=8,
                  num_experts_per_tok=3)


def main(process_id: int, port: int) -> int:
  jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}", num_processes=2, process_id=process_id)
  assert jax.device_count() == 8 and jax.local_device_count() == 4
  mesh = make_mesh({"expert": 4, "tensor": 2})
  along_expert = {d.process_index for d in mesh.devices[0, 0, :, 0]}
  assert along_expert == {0, 1}, f"the expert axis stays inside process {along_expert}"

  p = {k.split("/")[1]: v[0] for k, v in random_params(CFG, seed=21).items() if k.startswith("layers/")}
  p = {k: v for k, v in p.items() if k in moe.EXPERT_PARAMS or k.startswith("router")}
  r = np.random.RandomState(21)
  x = r.normal(size=(8, 12, 32)).astype(np.float32)
  cot = r.normal(size=(8, 12, 32)).astype(np.float32)

  def f(kernel):
    def loss(p, x, cot):
      out = moe.moe(p, x, top_k=3, limit=CFG.swiglu_limit, alpha=CFG.swiglu_alpha, kernel=kernel)[0]
      return jnp.sum(out * cot), out
    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))

  local = jax.local_devices()[0]
  (_, ref_out), ref_grads = f("dense")(*jax.device_put((p, x, cot), local))

  axes = {k.split("/")[1]: s.logical_axes[1:] for k, s in param_specs(CFG).items() if k.startswith("layers/")}

  def global_array(v, logical):
    sharding = NamedSharding(mesh, logical_to_spec(logical, mesh=mesh, shape=v.shape))
    return jax.make_array_from_callback(v.shape, sharding, lambda idx: v[idx])

  sp = {k: global_array(v, axes[k]) for k, v in p.items()}
  sx, scot = (global_array(a, ("batch", "seq", "act_embed")) for a in (x, cot))
  with jax.set_mesh(mesh):
    (_, out), grads = f("tiled")(sp, sx, scot)
  fetch = lambda a: np.asarray(multihost_utils.process_allgather(a, tiled=True))  # noqa: E731
  np.testing.assert_allclose(fetch(out), np.asarray(ref_out), atol=1e-5, rtol=0)
  for name, g in list(grads[0].items()) + [("x", grads[1])]:
    ref = np.asarray(ref_grads[1] if name == "x" else ref_grads[0][name])
    np.testing.assert_allclose(fetch(g), ref, atol=1e-5 * max(1.0, np.abs(ref).max()), rtol=0, err_msg=name)
  print(f"process {process_id}: MoE values and gradients match the dense reference")
  return 0


if __name__ == "__main__":
  sys.exit(main(int(sys.argv[1]), int(sys.argv[2])))
