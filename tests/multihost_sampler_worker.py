"""One host of the two-process sampler test: joins a 2-process JAX job of 4 CPU devices each, samples on a mesh of
all 8 devices, and writes its completions as JSON.

  python tests/multihost_sampler_worker.py PORT PROCESS_ID OUT.json
"""

import json
import sys

MESH = {"fsdp": 2, "expert": 2, "tensor": 2}
PROMPTS = [[5, 6, 7], list(range(10, 21))]
NEW_TOKENS = 8


def model():
  from helpers import random_params
  from numina_jax.model import tiny_config
  cfg = tiny_config(num_local_experts=4)  # experts split over `expert`
  return cfg, random_params(cfg)


def main(port: str, process_id: str, out: str) -> None:
  import jax
  jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}", num_processes=2, process_id=int(process_id))
  from numina_jax.sampling import JaxSampler, SamplingParams
  from numina_jax.sharding import make_mesh
  assert jax.process_count() == 2 and jax.device_count() == 8 and jax.local_device_count() == 4
  cfg, params = model()
  sampler = JaxSampler(params, cfg, mesh=make_mesh(MESH), max_len=32, max_batch=4, prefill_chunk=16,
                       min_kv_len=32)
  greedy = sampler.generate(PROMPTS, SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS))
  # No seed: each host draws one per prompt, and they must agree on process 0's. One row ends early. (Same shapes
  # as above: nothing new to compile.)
  sampled = sampler.generate(PROMPTS, [SamplingParams(temperature=1.0, max_tokens=NEW_TOKENS),
                                       SamplingParams(temperature=1.0, max_tokens=NEW_TOKENS - 3)])
  with open(out, "w") as f:
    json.dump({"greedy": [c[0].token_ids for c in greedy],
               "sampled": [[c.token_ids for c in cs] for cs in sampled]}, f)


if __name__ == "__main__":
  main(*sys.argv[1:])
