"""A harmony conversation: its messages, the special tokens, and which token ends each message."""

from __future__ import annotations

import dataclasses

SPECIAL_TOKENS = ("<|startoftext|>", "<|endoftext|>", "<|return|>", "<|constrain|>", "<|channel|>", "<|start|>",
                  "<|end|>", "<|message|>", "<|call|>")
CONSTRAIN = "<|constrain|>"


@dataclasses.dataclass(frozen=True)
class Message:
  """One harmony message; `author` is a role or, for a tool reply, the tool's name ("python", "functions.f")."""

  author: str
  content: str
  channel: str | None = None
  recipient: str | None = None
  content_type: str | None = None


@dataclasses.dataclass(frozen=True)
class Conversation:
  messages: tuple[Message, ...]
  tir: bool = False  # the row calls the python tool
  no_boxed: bool = False  # a solution without \boxed{}: its whole text went to the final channel


def assistant(content: str, channel: str, **kw) -> Message:
  return Message("assistant", content, channel=channel, **kw)


def end_token(message: Message, last: bool) -> str:
  """The token that closes `message`: <|return|> for the final answer closing a training conversation (`last`),
  <|call|> for an assistant message to a tool, <|end|> otherwise."""
  is_assistant = message.author == "assistant"
  if last and is_assistant and message.channel == "final":
    return "<|return|>"
  if is_assistant and message.recipient is not None:
    return "<|call|>"
  return "<|end|>"
