"""OpenAI-style chat rows as harmony conversations: `messages` with `tool_calls` and `role: tool` replies, and the
functions declared in `tools`; python calls go to the built-in python tool, others to `functions.NAME`."""

from __future__ import annotations

import json
import re
from typing import Any

from numina_jax.data.errors import RowContext
from numina_jax.data.harmony.conversation import CONSTRAIN, Conversation, Message, assistant
from numina_jax.data.harmony.options import RenderOptions
from numina_jax.data.harmony.system import ToolSpec, developer_text, system_text

_FUNCTION_NAME = re.compile(r"^[A-Za-z0-9_\-.]+$")


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
    fn = fn if isinstance(fn, dict) else {}
    name = fn.get("name")
    if not isinstance(name, str) or not _FUNCTION_NAME.match(name):
      raise ctx.error(f"{field}[{i}]", "a tool declaration needs a name (letters, digits, _ - .)", "bad_tools")
    description = fn.get("description")
    parameters = fn.get("parameters")
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
    return call_id, name, assistant(code, "analysis", recipient="python", content_type="code")
  return call_id, name, assistant(text, "commentary", recipient=f"functions.{name}", content_type=CONSTRAIN + "json")


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
    return ctx.string(m, key, f"{where}.{key}", required)

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
        body.append(assistant(thinking, "analysis"))
      if tool_calls:
        if not isinstance(tool_calls, list):
          raise ctx.error(f"{where}.{opts.tool_calls_field}", "expected a list", "bad_tool_call")
        if content:  # text beside a call is reasoning towards it, as in gpt-oss's own chat template
          body.append(assistant(content, "analysis"))
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
        body.append(assistant(content, "final"))
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
