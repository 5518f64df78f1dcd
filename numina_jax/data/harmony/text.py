"""A harmony conversation as text with its special tokens written out, for reading and for training the demo
tokenizer."""

from __future__ import annotations

from typing import Iterable

from numina_jax.data.harmony.conversation import Message, end_token


def render_text(messages: Iterable[Message], for_training: bool = True) -> str:
  """The conversation as harmony text; `for_training` closes a final answer with <|return|>, else with <|end|>."""
  messages = list(messages)
  out = []
  for k, m in enumerate(messages):
    out.append("<|start|>" + m.author)
    if m.recipient is not None and m.recipient != "all":
      out.append(f" to={m.recipient}")
    if m.channel is not None:
      out.append("<|channel|>" + m.channel)
    if m.content_type is not None:
      out.append(" " + m.content_type)
    out.append("<|message|>" + m.content)
    out.append(end_token(m, last=for_training and k == len(messages) - 1))
  return "".join(out)
