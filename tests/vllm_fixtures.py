"""A tiny gpt-oss that vLLM's CPU build serves, exported with our `save_pretrained` (fp32, demo tokenizer), and a
vLLM server for it; `serve_tiny_model` is what engine tests (and SC-TIR through vLLM) share."""

from __future__ import annotations

import contextlib
import dataclasses
import os
from pathlib import Path
from typing import Iterator

import numpy as np
import pytest

from helpers import random_params

REPO = Path(__file__).resolve().parents[1]
SETUP_HINT = "run `bash tests/setup_vllm.sh` (makes .venv-vllm/, ~3.5 min, 3.4 GB) or set NUMINA_VLLM_PYTHON"

# Shapes vLLM's CPU MoE and attention accept (hidden 128, expert width 96, 4 experts, head_dim 32), every
# dimension still distinct: 6 query heads over 2 kv heads, top-2 routing, a window of 8 shorter than the tests'
# sequences so the sliding layers matter.
VLLM_TINY = dict(hidden_size=128, intermediate_size=96, num_hidden_layers=4, num_attention_heads=6,
                 num_key_value_heads=2, head_dim=32, num_local_experts=4, num_experts_per_tok=2, sliding_window=8,
                 rope_original_max_position_embeddings=64, max_position_embeddings=64 * 32)
MAX_MODEL_LEN = 512
# A random model almost never picks one particular token of ~1000; the lm_head columns of the stop tokens are
# scaled so that <|call|> and <|return|> end some of the tests' completions within a few dozen tokens.
STOP_LOGIT_SCALE = 3.3
SERVED_NAME = "tiny-gpt-oss"


def vllm_python() -> str:
  """The python of a venv with vLLM: $NUMINA_VLLM_PYTHON, else .venv-vllm/bin/python; a skip (a failure in CI)."""
  path = os.environ.get("NUMINA_VLLM_PYTHON") or str(REPO / ".venv-vllm" / "bin" / "python")
  if not os.access(path, os.X_OK):
    message = f"needs vLLM: {path} not found; {SETUP_HINT}"
    if os.environ.get("CI"):
      pytest.fail(message + " (.ci/run makes it)")
    pytest.skip(message)
  return path


@dataclasses.dataclass
class ServedModel:
  url: str  # e.g. http://127.0.0.1:PORT, serving `name`
  name: str
  export_dir: Path  # our fp32 HF export: safetensors, config, demo tokenizer
  cfg: object  # GptOssConfig
  params: dict  # our flat fp32 params (numpy), what was exported
  tokenizer: object  # the demo tokenizer
  server: object  # VllmServer


def export_tiny_model(out_dir: Path, seed: int = 0):
  """Writes the tiny model to `out_dir` with `save_pretrained` in fp32; returns (cfg, params, tokenizer)."""
  import jax.numpy as jnp

  from numina_jax.data.harmony import special_token_ids
  from numina_jax.data.tokenizer import demo_tokenizer
  from numina_jax.hf.export import save_pretrained
  from numina_jax.model.config import GptOssConfig

  tok = demo_tokenizer()
  ids = special_token_ids(tok)
  cfg = GptOssConfig(vocab_size=-(-len(tok) // 128) * 128, bos_token_id=ids["<|startoftext|>"],
                     eos_token_id=ids["<|return|>"], pad_token_id=ids["<|endoftext|>"], **VLLM_TINY)
  params = random_params(cfg, seed)
  lm_head = params["lm_head"].copy()
  for name in ("<|call|>", "<|return|>"):
    lm_head[:, ids[name]] *= STOP_LOGIT_SCALE
  params["lm_head"] = lm_head
  save_pretrained(params, str(out_dir), dtype=jnp.float32, cfg=cfg, tokenizer=tok, progress=False)
  return cfg, params, tok


@contextlib.contextmanager
def serve_tiny_model(work_dir: Path) -> Iterator[ServedModel]:
  """Exports the tiny model under `work_dir` and serves it with vLLM (fp32, eager) until the block ends."""
  from numina_jax.sampling.vllm_server import VllmServer

  python = vllm_python()
  export_dir = Path(work_dir) / "hf"
  cfg, params, tok = export_tiny_model(export_dir)
  server = VllmServer(export_dir, python=python, served_model_name=SERVED_NAME, dtype="float32",
                      max_model_len=MAX_MODEL_LEN, enforce_eager=True, env={"VLLM_CPU_KVCACHE_SPACE": "1"},
                      log_path=Path(work_dir) / "vllm.log", startup_timeout_s=900)
  with server:
    yield ServedModel(server.url, SERVED_NAME, export_dir, cfg, {k: np.asarray(v) for k, v in params.items()},
                      tok, server)
