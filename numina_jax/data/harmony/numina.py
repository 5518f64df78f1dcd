"""NuminaMath rows (problem, solution) as harmony conversations: CoT prose to analysis and its \\boxed{} answer to
final, and TIR solutions split at their ```python / ```output fences into python calls and replies."""

from __future__ import annotations

import re

from numina_jax.data.boxed import last_boxed
from numina_jax.data.errors import RowContext
from numina_jax.data.harmony.conversation import Conversation, Message, assistant
from numina_jax.data.harmony.options import RenderOptions
from numina_jax.data.harmony.system import system_text

_FENCE_OPEN = re.compile(r"^[ \t]*```[ \t]*(python|output)[ \t]*(?:\r?\n|\Z)", re.MULTILINE)
_FENCE_CLOSE = re.compile(r"^[ \t]*```[ \t]*(?:\r?\n|\Z)", re.MULTILINE)


def split_solution(solution: str, ctx: RowContext | None = None, field: str = "solution") -> list[tuple[str, str]]:
  """Splits a solution at its ```python / ```output fences into ("prose" | "code" | "output", text) segments.

  Prose is stripped and left out when empty; a fence's text is what lies between its opening and closing lines,
  without the newline before the closing line. A code fence must be followed by an output fence, and an output
  fence must follow a code fence: anything else is an error in the row, not something to guess.
  """
  ctx = ctx or RowContext()
  segments: list[tuple[str, str]] = []
  pos = 0
  while True:
    opening = _FENCE_OPEN.search(solution, pos)
    if opening is None:
      break
    prose = solution[pos:opening.start()].strip()
    kind = "code" if opening.group(1) == "python" else "output"
    closing = _FENCE_CLOSE.search(solution, opening.end())
    if closing is None:
      raise ctx.error(field, f"```{opening.group(1)} fence opened at character {opening.start()} is never closed",
                      "unclosed_fence")
    body = solution[opening.end():closing.start()]
    if body.endswith("\n"):
      body = body[:-1]
      if body.endswith("\r"):
        body = body[:-1]
    pending_code = bool(segments) and segments[-1][0] == "code"
    if pending_code and (kind != "output" or prose):
      raise ctx.error(field, "a ```python fence has no ```output fence after it", "code_without_output")
    if kind == "output" and not pending_code:
      raise ctx.error(field, f"```output fence at character {opening.start()} follows no ```python fence",
                      "output_without_code")
    if prose:
      segments.append(("prose", prose))
    segments.append((kind, body))
    pos = closing.end()
  tail = solution[pos:].strip()
  if segments and segments[-1][0] == "code":
    raise ctx.error(field, "a ```python fence has no ```output fence after it", "code_without_output")
  if tail:
    segments.append(("prose", tail))
  return segments


def numina_conversation(row: dict, opts: RenderOptions, ctx: RowContext | None = None) -> Conversation:
  """A NuminaMath row (problem, solution) as a harmony conversation, per harmony.md section 2."""
  ctx = ctx or RowContext()
  problem = ctx.string(row, opts.question_field).strip()
  solution = ctx.string(row, opts.answer_field)
  if not problem:
    raise ctx.error(opts.question_field, "empty problem", "empty_problem")
  if not solution.strip():
    raise ctx.error(opts.answer_field, "empty solution", "empty_solution")
  segments = split_solution(solution, ctx, opts.answer_field)
  boxed = last_boxed(solution)
  tir = any(kind == "code" for kind, _ in segments)
  body = [Message("user", problem)]
  if not tir:
    text = segments[0][1]
    if opts.layout == "final_only" or boxed is None:
      body.append(assistant(text, "final"))
    else:
      body += [assistant(text, "analysis"), assistant(boxed, "final")]
  else:
    for kind, text in segments:
      if kind == "prose":
        body.append(assistant(text, "analysis"))
      elif kind == "code":
        body.append(assistant(text, "analysis", recipient="python", content_type="code"))
      else:
        body.append(Message("python", text, channel="analysis", recipient="assistant"))
    if boxed is not None:
      body.append(assistant(boxed, "final"))
    elif segments[-1][0] == "prose":
      # No \boxed{}: the prose after the last output is the answer.
      body[-1] = assistant(segments[-1][1], "final")
    else:
      raise ctx.error(opts.answer_field, "the solution ends in a tool output and has no \\boxed{} answer", "no_final")
  python = tir or opts.python_tool == "always"
  system = Message("system", system_text(opts, python_tool=python, function_tools=False))
  return Conversation((system, *body), tir=tir, no_boxed=boxed is None)
