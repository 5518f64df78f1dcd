"""The system and developer messages as openai-harmony writes them: model identity, dates, reasoning effort, the
python tool, the valid channels, and the `# Tools` namespaces of declared functions."""

from __future__ import annotations

import dataclasses
from typing import Sequence

from numina_jax.data.harmony.options import RenderOptions
from numina_jax.data.harmony.typescript import json_schema_to_typescript

# openai-harmony's default description of its built-in python tool, byte for byte.
PYTHON_TOOL_DESCRIPTION = (
    "Use this tool to execute Python code in your chain of thought. The code will not be shown to the user. This tool "
    "should be used for internal reasoning, but not for code that is intended to be visible to the user (e.g. when "
    "creating plots, tables, or files).\n\nWhen you send a message containing Python code to python, it will be "
    "executed in a stateful Jupyter notebook environment. python will respond with the output of the execution or time "
    "out after 120.0 seconds. The drive at '/mnt/data' can be used to save and persist user files. Internet access for "
    "this session is UNKNOWN. Depends on the cluster.")
VALID_CHANNELS = ("analysis", "commentary", "final")


@dataclasses.dataclass(frozen=True)
class ToolSpec:
  name: str
  description: str = ""
  parameters: dict | None = None


def _rust_lines(text: str) -> list[str]:
  """str::lines() of Rust, which harmony uses: split at \\n, drop one trailing empty line and a trailing \\r."""
  lines = text.split("\n")
  if lines and lines[-1] == "":
    lines.pop()
  return [line[:-1] if line.endswith("\r") else line for line in lines]


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
