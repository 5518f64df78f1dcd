"""The boxed answer of a text, `\\boxed{...}` as written: one rule for rendering a solution's final message and for
grading a sampled one."""

from __future__ import annotations

import re

# `\boxed{`, `\boxed {` and `\fbox{`; not `\boxedfoo{`, and not the brace-less `\boxed 5` (TeX allows it for a single
# token, models almost never write it, and taking one token would silently cut `\boxed 12` to `1`).
_BOX = re.compile(r"\\(?:boxed|fbox)(?![A-Za-z])\s*\{")


def closing_brace(text: str, open_at: int) -> int | None:
  """Index of the `}` that closes the `{` at `open_at`, or None; escaped braces (`\\{`, `\\}`) do not count."""
  depth = 0
  i = open_at
  while i < len(text):
    c = text[i]
    if c == "\\":
      i += 2  # skips the escaped character, so `\{` is not a brace and `\\{` (line break, brace) is
      continue
    if c == "{":
      depth += 1
    elif c == "}":
      depth -= 1
      if depth == 0:
        return i
    i += 1
  return None


def last_boxed(text: str) -> str | None:
  """The last complete box of `text` as written, command included (`\\boxed{\\frac{1}{2}}`), or None.

  "Last" is by where the box starts, so of nested boxes the inner one wins; a box whose braces never close (a
  truncated message) is passed over for the one before it.
  """
  for m in reversed(list(_BOX.finditer(text))):
    end = closing_brace(text, m.end() - 1)
    if end is not None:
      return text[m.start():end + 1]
  return None
