"""The embedded default: a tiny gpt-oss-architecture model trained on CPU, both recipe stages, on the
NuminaMath-format sample data the project ships (configs/default.py; `python -m numina_jax.train`).

  python -m numina_jax.train                                  # CoT, then TIR (next_stage): runs/demo/stage{1,2}_*
  python -m numina_jax.train --config configs/default.py:tir  # TIR alone, from runs/demo/stage1_cot's checkpoints
"""

from numina_jax.config import base_config

WORKDIR = "runs/demo"


def get_config(stage: str = "cot"):
  c = base_config()
  c.global_batch_size = 8  # sequences per step
  c.seq_len = 512  # packed block length
  c.workdir = WORKDIR  # a chain writes stage 1 to runs/demo/stage1_cot, stage 2 to runs/demo/stage2_tir
  c.log_every_steps = 5  # log often: the run is short
  c.checkpoint_every_steps = 50  # checkpoint a few times
  c.checkpoint_every_secs = 0  # step schedule only
  c.eval_every_steps = 25  # eval loss on the held-out split (also at the end)
  c.remat_policy = "none"  # tiny activations: no recomputation needed
  c.export_hf = True  # write a Hugging Face checkpoint at the end (of the last stage of a chain)

  c.model.hidden_size = 128  # tiny preset
  c.model.intermediate_size = 96
  c.model.num_hidden_layers = 2
  c.model.num_attention_heads = 4
  c.model.num_key_value_heads = 2
  c.model.head_dim = 32
  c.model.num_local_experts = 4
  c.model.num_experts_per_tok = 2
  c.model.sliding_window = 128
  c.model.dtype = "float32"  # XLA's CPU backend is faster in fp32 than bf16
  c.model.load_balancing_loss_coef = 0.01  # keep the tiny router balanced

  c.data.tokenizer = "demo"  # the project's small tokenizer with the harmony special tokens

  c.optim.weight_decay = 0.01
  c.optim.final_lr_ratio = 0.1

  c.checkpoint.max_to_keep = 2

  if stage == "cot":
    c.stage = "cot"
    c.next_stage = "tir"  # then stage 2 (TIR) from this stage's best checkpoint
    c.lr = 3e-3  # a tiny randomly initialised model learns fast
    c.warmup_ratio = 0.05  # short warmup
    c.max_steps = 100
    c.data.dataset_name = "sample:cot"  # shipped NuminaMath-CoT-format sample
  elif stage == "tir":
    c.stage = "tir"
    c.lr = 2e-3
    c.warmup_ratio = 0.1
    c.max_steps = 50
    c.data.dataset_name = "sample:tir"  # shipped NuminaMath-TIR-format sample
    c.model.init_checkpoint = f"{WORKDIR}/stage1_cot/checkpoints"  # alone; a chain sets it to stage 1's
    c.workdir = f"{WORKDIR}/stage2_tir"
    c.sctir.at_end = True  # then SC-TIR on the held-out sample problems, with sandboxed python: the table
  else:
    raise ValueError(f"configs/default.py: unknown stage {stage!r}; use :cot or :tir")
  return c
