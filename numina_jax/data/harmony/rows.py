"""A row of either format to its harmony conversation (data.row_format), and to tokens with the loss mask."""

from __future__ import annotations

from typing import Any

import numpy as np

from numina_jax.data.errors import RowContext
from numina_jax.data.harmony.conversation import Conversation
from numina_jax.data.harmony.numina import numina_conversation
from numina_jax.data.harmony.openai_messages import messages_conversation
from numina_jax.data.harmony.options import RenderOptions
from numina_jax.data.harmony.tokens import renderer_for


def row_conversation(row: Any, opts: RenderOptions, ctx: RowContext | None = None) -> Conversation:
  """Routes a row to the NuminaMath or the OpenAI-messages mapping (data.row_format)."""
  ctx = ctx or RowContext()
  if not isinstance(row, dict):
    raise ctx.error(None, f"a row must be an object, got {type(row).__name__}", "bad_row")
  fmt = opts.row_format
  if fmt == "auto":
    fmt = "numina" if opts.question_field in row or opts.messages_field not in row else "messages"
  if fmt == "numina":
    return numina_conversation(row, opts, ctx)
  return messages_conversation(row, opts, ctx)


def format_example(example: dict, tokenizer, config=None, *, dataset: str | None = None,
                   index: int | None = None) -> dict[str, np.ndarray]:
  """Renders one row to {"input_ids", "loss_mask"} (int32 arrays of equal length).

  `config` is the data section of a training config (defaults when None). A solution with ```python fences is
  TIR; a row with OpenAI-style messages maps its tool calls. Malformed rows raise BadRowError.
  """
  opts = RenderOptions.from_config(config)
  conv = row_conversation(example, opts, RowContext(dataset, index))
  ids, mask = renderer_for(tokenizer).encode([conv.messages])[0]
  return {"input_ids": ids, "loss_mask": mask.astype(np.int32)}
