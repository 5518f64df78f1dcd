"""Harmony rendering of NuminaMath rows and OpenAI-style conversations, with the loss mask of harmony.md.

Tokens are produced piece by piece exactly as openai-harmony 0.0.8 does (role, ` to=`, channel, content type and
content are encoded separately; content never parses special tokens), over any Hugging Face tokenizer that has the
harmony special tokens, so the real gpt-oss tokenizer gives OpenAI's ids and the demo tokenizer the same structure.
"""

from __future__ import annotations

import dataclasses
import json
import re
import weakref
from typing import Any, Iterable, Sequence

import numpy as np

from numina_jax.data import config as data_config
from numina_jax.data.errors import BadRowError, RowContext
from numina_jax.eval.grading import last_boxed  # one definition of "the answer", shared with grading

SPECIAL_TOKENS = ("<|startoftext|>", "<|endoftext|>", "<|return|>", "<|constrain|>", "<|channel|>", "<|start|>",
                  "<|end|>", "<|message|>", "<|call|>")
CONSTRAIN = "<|constrain|>"

# openai-harmony's default description of its built-in python tool, byte for byte.
PYTHON_TOOL_DESCRIPTION = (
    "Use this tool to execute Python code in your chain of thought. The code will not be shown to the user. This tool "
    "should be used for internal reasoning, but not for code that is intended to be visible to the user (e.g. when "
    "creating plots, tables, or files).\n\nWhen you send a message containing Python code to python, it will be "
    "executed in a stateful Jupyter notebook environment. python will respond with the output of the execution or time "
    "out after 120.0 seconds. The drive at '/mnt/data' can be used to save and persist user files. Internet access for "
    "this session is UNKNOWN. Depends on the cluster.")
VALID_CHANNELS = ("analysis", "commentary", "final")
REASONING_EFFORTS = ("low", "medium", "high")
LAYOUTS = ("analysis_final", "final_only")
_FUNCTION_NAME = re.compile(r"^[A-Za-z0-9_\-.]+$")


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


@dataclasses.dataclass(frozen=True)
class RenderOptions:
  """The rendering part of the data config, read once."""

  row_format: str = "auto"
  question_field: str = "problem"
  answer_field: str = "solution"
  messages_field: str = "messages"
  tools_field: str = "tools"
  tool_calls_field: str = "tool_calls"
  tool_name_field: str = "name"
  tool_input_field: str = "arguments"
  tool_output_field: str = "content"
  layout: str = "analysis_final"
  system_date: str = "2025-06-28"
  reasoning_effort: str = "medium"
  model_identity: str = data_config.DEFAULT_MODEL_IDENTITY
  knowledge_cutoff: str = data_config.DEFAULT_KNOWLEDGE_CUTOFF
  python_tool: str = "auto"
  python_tool_description: str = ""
  drop_history_analysis: bool = True

  @classmethod
  def from_config(cls, config=None, **overrides) -> "RenderOptions":
    values = {f.name: data_config.get(config, f.name) for f in dataclasses.fields(cls)}
    values.update({k: v for k, v in overrides.items() if v is not None})
    opts = cls(**values)
    opts.validate()
    return opts

  def validate(self) -> None:
    if self.layout not in LAYOUTS:
      raise ValueError(f"data.layout must be one of {LAYOUTS}, got {self.layout!r}")
    if self.reasoning_effort not in REASONING_EFFORTS:
      raise ValueError(f"data.reasoning_effort must be one of {REASONING_EFFORTS}, got {self.reasoning_effort!r}")
    if self.python_tool not in ("auto", "always"):
      raise ValueError(f"data.python_tool must be 'auto' or 'always', got {self.python_tool!r}")
    if self.row_format not in ("auto", "numina", "messages"):
      raise ValueError(f"data.row_format must be 'auto', 'numina' or 'messages', got {self.row_format!r}")

  def key(self) -> dict:
    return dataclasses.asdict(self)


# ----------------------------------------------------------------------------------------------------------------
# System and developer messages, as openai-harmony writes them.


def _rust_lines(text: str) -> list[str]:
  """str::lines() of Rust, which harmony uses: split at \\n, drop one trailing empty line and a trailing \\r."""
  lines = text.split("\n")
  if lines and lines[-1] == "":
    lines.pop()
  return [line[:-1] if line.endswith("\r") else line for line in lines]


def _get(obj: Any, key: str) -> Any:
  return obj.get(key) if isinstance(obj, dict) else None


def _str(obj: Any, key: str) -> str | None:
  value = _get(obj, key)
  return value if isinstance(value, str) else None


def _json_value(value: Any) -> str:
  return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


def _is_enum(schema: Any) -> bool:
  values = _get(schema, "enum")
  return isinstance(values, list) and len(values) > 0


def _default_text(schema: dict, value: Any, bare_enum_string: bool) -> str:
  # harmony quotes a string default by hand, except that in most places an enum's string default goes in bare.
  if isinstance(value, str) and not _is_enum(schema):
    return f'default: "{value}"'
  if isinstance(value, str) and bare_enum_string:
    return f"default: {value}"
  return f"default: {_json_value(value)}"


def _nullable(schema: Any, type_str: str) -> str:
  if _get(schema, "nullable") is True and "null" not in type_str:
    return f"{type_str} | null"
  return type_str


def json_schema_to_typescript(schema: Any, indent: str = "") -> str:
  """The TypeScript-like rendering of a JSON schema that harmony puts in a `namespace functions` block."""
  one_of = _get(schema, "oneOf")
  if isinstance(one_of, list):
    out = ""
    for variant in one_of:
      out += f"\n{indent} | " + _nullable(variant, json_schema_to_typescript(variant, indent + "   "))
      comments = []
      if _str(variant, "description") is not None:
        comments.append(variant["description"])
      if isinstance(variant, dict) and "default" in variant:
        comments.append(_default_text(variant, variant["default"], bare_enum_string=False))
      if comments:
        out += " // " + " ".join(comments)
    return out
  kind = _get(schema, "type")
  if isinstance(kind, list):
    names = ["number" if k == "integer" else k for k in kind if isinstance(k, str)]
    if names:
      return " | ".join(names)
  if not isinstance(kind, str):
    return "any"
  if kind == "object":
    return _object_to_typescript(schema, indent)
  if kind == "string":
    values = [f'"{v}"' for v in (_get(schema, "enum") or []) if isinstance(v, str)] if _is_enum(schema) else []
    return " | ".join(values) if values else "string"
  if kind in ("number", "integer"):
    return "number"
  if kind == "boolean":
    return "boolean"
  if kind == "array":
    if "items" in schema:
      return json_schema_to_typescript(schema["items"], indent) + "[]"
    return "Array<any>"
  return "any"


def _object_to_typescript(schema: dict, indent: str) -> str:
  out = ""
  if _str(schema, "description") is not None:
    out += f"{indent}// {schema['description']}\n"
  out += "{\n"
  props = schema.get("properties")
  if isinstance(props, dict):
    required = {r for r in (schema.get("required") or []) if isinstance(r, str)} \
        if isinstance(schema.get("required"), list) else set()
    for key, val in props.items():
      optional = "" if key in required else "?"
      if _str(val, "title") is not None:
        out += f"{indent}// {val['title']}\n{indent}//\n"
      if _get(val, "oneOf") is None and _str(val, "description") is not None:
        out += f"{indent}// {val['description']}\n"
      examples = _get(val, "examples")
      if isinstance(examples, list) and examples:
        out += f"{indent}// Examples:\n"
        for example in examples:
          if isinstance(example, str):
            out += f'{indent}// - "{example}"\n'
      variants = _get(val, "oneOf")
      if isinstance(variants, list):
        out += _one_of_property(key, optional, val, variants, indent)
        continue
      out += f"{indent}{key}{optional}: " + _nullable(val, json_schema_to_typescript(val, indent + "    ")) + ","
      if _get(val, "oneOf") is None and isinstance(val, dict) and "default" in val:
        out += " // " + _default_text(val, val["default"], bare_enum_string=True)
      out += "\n"
  return out + f"{indent}}}"


def _one_of_property(key: str, optional: str, val: dict, variants: list, indent: str) -> str:
  out = ""
  prop_desc = _str(val, "description")
  # A property description equal to its first variant's is written once, by harmony's rule.
  skip = prop_desc is not None and bool(variants) and _str(variants[0], "description") == prop_desc
  above = False
  if not skip and prop_desc is not None:
    out += f"{indent}// {prop_desc}\n"
    above = True
  if "default" in val:
    out += f"{indent}// " + _default_text(val, val["default"], bare_enum_string=True) + "\n"
  out += f"{indent}{key}{optional}:\n"
  for i, variant in enumerate(variants):
    out += f"{indent} | " + _nullable(variant, json_schema_to_typescript(variant, indent + "   "))
    comments = []
    desc = _str(variant, "description")
    if not (i == 0 and above) and desc is not None and desc != prop_desc:
      comments.append(desc)
    if isinstance(variant, dict) and "default" in variant:
      comments.append(_default_text(variant, variant["default"], bare_enum_string=True))
    if comments:
      out += " // " + " ".join(comments)
    out += "\n"
  return out + f"{indent},\n"


@dataclasses.dataclass(frozen=True)
class ToolSpec:
  name: str
  description: str = ""
  parameters: dict | None = None


def tools_section(namespaces: Sequence[tuple[str, str | None, Sequence[ToolSpec]]]) -> str:
  """The `# Tools` section; namespaces are (name, description, tools), written sorted by name like harmony."""
  sections = ["# Tools"]
  for name, description, tools in sorted(namespaces, key=lambda ns: ns[0]):
    parts = [f"## {name}\n"]
    if description is not None:
      parts += [f"// {line}" if tools else line for line in _rust_lines(description)]
    if tools:
      parts.append(f"namespace {name} {{\n")
      for tool in tools:
        parts += [f"// {line}" for line in _rust_lines(tool.description)]
        if tool.parameters is not None:
          parts.append(f"type {tool.name} = (_: {json_schema_to_typescript(tool.parameters)}) => any;\n")
        else:
          parts.append(f"type {tool.name} = () => any;\n")
      parts.append(f"}} // namespace {name}")
    sections.append("\n".join(parts))
  return "\n\n".join(sections)


def system_text(opts: RenderOptions, *, python_tool: bool, function_tools: bool) -> str:
  """The content of the system message (harmony's SystemContent rendering)."""
  sections = []
  top = [opts.model_identity] if opts.model_identity else []
  if opts.knowledge_cutoff:
    top.append(f"Knowledge cutoff: {opts.knowledge_cutoff}")
  if opts.system_date:
    top.append(f"Current date: {opts.system_date}")
  if top:
    sections.append("\n".join(top))
  sections.append(f"Reasoning: {opts.reasoning_effort}")
  if python_tool:
    sections.append(tools_section([("python", opts.python_tool_description or PYTHON_TOOL_DESCRIPTION, ())]))
  channels = f"# Valid channels: {', '.join(VALID_CHANNELS)}. Channel must be included for every message."
  if function_tools:
    channels += "\nCalls to these tools must go to the commentary channel: 'functions'."
  sections.append(channels)
  return "\n\n".join(sections)


def developer_text(instructions: str | None, functions: Sequence[ToolSpec]) -> str:
  sections = []
  if instructions is not None:
    sections += ["# Instructions", instructions]
  if functions:
    sections.append(tools_section([("functions", None, functions)]))
  return "\n\n".join(sections)


# ----------------------------------------------------------------------------------------------------------------
# NuminaMath rows.

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


def _text_field(row: dict, field: str, ctx: RowContext) -> str:
  if field not in row or row[field] is None:
    raise ctx.error(field, "missing", "missing_field")
  value = row[field]
  if not isinstance(value, str):
    raise ctx.error(field, f"expected a string, got {type(value).__name__}", "not_a_string")
  return value


def _assistant(content: str, channel: str, **kw) -> Message:
  return Message("assistant", content, channel=channel, **kw)


def numina_conversation(row: dict, opts: RenderOptions, ctx: RowContext | None = None) -> Conversation:
  """A NuminaMath row (problem, solution) as a harmony conversation, per harmony.md section 2."""
  ctx = ctx or RowContext()
  problem = _text_field(row, opts.question_field, ctx).strip()
  solution = _text_field(row, opts.answer_field, ctx)
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
      body.append(_assistant(text, "final"))
    else:
      body += [_assistant(text, "analysis"), _assistant(boxed, "final")]
  else:
    for kind, text in segments:
      if kind == "prose":
        body.append(_assistant(text, "analysis"))
      elif kind == "code":
        body.append(_assistant(text, "analysis", recipient="python", content_type="code"))
      else:
        body.append(Message("python", text, channel="analysis", recipient="assistant"))
    if boxed is not None:
      body.append(_assistant(boxed, "final"))
    elif segments[-1][0] == "prose":
      # No \boxed{}: the prose after the last output is the answer.
      body[-1] = _assistant(segments[-1][1], "final")
    else:
      raise ctx.error(opts.answer_field, "the solution ends in a tool output and has no \\boxed{} answer", "no_final")
  python = tir or opts.python_tool == "always"
  system = Message("system", system_text(opts, python_tool=python, function_tools=False))
  return Conversation((system, *body), tir=tir, no_boxed=boxed is None)


# ----------------------------------------------------------------------------------------------------------------
# OpenAI-style messages with tool calls.


def _declared_functions(row: dict, opts: RenderOptions, ctx: RowContext) -> list[ToolSpec] | None:
  field = opts.tools_field
  tools = row.get(field)
  if tools is None:
    return None
  if not isinstance(tools, list):
    raise ctx.error(field, "expected a list of tool declarations", "bad_tools")
  specs = []
  for i, tool in enumerate(tools):
    fn = tool.get("function", tool) if isinstance(tool, dict) else None
    if isinstance(tool, dict) and tool.get("type", "function") != "function":
      raise ctx.error(f"{field}[{i}]", f"unknown tool type {tool.get('type')!r}", "bad_tools")
    name = _str(fn, "name")
    if not name or not _FUNCTION_NAME.match(name):
      raise ctx.error(f"{field}[{i}]", "a tool declaration needs a name (letters, digits, _ - .)", "bad_tools")
    description = _get(fn, "description")
    parameters = _get(fn, "parameters")
    if description is not None and not isinstance(description, str):
      raise ctx.error(f"{field}[{i}].description", "expected a string", "bad_tools")
    if parameters is not None and not isinstance(parameters, dict):
      raise ctx.error(f"{field}[{i}].parameters", "expected a JSON schema object", "bad_tools")
    if name != "python":  # python is the built-in tool, declared in the system message
      specs.append(ToolSpec(name, description or "", parameters))
  return specs


def _tool_call(call: Any, where: str, opts: RenderOptions, ctx: RowContext) -> tuple[str, str, Message]:
  """Validates one OpenAI tool call; returns (id, tool name, the harmony call message)."""
  if not isinstance(call, dict):
    raise ctx.error(where, "a tool call must be an object", "bad_tool_call")
  call_id = call.get("id")
  if not isinstance(call_id, str) or not call_id:
    raise ctx.error(f"{where}.id", "missing id", "tool_call_missing_id")
  if call.get("type") != "function":
    raise ctx.error(f"{where}.type", f"unknown tool call type {call.get('type')!r}", "tool_call_unknown_type")
  fn = call.get("function")
  if not isinstance(fn, dict):
    raise ctx.error(f"{where}.function", "missing function", "bad_tool_call")
  name = fn.get(opts.tool_name_field)
  if not isinstance(name, str) or not _FUNCTION_NAME.match(name):
    raise ctx.error(f"{where}.function.{opts.tool_name_field}", "missing or invalid function name", "bad_tool_call")
  raw = fn.get(opts.tool_input_field)
  args_field = f"{where}.function.{opts.tool_input_field}"
  if isinstance(raw, str):
    try:
      args = json.loads(raw)
    except json.JSONDecodeError as e:
      raise ctx.error(args_field, f"arguments are not valid JSON ({e.msg})", "tool_call_bad_arguments") from None
    text = raw
  else:
    args, text = raw, (json.dumps(raw, ensure_ascii=False) if isinstance(raw, dict) else "")
  if not isinstance(args, dict):
    raise ctx.error(args_field, "arguments are not a JSON object", "tool_call_bad_arguments")
  if name == "python":
    code = args.get("code")
    if not isinstance(code, str):
      raise ctx.error(args_field, "a python call needs a string 'code' argument", "tool_call_bad_arguments")
    return call_id, name, _assistant(code, "analysis", recipient="python", content_type="code")
  return call_id, name, _assistant(text, "commentary", recipient=f"functions.{name}", content_type=CONSTRAIN + "json")


def messages_conversation(row: dict, opts: RenderOptions, ctx: RowContext | None = None) -> Conversation:
  """OpenAI-style `messages` (with `tool_calls` and `role: tool` replies) as a harmony conversation."""
  ctx = ctx or RowContext()
  field = opts.messages_field
  messages = row.get(field)
  if messages is None:
    raise ctx.error(field, "missing", "missing_field")
  if not isinstance(messages, list) or not messages:
    raise ctx.error(field, "expected a non-empty list of messages", "bad_messages")
  declared = _declared_functions(row, opts, ctx)
  instructions = None
  body: list[Message] = []
  calls: dict[str, str] = {}  # id -> tool name
  unanswered: list[str] = []
  uses_python = False
  called_functions = []

  def text(m: dict, key: str, where: str, required: bool = True) -> str | None:
    value = m.get(key)
    if value is None and not required:
      return None
    if value is None:
      raise ctx.error(f"{where}.{key}", "missing", "missing_field")
    if not isinstance(value, str):
      raise ctx.error(f"{where}.{key}", f"expected a string, got {type(value).__name__}", "not_a_string")
    return value

  for i, m in enumerate(messages):
    where = f"{field}[{i}]"
    if not isinstance(m, dict):
      raise ctx.error(where, "a message must be an object", "bad_messages")
    role = m.get("role")
    if role != "tool" and unanswered:
      raise ctx.error(f"{field}[{i - 1}].{opts.tool_calls_field}",
                      f"tool call {unanswered[0]!r} has no reply", "tool_call_without_reply")
    if role in ("system", "developer"):
      if body or instructions is not None:
        raise ctx.error(where, f"a {role} message is only allowed first", "bad_messages")
      instructions = text(m, "content", where)
    elif role == "user":
      body.append(Message("user", text(m, "content", where)))
    elif role == "assistant":
      thinking = text(m, "thinking", where, required=False)
      content = text(m, "content", where, required=False)
      tool_calls = m.get(opts.tool_calls_field)
      if thinking:
        body.append(_assistant(thinking, "analysis"))
      if tool_calls:
        if not isinstance(tool_calls, list):
          raise ctx.error(f"{where}.{opts.tool_calls_field}", "expected a list", "bad_tool_call")
        if content:  # text beside a call is reasoning towards it, as in gpt-oss's own chat template
          body.append(_assistant(content, "analysis"))
        for j, call in enumerate(tool_calls):
          call_id, name, message = _tool_call(call, f"{where}.{opts.tool_calls_field}[{j}]", opts, ctx)
          if call_id in calls:
            raise ctx.error(f"{where}.{opts.tool_calls_field}[{j}].id", f"duplicate id {call_id!r}",
                            "tool_call_missing_id")
          calls[call_id] = name
          unanswered.append(call_id)
          uses_python |= name == "python"
          if name != "python":
            called_functions.append((name, f"{where}.{opts.tool_calls_field}[{j}]"))
          body.append(message)
      else:
        if content is None:
          raise ctx.error(f"{where}.content", "missing", "missing_field")
        if not content.strip():
          raise ctx.error(f"{where}.content", "empty assistant message", "empty_solution")
        body.append(_assistant(content, "final"))
    elif role == "tool":
      call_id = m.get("tool_call_id")
      if not isinstance(call_id, str) or call_id not in unanswered:
        raise ctx.error(f"{where}.tool_call_id", f"{call_id!r} answers no pending tool call", "tool_reply_without_call")
      unanswered.remove(call_id)
      output = text(m, opts.tool_output_field, where)
      name = calls[call_id]
      if name == "python":
        body.append(Message("python", output, channel="analysis", recipient="assistant"))
      else:
        body.append(Message(f"functions.{name}", output, channel="commentary", recipient="assistant"))
    else:
      raise ctx.error(f"{where}.role", f"unknown role {role!r}", "bad_messages")
  if unanswered:
    raise ctx.error(f"{field}[{len(messages) - 1}].{opts.tool_calls_field}",
                    f"tool call {unanswered[0]!r} has no reply", "tool_call_without_reply")
  if not body or body[-1].author != "assistant":
    raise ctx.error(field, "the conversation does not end with an assistant message", "no_final")
  if declared is not None:
    names = {spec.name for spec in declared}
    for name, where in called_functions:
      if name not in names:
        raise ctx.error(where, f"function {name!r} is called but not declared in {opts.tools_field!r}",
                        "undeclared_function")
  if opts.drop_history_analysis:
    last_user = max((k for k, msg in enumerate(body) if msg.author == "user"), default=-1)
    body = [msg for k, msg in enumerate(body) if k > last_user or msg.channel != "analysis"]
  functions = declared or []
  python = uses_python or opts.python_tool == "always"
  head = [Message("system", system_text(opts, python_tool=python, function_tools=bool(functions)))]
  if instructions is not None or functions:
    head.append(Message("developer", developer_text(instructions, functions)))
  return Conversation(tuple(head + body), tir=uses_python)


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


# ----------------------------------------------------------------------------------------------------------------
# Tokens and the loss mask.


def _backend(tokenizer):
  import tokenizers
  if isinstance(tokenizer, tokenizers.Tokenizer):
    return tokenizer
  backend = getattr(tokenizer, "backend_tokenizer", None)
  if backend is None:
    raise TypeError(f"need a fast (tokenizers-backed) tokenizer, got {type(tokenizer).__name__}")
  return backend


def special_token_ids(tokenizer) -> dict[str, int]:
  """The ids of the harmony special tokens; each must be a single token of the tokenizer."""
  backend = _backend(tokenizer)
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
    import tokenizers
    self.special = special_token_ids(tokenizer)
    # A private copy that encodes special-token text inside content as plain text, as harmony's encode_ordinary.
    self._encoder = tokenizers.Tokenizer.from_str(_backend(tokenizer).to_str())
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
      if k == last and assistant and m.channel == "final":
        end = "<|return|>"
      elif assistant and m.recipient is not None:
        end = "<|call|>"
      else:
        end = "<|end|>"
      pieces.append(([sp[end]], body))
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


def render_text(messages: Iterable[Message], for_training: bool = True) -> str:
  """The conversation as harmony text, special tokens written out (for reading, and for the demo tokenizer)."""
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
    assistant = m.author == "assistant"
    if for_training and k == len(messages) - 1 and assistant and m.channel == "final":
      out.append("<|return|>")
    else:
      out.append("<|call|>" if assistant and m.recipient is not None else "<|end|>")
  return "".join(out)


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


__all__ = ["BadRowError", "Conversation", "HarmonyRenderer", "Message", "PYTHON_TOOL_DESCRIPTION", "RenderOptions",
           "SPECIAL_TOKENS", "format_example", "json_schema_to_typescript", "last_boxed", "messages_conversation",
           "numina_conversation", "render_text", "renderer_for", "row_conversation", "split_solution", "system_text"]
