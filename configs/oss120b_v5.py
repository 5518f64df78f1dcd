"""gpt-oss-120b, NuminaMath recipe on a TPU v5p slice.

  python -m numina_jax.train --config configs/oss120b_v5.py        # stage 1: CoT (NuminaMath-CoT, 3 epochs)
  python -m numina_jax.train --config configs/oss120b_v5.py:tir    # stage 2: TIR, from stage 1's best checkpoint

Sized for v5p-128 (64 chips, 95 GiB HBM each): fp32 master weights and AdamW moments of 116.8B parameters take
~1.4 TB, sharded over fsdp x expert x tensor = 64 chips. `python -m numina_jax.plan --config configs/oss120b_v5.py
--topology v5p:4x4x4` compiles this step for that slice: 23.1 GiB of state and a 51.7 GiB peak per chip (MoE under
shard_map: each chip's grouped matmuls see its 65,536-row dropless receive buffer, not the global 262,144 rows).
"""

import os

from numina_jax.config import base_config

# launch/tpu_vm.sh sets NUMINA_BUCKET on every worker from BUCKET in launch/slice.env.
BUCKET = os.environ.get("NUMINA_BUCKET", "YOUR_BUCKET")
STAGE1_WORKDIR = f"gs://{BUCKET}/numina_jax/oss120b/stage1_cot"


def get_config(stage: str = "cot"):
  c = base_config()
  c.lr = 2e-5  # recipe
  c.global_batch_size = 32  # recipe: 32 packed sequences per step
  c.microbatch_size = 0  # one sequence per chip across the 32 batch shards; no accumulation
  c.remat_policy = "full"
  c.log_every_steps = 10
  c.checkpoint_every_steps = 500
  c.checkpoint_every_secs = 3600  # spot capacity: lose at most an hour
  c.eval_every_steps = 1000
  c.export_hf = True

  c.model.hf_path = "openai/gpt-oss-120b"  # MXFP4 experts are dequantized on load
  c.model.param_dtype = "float32"
  c.model.dtype = "bfloat16"
  c.model.moe_kernel = "auto"  # megablox gmm on TPU, under shard_map with expert-parallel dispatch
  c.model.loss_chunk = 512

  c.data.tokenizer = "openai/gpt-oss-120b"
  c.data.dataset_name = "AI-MO/NuminaMath-CoT"

  c.mesh.data = 1
  c.mesh.fsdp = 4
  c.mesh.expert = 8
  c.mesh.tensor = 2

  c.multihost = True  # v5p-128 has 16 hosts

  if stage == "cot":
    c.stage = "cot"
    c.seq_len = 2048  # recipe
    c.num_epochs = 3  # recipe
    c.warmup_ratio = 0.0  # recipe (stage 1 configs)
    c.workdir = STAGE1_WORKDIR
  elif stage == "tir":
    c.stage = "tir"
    c.seq_len = 1024  # recipe
    c.num_epochs = 4  # recipe
    c.warmup_ratio = 0.1  # recipe
    c.data.dataset_name = "AI-MO/NuminaMath-TIR"
    c.model.hf_path = ""
    c.model.init_checkpoint = STAGE1_WORKDIR + "/checkpoints"  # best stage-1 checkpoint by eval loss
    c.workdir = f"gs://{BUCKET}/numina_jax/oss120b/stage2_tir"
  else:
    raise ValueError(f"configs/oss120b_v5.py: unknown stage {stage!r}; use :cot or :tir")
  return c
