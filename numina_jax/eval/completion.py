"""Harmony completions for SC-TIR: the prompt of one problem, sampled tokens parsed back into messages (by
openai-harmony's rules, plus each message's terminator), and the tool reply appended before the next round."""

from __future__ import annotations

import dataclasses
import re
from typing import Sequence

from numina_jax.data.harmony.conversation import Message
from numina_jax.data.harmony.options import RenderOptions
from numina_jax.data.harmony.system import system_text
from numina_jax.data.harmony.tokens import HarmonyRenderer, backend_tokenizer, renderer_for

ROLES = ("user", "assistant", "system", "developer", "tool")
TERMINATORS = ("<|end|>", "<|call|>", "<|return|>")
STOP_TOKENS = ("<|return|>", "<|call|>")  # what sampling stops at: the final answer, or a tool call
_ASCII_SPACE = re.compile(r"[ \t\n\x0c\r]+")


@dataclasses.dataclass(frozen=True)
class ParsedMessage:
  """One message of a completion; `terminator` is None when the completion ended inside its content."""

  author: str  # "assistant", another role, or the tool's name for a tool's message ("python")
  content: str
  channel: str | None = None
  recipient: str | None = None
  content_type: str | None = None
  terminator: str | None = None  # "<|end|>", "<|call|>", "<|return|>" or None


@dataclasses.dataclass(frozen=True)
class ParsedCompletion:
  messages: tuple[ParsedMessage, ...]  # every message parsed, the last possibly unterminated
  error: str | None = None  # why the tokens are not harmony; `messages` then holds those before the fault
  partial_header: str | None = None  # the header text when the completion ended before its <|message|>

  @property
  def last(self) -> ParsedMessage | None:
    return self.messages[-1] if self.messages else None


class HeaderError(ValueError):
  pass


def parse_header(text: str, role: str | None) -> tuple[str, str | None, str | None, str | None]:
  """(author, recipient, channel, content_type) of a header's text, by openai-harmony 0.0.8's rules.

  The channel is the word after `<|channel|>` (up to white space or `<`); of the remaining white-space separated
  words, a first one equal to the role is dropped; then a last `to=X` is the recipient, a single word is the
  recipient, or else the last word is the content type and the one before it the recipient (`to=` optional).
  `role` is the author already known (the prompt's `<|start|>assistant`), else the first word: a role, or a tool's
  name when more follows. Anything left over is an error, as in harmony.
  """
  channel = None
  marker = "<|channel|>"
  at = text.find(marker)
  if at >= 0:
    after = text[at + len(marker):]
    end = next((i for i, c in enumerate(after) if c.isspace() or c == "<"), len(after))
    if end == 0:
      raise HeaderError("<|channel|> with no channel name")
    channel = after[:end]
    text = text[:at] + after[end:]
  text = text.strip()
  if "<|constrain|>" in text:
    text = text.replace("<|constrain|>", " <|constrain|>").strip()
  parts = [p for p in _ASCII_SPACE.split(text) if p]
  author = role
  if role is None:
    if not parts:
      raise HeaderError("message header has no role")
    name = parts[0]
    if name in ROLES:
      role = author = name
    elif len(parts) > 1 or name.startswith("to="):
      parts.pop(0)
      role, author = "tool", name
    else:
      raise HeaderError(f"unknown role {name!r}")
  if parts and parts[0] == role:
    parts.pop(0)
  recipient = content_type = None
  if parts:
    count = len(parts)
    last = parts.pop()
    if last.startswith("to="):
      recipient = last[3:]
    elif count == 1:
      recipient = last
    else:
      content_type = last
      if parts:
        raw = parts.pop()
        recipient = raw[3:] if raw.startswith("to=") else raw
  if parts:
    raise HeaderError(f"unexpected words in message header: {' '.join(parts)!r}")
  return author, recipient, channel, content_type


class CompletionCodec:
  """Harmony tokens of one tokenizer: SC-TIR prompts and tool replies in, completions parsed out."""

  def __init__(self, tokenizer):
    self.renderer: HarmonyRenderer = renderer_for(tokenizer)
    sp = self.renderer.special
    self.special = sp
    self.start, self.message = sp["<|start|>"], sp["<|message|>"]
    self.terminators = {sp[t]: t for t in TERMINATORS}
    self.stop_token_ids = tuple(sp[t] for t in STOP_TOKENS)
    self.assistant_start = [self.start] + self.renderer.encode_text("assistant")
    self._decoder = backend_tokenizer(tokenizer)

  def decode(self, ids: Sequence[int]) -> str:
    """Text of `ids`, special tokens written out; bytes that are not UTF-8 (a cut character) become U+FFFD."""
    return self._decoder.decode(list(ids), skip_special_tokens=False)

  def prompt(self, problem: str, *, user_template: str, opts: RenderOptions) -> list[int]:
    """System message (python tool declared, `opts` gives the reasoning effort and the tool's description), the
    user message (`user_template` with `{problem}` replaced), then `<|start|>assistant`."""
    system = Message("system", system_text(opts, python_tool=True, function_tools=False))
    user = Message("user", user_template.replace("{problem}", problem))
    ids, _ = self.renderer.encode([[system, user]])[0]
    return ids.tolist() + self.assistant_start

  def tool_reply(self, author: str, content: str, channel: str | None) -> list[int]:
    """`<|start|>{author} to=assistant<|channel|>{channel}<|message|>{content}<|end|><|start|>assistant`."""
    msg = Message(author, content, channel=channel, recipient="assistant")
    ids, _ = self.renderer.encode([[msg]])[0]
    return ids.tolist() + self.assistant_start

  def parse(self, ids: Sequence[int], role: str | None = "assistant") -> ParsedCompletion:
    """The messages of a completion sampled after `<|start|>{role}` (role None: after a message's end).

    Messages end at `<|end|>`, `<|call|>` or `<|return|>`; the next must open with `<|start|>`. Other special tokens
    inside content are content, as in harmony. Never raises: a fault is reported in `.error`.
    """
    messages: list[ParsedMessage] = []
    state = "header" if role is not None else "start"
    header: list[int] = []
    content: list[int] = []
    head = None

    def fail(why: str) -> ParsedCompletion:
      return ParsedCompletion(tuple(messages), why)

    for pos, tok in enumerate(ids):
      if state == "start":
        if tok != self.start:
          return fail(f"token {pos} is {self.decode([tok])!r} where a message must open with <|start|>")
        state, role, header = "header", None, []
      elif state == "header":
        if tok == self.message:
          try:
            head = parse_header(self.decode(header), role)
          except HeaderError as e:
            return fail(f"bad message header {self.decode(header)!r}: {e}")
          state, content = "content", []
        elif tok in self.terminators:
          return fail(f"message header {self.decode(header)!r} ended by {self.terminators[tok]} before "
                      "<|message|>")
        else:
          header.append(tok)
      elif tok in self.terminators:
        author, recipient, channel, ctype = head
        messages.append(ParsedMessage(author, self.decode(content), channel, recipient, ctype,
                                      self.terminators[tok]))
        state = "start"
      else:
        content.append(tok)
    if state == "content":
      author, recipient, channel, ctype = head
      messages.append(ParsedMessage(author, self.decode(content), channel, recipient, ctype, None))
    elif state == "header":
      text = self.decode(header)
      return ParsedCompletion(tuple(messages), "the completion ended inside a message header", text)
    return ParsedCompletion(tuple(messages))


__all__ = ["CompletionCodec", "HeaderError", "ParsedCompletion", "ParsedMessage", "STOP_TOKENS", "TERMINATORS",
           "parse_header"]
