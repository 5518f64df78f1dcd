"""The embedded default: a tiny gpt-oss-architecture model trained on CPU, both recipe stages, on the
NuminaMath-format sample data the project ships (configs/default.py; `python -m numina_jax.train`)."""

from numina_jax.config import base_config


def get_config():
  c = base_config()
  c.lr = 3e-3  # a tiny randomly initialised model learns fast
  c.warmup_ratio = 0.05  # short warmup
  c.num_epochs = 1  # unused: max_steps is set
  c.max_steps = 100  # stage 1 (CoT) steps
  c.global_batch_size = 8  # sequences per step
  c.seq_len = 512  # packed block length
  c.workdir = "runs/demo"  # stage 1 in runs/demo/stage1_cot, stage 2 in runs/demo/stage2_tir
  c.log_every_steps = 5  # log often: the run is short
  c.checkpoint_every_steps = 50  # checkpoint a few times
  c.checkpoint_every_secs = 0  # step schedule only
  c.eval_every_steps = 25  # eval loss on the held-out split (also at the end)
  c.remat_policy = "none"  # tiny activations: no recomputation needed
  c.export_hf = True  # write a Hugging Face checkpoint at the end

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

  c.data.dataset_name = "sample:cot"  # shipped NuminaMath-CoT-format sample
  c.data.tokenizer = "demo"  # the project's small tokenizer with the harmony special tokens

  c.optim.weight_decay = 0.01
  c.optim.final_lr_ratio = 0.1

  c.checkpoint.max_to_keep = 2

  c.stage2.enabled = True  # then stage 2 (TIR) from stage 1's best checkpoint
  c.stage2.dataset_name = "sample:tir"
  c.stage2.seq_len = 512
  c.stage2.max_steps = 50
  c.stage2.warmup_ratio = 0.1
  c.stage2.lr = 2e-3
  return c
