"""The rendering part of the data config (harmony.md section 2), read and checked once per source."""

from __future__ import annotations

import dataclasses

from numina_jax.data import config as data_config

LAYOUTS = ("analysis_final", "final_only")
REASONING_EFFORTS = ("low", "medium", "high")
PYTHON_TOOL_MODES = ("auto", "always")
ROW_FORMATS = ("auto", "numina", "messages")
_D = data_config.default_data_config()  # the one definition of every default


@dataclasses.dataclass(frozen=True)
class RenderOptions:
  """How rows become harmony conversations; each field is the data-config field of the same name."""

  row_format: str = _D.row_format
  question_field: str = _D.question_field
  answer_field: str = _D.answer_field
  messages_field: str = _D.messages_field
  tools_field: str = _D.tools_field
  tool_calls_field: str = _D.tool_calls_field
  tool_name_field: str = _D.tool_name_field
  tool_input_field: str = _D.tool_input_field
  tool_output_field: str = _D.tool_output_field
  layout: str = _D.layout
  system_date: str = _D.system_date
  reasoning_effort: str = _D.reasoning_effort
  model_identity: str = _D.model_identity
  knowledge_cutoff: str = _D.knowledge_cutoff
  python_tool: str = _D.python_tool
  python_tool_description: str = _D.python_tool_description
  drop_history_analysis: bool = _D.drop_history_analysis

  @classmethod
  def from_config(cls, config=None, **overrides) -> "RenderOptions":
    """The options of a data config (None: the defaults), with per-source `overrides` (None values ignored)."""
    values = {f.name: data_config.get(config, f.name) for f in dataclasses.fields(cls)}
    values.update({k: v for k, v in overrides.items() if v is not None})
    opts = cls(**values)
    opts.validate()
    return opts

  def validate(self) -> None:
    for field, allowed in (("layout", LAYOUTS), ("reasoning_effort", REASONING_EFFORTS),
                           ("python_tool", PYTHON_TOOL_MODES), ("row_format", ROW_FORMATS)):
      if getattr(self, field) not in allowed:
        raise ValueError(f"data.{field} must be one of {allowed}, got {getattr(self, field)!r}")

  def key(self) -> dict:
    return dataclasses.asdict(self)
