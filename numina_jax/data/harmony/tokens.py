"""Harmony conversations to token ids and the loss mask of harmony.md, piece by piece as openai-harmony 0.0.8 encodes
them (role, ` to=`, channel, content type and content separately; content never parses special tokens), over any
fast Hugging Face tokenizer with the harmony special tokens: the gpt-oss tokenizer gives OpenAI's ids."""

from __future__ import annotations

import weakref
from typing import Sequence

import numpy as np
import tokenizers

from numina_jax.data.harmony.conversation import CONSTRAIN, SPECIAL_TOKENS, Message, end_token


def backend_tokenizer(tokenizer) -> tokenizers.Tokenizer:
  """The `tokenizers.Tokenizer` behind a fast Hugging Face tokenizer (or the tokenizer itself if it is one)."""
  if isinstance(tokenizer, tokenizers.Tokenizer):
    return tokenizer
  backend = getattr(tokenizer, "backend_tokenizer", None)
  if backend is None:
    raise TypeError(f"need a fast (tokenizers-backed) tokenizer, got {type(tokenizer).__name__}")
  return backend


def special_token_ids(tokenizer) -> dict[str, int]:
  """The ids of the harmony special tokens; each must be a single token of the tokenizer."""
  backend = backend_tokenizer(tokenizer)
  ids = {}
  for token in SPECIAL_TOKENS:
    tid = backend.token_to_id(token)
    if tid is None or backend.encode(token, add_special_tokens=False).ids != [tid]:
      raise ValueError(f"tokenizer has no single token for the harmony special token {token}")
    ids[token] = tid
  return ids


class HarmonyRenderer:
  """Renders harmony conversations to (input_ids, loss_mask) with one tokenizer."""

  _CACHE_LIMIT = 8192

  def __init__(self, tokenizer):
    self.special = special_token_ids(tokenizer)
    # A private copy that encodes special-token text inside content as plain text, as harmony's encode_ordinary.
    self._encoder = tokenizers.Tokenizer.from_str(backend_tokenizer(tokenizer).to_str())
    self._encoder.encode_special_tokens = True
    self._cache: dict[str, list[int]] = {}

  def encode_text(self, text: str) -> list[int]:
    ids = self._cache.get(text)
    if ids is None:
      ids = self._encoder.encode(text, add_special_tokens=False).ids
      if len(self._cache) < self._CACHE_LIMIT:
        self._cache[text] = ids
    return ids

  def _plan(self, messages: Sequence[Message], texts: list[str]) -> list:
    """Lists (token ids | index into texts, loss) pieces; contents to encode are appended to texts."""
    sp = self.special
    pieces = []
    prev_assistant = False
    last = len(messages) - 1
    for k, m in enumerate(messages):
      assistant = m.author == "assistant"
      # Loss on what the model writes: the <|start|>assistant of a message is generated only when the previous
      # message was the model's own; after a prompt or a tool reply it is part of the prompt.
      head, body = assistant and prev_assistant, assistant
      pieces.append(([sp["<|start|>"]] + self.encode_text(m.author), head))
      header = []
      if m.recipient is not None and m.recipient != "all":
        header += self.encode_text(f" to={m.recipient}")
      if m.channel is not None:
        header += [sp["<|channel|>"]] + self.encode_text(m.channel)
      if m.content_type is not None:
        if m.content_type.startswith(CONSTRAIN):
          header += self.encode_text(" ") + [sp[CONSTRAIN]]
          rest = m.content_type[len(CONSTRAIN):]
          header += self.encode_text(rest) if rest else []
        else:
          header += self.encode_text(f" {m.content_type}")
      header.append(sp["<|message|>"])
      pieces.append((header, body))
      if m.author in ("system", "developer"):
        pieces.append((self.encode_text(m.content), False))  # the same few texts on every row
      else:
        pieces.append((len(texts), body))
        texts.append(m.content)
      pieces.append(([sp[end_token(m, last=k == last)]], body))
      prev_assistant = assistant
    return pieces

  def encode(self, conversations: Sequence[Sequence[Message]]) -> list[tuple[np.ndarray, np.ndarray]]:
    """Tokens (int32) and loss mask (uint8, 1 = the model is trained to write this token) per conversation."""
    texts: list[str] = []
    plans = [self._plan(msgs, texts) for msgs in conversations]
    encoded = [e.ids for e in self._encoder.encode_batch(texts, add_special_tokens=False)] if texts else []
    out = []
    for plan in plans:
      ids: list[int] = []
      mask: list[int] = []
      for piece, loss in plan:
        toks = encoded[piece] if isinstance(piece, int) else piece
        ids += toks
        mask += [int(loss)] * len(toks)
      out.append((np.asarray(ids, np.int32), np.asarray(mask, np.uint8)))
    return out


_RENDERERS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def renderer_for(tokenizer) -> HarmonyRenderer:
  """One renderer per tokenizer object (building one copies the tokenizer)."""
  try:
    renderer = _RENDERERS.get(tokenizer)
  except TypeError:
    return HarmonyRenderer(tokenizer)
  if renderer is None:
    renderer = HarmonyRenderer(tokenizer)
    _RENDERERS[tokenizer] = renderer
  return renderer
