"""The data path: NuminaMath sources, harmony rendering with a loss mask, tokenizers, packing and the input pipeline.

  cfg = default_data_config()                              # the `data` section of a training config
  tok = load_tokenizer("openai/gpt-oss-20b")               # or demo_tokenizer(); a model needs vocab_size(tok) ids
  format_example(row, tok, cfg)                            # {"input_ids", "loss_mask"} of one row
  it = make_pipeline(cfg, tok, seq_len=2048, global_batch_size=32, seed=0)           # this host's train batches
  evals = make_pipeline(cfg, tok, seq_len=2048, global_batch_size=32, seed=0, split="eval")
  # on many hosts: process_index=, process_count=, allgather=multihost_utils.process_allgather
"""

from numina_jax.data.config import default_data_config
from numina_jax.data.errors import BadRowError
from numina_jax.data.harmony.conversation import SPECIAL_TOKENS
from numina_jax.data.harmony.rows import format_example
from numina_jax.data.packing import BATCH_KEYS
from numina_jax.data.pipeline import EvalBatches, TrainIterator, make_pipeline, validate_data_config
from numina_jax.data.tokenizer import DEMO_VOCAB_SIZE, demo_tokenizer, load_tokenizer, vocab_size

__all__ = ["BATCH_KEYS", "BadRowError", "DEMO_VOCAB_SIZE", "EvalBatches", "SPECIAL_TOKENS", "TrainIterator",
           "default_data_config", "demo_tokenizer", "format_example", "load_tokenizer", "make_pipeline",
           "validate_data_config", "vocab_size"]
