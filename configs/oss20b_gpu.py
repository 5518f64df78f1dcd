"""gpt-oss-20b on CUDA GPUs (one 8-GPU H100/H200 node), NuminaMath recipe.

  python -m numina_jax.train --config configs/oss20b_gpu.py        # stage 1: CoT
  python -m numina_jax.train --config configs/oss20b_gpu.py:tir    # stage 2: TIR

20.9B parameters with fp32 master weights and AdamW moments take ~250 GB, sharded over 8 GPUs (~31 GB each).
"""

from numina_jax.config import base_config

STAGE1_WORKDIR = "runs/oss20b/stage1_cot"


def get_config(stage: str = "cot"):
  c = base_config()
  c.lr = 2e-5
  c.global_batch_size = 32
  c.microbatch_size = 8  # 4 accumulation steps, one sequence per GPU each
  c.remat_policy = "full"
  c.checkpoint_every_steps = 500
  c.eval_every_steps = 1000
  c.export_hf = True

  c.model.hf_path = "openai/gpt-oss-20b"
  c.model.dtype = "bfloat16"
  c.model.moe_kernel = "ragged"

  c.data.tokenizer = "openai/gpt-oss-20b"
  c.data.dataset_name = "AI-MO/NuminaMath-CoT"

  c.mesh.fsdp = 8
  c.mesh.expert = 1
  c.mesh.tensor = 1

  if stage == "cot":
    c.seq_len = 2048
    c.num_epochs = 3
    c.workdir = STAGE1_WORKDIR
  elif stage == "tir":
    c.stage = "tir"
    c.seq_len = 1024
    c.num_epochs = 4
    c.warmup_ratio = 0.1
    c.data.dataset_name = "AI-MO/NuminaMath-TIR"
    c.model.hf_path = ""
    c.model.init_checkpoint = STAGE1_WORKDIR + "/checkpoints"
    c.workdir = "runs/oss20b/stage2_tir"
  else:
    raise ValueError(f"configs/oss20b_gpu.py: unknown stage {stage!r}; use :cot or :tir")
  return c
