"""The harmony renderer held token for token against openai-harmony 0.0.8 with the real gpt-oss tokenizer."""

import json

import numpy as np

from helpers import require_shared
from numina_jax.data import DEMO_VOCAB_SIZE, default_data_config, demo_tokenizer, format_example
from numina_jax.data import harmony
from numina_jax.data.boxed import last_boxed


def _rows(name):
  path = require_shared(f"data/numina-samples/NuminaMath-{name}.sample.jsonl")
  return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


# -- openai-harmony conversations written by hand, independently of the code under test ---------------------------


def _system(oh, python=False, date="2025-06-28", effort=None):
  content = oh.SystemContent.new()
  if date:
    content = content.with_conversation_start_date(date)
  if effort:
    content = content.with_reasoning_effort(effort)
  if python:
    content = content.with_python_tool()
  return oh.Message.from_role_and_content(oh.Role.SYSTEM, content)


def _user(oh, text):
  return oh.Message.from_role_and_content(oh.Role.USER, text)


def _asst(oh, text, channel, to=None, ctype=None):
  m = oh.Message.from_role_and_content(oh.Role.ASSISTANT, text).with_channel(channel)
  if to:
    m = m.with_recipient(to)
  if ctype:
    m = m.with_content_type(ctype)
  return m


def _tool(oh, name, text, channel):
  return oh.Message.from_author_and_content(oh.Author.new(oh.Role.TOOL, name), text).with_channel(
      channel).with_recipient("assistant")


def _reference(enc, oh, messages):
  conv = oh.Conversation.from_messages(messages)
  return enc.render_conversation_for_training(conv, oh.RenderConversationConfig(auto_drop_analysis=False))


def _reference_mask(ids, harmony_tok):
  """The loss mask of harmony.md derived from the token stream alone: assistant messages from their header on,
  plus their <|start|>assistant when the previous message was also the assistant's."""
  start, message = 200006, 200008
  starts = [i for i, t in enumerate(ids) if t == start]
  mask = [0] * len(ids)
  prev = None
  for n, s in enumerate(starts):
    e = starts[n + 1] if n + 1 < len(starts) else len(ids)
    header = harmony_tok.decode(ids[s + 1:ids.index(message, s)])
    author = header.split("<|channel|>")[0].split(" to=")[0]
    if author == "assistant":
      assert harmony_tok.decode(ids[s + 1:s + 2]) == "assistant"
      for i in range(s if prev == "assistant" else s + 2, e):
        mask[i] = 1
    prev = author
  return mask


def _check(row, expected, harmony_tok, enc, oh, config=None):
  ref = _reference(enc, oh, expected)
  out = format_example(row, harmony_tok, config)
  assert out["input_ids"].dtype == np.int32 and out["loss_mask"].dtype == np.int32
  assert out["input_ids"].tolist() == ref
  assert out["loss_mask"].tolist() == _reference_mask(ref, harmony_tok)
  assert out["loss_mask"][-1] == 1 and out["input_ids"][-1] in (200002, 200012, 200007)
  return out


def _masked_text(out, harmony_tok):
  ids, mask = out["input_ids"], out["loss_mask"]
  return harmony_tok.decode(ids[mask == 1].tolist())


# -- NuminaMath rows --------------------------------------------------------------------------------------------------

COT_BOXED = ["\\boxed{\\frac{13}{6}}", "\\boxed{\\frac{32}{25}}", "\\boxed{4}"]


def test_real_cot_rows_analysis_final(harmony_tok, enc, oh):
  for row, boxed in zip(_rows("CoT"), COT_BOXED):
    expected = [_system(oh), _user(oh, row["problem"]), _asst(oh, row["solution"], "analysis"),
                _asst(oh, boxed, "final")]
    out = _check(row, expected, harmony_tok, enc, oh)
    assert _masked_text(out, harmony_tok) == (f"<|channel|>analysis<|message|>{row['solution']}<|end|>"
                                      f"<|start|>assistant<|channel|>final<|message|>{boxed}<|return|>")
    # The prompt ends at the first <|start|>assistant and carries no loss.
    first = out["loss_mask"].tolist().index(1)
    assert harmony_tok.decode(out["input_ids"][first - 2:first].tolist()) == "<|start|>assistant"
    assert "<|start|>user<|message|>" + row["problem"] in harmony_tok.decode(out["input_ids"][:first].tolist())


def test_real_cot_rows_final_only(harmony_tok, enc, oh):
  cfg = default_data_config()
  cfg.layout = "final_only"
  for row in _rows("CoT"):
    expected = [_system(oh), _user(oh, row["problem"]), _asst(oh, row["solution"], "final")]
    out = _check(row, expected, harmony_tok, enc, oh, cfg)
    assert _masked_text(out, harmony_tok) == f"<|channel|>final<|message|>{row['solution']}<|return|>"


def test_real_tir_row(harmony_tok, enc, oh):
  (row,) = _rows("TIR")
  sol = row["solution"]
  before, rest = sol.split("```python\n", 1)
  code, rest = rest.split("\n```\n```output\n", 1)
  output, after = rest.split("\n```\n", 1)
  assert output == "0.1575"
  expected = [_system(oh, python=True), _user(oh, row["problem"]), _asst(oh, before.strip(), "analysis"),
              _asst(oh, code, "analysis", to="python", ctype="code"), _tool(oh, "python", output, "analysis"),
              _asst(oh, after.strip(), "analysis"), _asst(oh, "\\boxed{\\frac{63}{400}}", "final")]
  out = _check(row, expected, harmony_tok, enc, oh)
  masked = _masked_text(out, harmony_tok)
  assert f" to=python<|channel|>analysis code<|message|>{code}<|call|>" in masked  # the call and its terminator
  assert "python to=assistant" not in masked and "0.1575\n" not in masked  # the tool's reply is not trained
  text = harmony_tok.decode(out["input_ids"].tolist())
  # The <|start|>assistant after the tool reply belongs to the next prompt.
  i = text.index("<|start|>python to=assistant")
  assert "<|end|><|start|>assistant<|channel|>analysis" in text[i:]
  assert "<|call|><|channel|>analysis<|message|>" in masked
  assert masked.endswith("<|start|>assistant<|channel|>final<|message|>\\boxed{\\frac{63}{400}}<|return|>")
  assert "# Tools\n\n## python\n\n" + harmony.PYTHON_TOOL_DESCRIPTION in text


def test_real_numina15_row_without_boxed_goes_to_final(harmony_tok, enc, oh):
  (row,) = _rows("1.5")
  assert row["answer"] == "proof" and last_boxed(row["solution"]) is None
  expected = [_system(oh), _user(oh, row["problem"].strip()), _asst(oh, row["solution"].strip(), "final")]
  _check(row, expected, harmony_tok, enc, oh)


def test_system_options(harmony_tok, enc, oh):
  row = _rows("CoT")[2]
  cfg = default_data_config()
  cfg.reasoning_effort, cfg.system_date, cfg.python_tool = "high", "", "always"
  expected = [_system(oh, python=True, date=None, effort=oh.ReasoningEffort.HIGH), _user(oh, row["problem"]),
              _asst(oh, row["solution"], "analysis"), _asst(oh, "\\boxed{4}", "final")]
  _check(row, expected, harmony_tok, enc, oh, cfg)
  # A description of our own sandbox replaces harmony's text.
  cfg.python_tool_description = "Runs python 3.11 in a sandbox.\nNo network; 5 s limit."
  text = harmony_tok.decode(format_example(row, harmony_tok, cfg)["input_ids"].tolist())
  assert "## python\n\nRuns python 3.11 in a sandbox.\nNo network; 5 s limit.\n\n# Valid channels" in text


def test_own_tir_row_with_two_calls(harmony_tok, enc, oh):
  row = {"problem": " How many divisors does 12 have? ",
         "solution": "List them.\n```python\nd = [k for k in range(1, 13) if 12 % k == 0]\nprint(d)\n```\n"
                     "```output\n[1, 2, 3, 4, 6, 12]\n```\n\n```python\nprint(len(d))\n```\n```output\n6\n\n```\n"
                     "So $\\boxed{6}$ divisors, not \\boxed{7"}
  expected = [_system(oh, python=True), _user(oh, "How many divisors does 12 have?"), _asst(oh, "List them.", "analysis"),
              _asst(oh, "d = [k for k in range(1, 13) if 12 % k == 0]\nprint(d)", "analysis", "python", "code"),
              _tool(oh, "python", "[1, 2, 3, 4, 6, 12]", "analysis"),
              _asst(oh, "print(len(d))", "analysis", "python", "code"), _tool(oh, "python", "6\n", "analysis"),
              _asst(oh, "So $\\boxed{6}$ divisors, not \\boxed{7", "analysis"), _asst(oh, "\\boxed{6}", "final")]
  out = _check(row, expected, harmony_tok, enc, oh)
  # Messages after a tool reply start in the prompt; those after the model's own message start in the loss.
  assert _masked_text(out, harmony_tok) == (
      "<|channel|>analysis<|message|>List them.<|end|><|start|>assistant to=python<|channel|>analysis code<|message|>"
      "d = [k for k in range(1, 13) if 12 % k == 0]\nprint(d)<|call|>"
      " to=python<|channel|>analysis code<|message|>print(len(d))<|call|>"
      "<|channel|>analysis<|message|>So $\\boxed{6}$ divisors, not \\boxed{7<|end|>"
      "<|start|>assistant<|channel|>final<|message|>\\boxed{6}<|return|>")


# -- OpenAI-style tool calls ----------------------------------------------------------------------------------------

SCHEMA = {"type": "object", "description": "Obj desc", "properties": {
    "zeta": {"type": "string", "enum": ["a", "b"], "default": "a", "description": "z desc"},
    "alpha": {"type": ["integer", "null"], "title": "Alpha", "examples": ["1", "2"]},
    "mid": {"type": "array", "items": {"type": "object", "properties": {"x": {"type": "number", "default": 1.5}},
                                       "required": ["x"]}},
    "one": {"description": "d1", "oneOf": [{"type": "string", "description": "d1"},
                                           {"type": "integer", "nullable": True, "default": 3}]},
    "two": {"description": "p", "default": "q", "oneOf": [{"type": "string", "enum": ["u"], "default": "u"},
                                                         {"type": "boolean", "description": "flag"}]},
    "b": {"type": "boolean", "nullable": True}, "free": {}}, "required": ["zeta"]}


def _call(call_id, name, args):
  return {"id": call_id, "type": "function", "function": {"name": name, "arguments": args}}


def test_python_tool_call_messages(harmony_tok, enc, oh):
  row = {"messages": [
      {"role": "system", "content": "Answer with a number."},
      {"role": "user", "content": "What is 2**10?"},
      {"role": "assistant", "content": "Let me compute.", "tool_calls": [_call("c1", "python", '{"code": "print(2**10)"}')]},
      {"role": "tool", "tool_call_id": "c1", "content": "1024\n"},
      {"role": "assistant", "content": "1024", "thinking": "It printed 1024."}]}
  dev = oh.Message.from_role_and_content(oh.Role.DEVELOPER, oh.DeveloperContent.new().with_instructions(
      "Answer with a number."))
  expected = [_system(oh, python=True), dev, _user(oh, "What is 2**10?"), _asst(oh, "Let me compute.", "analysis"),
              _asst(oh, "print(2**10)", "analysis", "python", "code"), _tool(oh, "python", "1024\n", "analysis"),
              _asst(oh, "It printed 1024.", "analysis"), _asst(oh, "1024", "final")]
  _check(row, expected, harmony_tok, enc, oh)


def test_function_calls_with_declared_tools(harmony_tok, enc, oh):
  tools = [{"type": "function", "function": {"name": "lookup", "description": "Look a value up.\nSecond line.",
                                             "parameters": SCHEMA}},
           {"type": "function", "function": {"name": "now", "description": ""}}]
  row = {"tools": tools, "messages": [
      {"role": "user", "content": "Use the tools."},
      {"role": "assistant", "content": None, "tool_calls": [_call("a", "lookup", '{"zeta": "b"}'),
                                                           _call("b", "now", "{}")]},
      {"role": "tool", "tool_call_id": "b", "content": "2025-01-01"},
      {"role": "tool", "tool_call_id": "a", "content": '{"value": 3}'},
      {"role": "assistant", "content": "Done: 3."}]}
  dev = oh.Message.from_role_and_content(oh.Role.DEVELOPER, oh.DeveloperContent.new().with_function_tools([
      oh.ToolDescription.new("lookup", "Look a value up.\nSecond line.", SCHEMA), oh.ToolDescription.new("now", "")]))
  expected = [_system(oh), dev, _user(oh, "Use the tools."),
              _asst(oh, '{"zeta": "b"}', "commentary", "functions.lookup", "<|constrain|>json"),
              _asst(oh, "{}", "commentary", "functions.now", "<|constrain|>json"),
              _tool(oh, "functions.now", "2025-01-01", "commentary"),
              _tool(oh, "functions.lookup", '{"value": 3}', "commentary"), _asst(oh, "Done: 3.", "final")]
  out = _check(row, expected, harmony_tok, enc, oh)
  text = harmony_tok.decode(out["input_ids"].tolist())
  assert "Calls to these tools must go to the commentary channel: 'functions'." in text
  masked = _masked_text(out, harmony_tok)
  # The second call directly follows the first: same generation, so its <|start|>assistant carries loss.
  assert masked.startswith(' to=functions.lookup<|channel|>commentary <|constrain|>json<|message|>{"zeta": "b"}'
                           '<|call|><|start|>assistant to=functions.now')
  assert "2025-01-01" not in masked


def test_multi_turn_drops_history_analysis(harmony_tok, enc, oh):
  row = {"messages": [
      {"role": "user", "content": "q1"},
      {"role": "assistant", "thinking": "think1", "content": "a1"},
      {"role": "user", "content": "q2"},
      {"role": "assistant", "content": "step", "tool_calls": [_call("x", "python", '{"code": "print(1)"}')]},
      {"role": "tool", "tool_call_id": "x", "content": "1"},
      {"role": "assistant", "thinking": "think2", "content": "a2"}]}
  tail = [_user(oh, "q2"), _asst(oh, "step", "analysis"), _asst(oh, "print(1)", "analysis", "python", "code"),
          _tool(oh, "python", "1", "analysis"), _asst(oh, "think2", "analysis"), _asst(oh, "a2", "final")]
  _check(row, [_system(oh, python=True), _user(oh, "q1"), _asst(oh, "a1", "final")] + tail, harmony_tok, enc, oh)
  cfg = default_data_config()
  cfg.drop_history_analysis = False
  _check(row, [_system(oh, python=True), _user(oh, "q1"), _asst(oh, "think1", "analysis"), _asst(oh, "a1", "final")]
         + tail, harmony_tok, enc, oh, cfg)


def test_schema_typescript_matches_harmony(enc, oh):
  schemas = [SCHEMA, {"type": "object", "properties": {}}, {"oneOf": [{"type": "string"}, {"type": "number",
                                                                                            "description": "n"}]},
             {"type": "array"}, {"type": "object", "properties": {"e": {"type": "string", "enum": ["x", "y"],
                                                                        "default": "y"}}}]
  for schema in schemas:
    dev = oh.DeveloperContent.new().with_function_tools([oh.ToolDescription.new("f", "d", schema)])
    ref = enc.decode(enc.render(oh.Message.from_role_and_content(oh.Role.DEVELOPER, dev)))
    ours = "<|start|>developer<|message|>" + harmony.developer_text(None, [harmony.ToolSpec("f", "d", schema)]) + \
        "<|end|>"
    assert ours == ref


def test_special_tokens_in_content_are_text(harmony_tok, enc, oh):
  row = {"problem": "Is <|end|> a token?", "solution": "No: here it is text <|return|>. $\\boxed{0}$"}
  expected = [_system(oh), _user(oh, row["problem"]), _asst(oh, row["solution"], "analysis"),
              _asst(oh, "\\boxed{0}", "final")]
  out = _check(row, expected, harmony_tok, enc, oh)
  assert (out["input_ids"] == 200007).sum() == 3  # system, user and analysis terminators only


# -- the demo tokenizer renders the same structure -------------------------------------------------------------------


def test_demo_tokenizer_renders_harmony():
  demo = demo_tokenizer()
  assert len(demo) == DEMO_VOCAB_SIZE == 1024
  ids = harmony.special_token_ids(demo)
  assert len(set(ids.values())) == len(harmony.SPECIAL_TOKENS)
  row = {"problem": "Compute $2 + 3$.", "solution": "Add: $2 + 3 = 5$.\n```python\nprint(2 + 3)\n```\n"
                                                    "```output\n5\n```\nSo $\\boxed{5}$."}
  out = format_example(row, demo)
  conv = harmony.row_conversation(row, harmony.RenderOptions())
  assert demo.decode(out["input_ids"].tolist()) == harmony.render_text(conv.messages)
  assert out["input_ids"][-1] == ids["<|return|>"] and out["loss_mask"][-1] == 1
  masked = demo.decode(out["input_ids"][out["loss_mask"] == 1].tolist())
  assert masked == ("<|channel|>analysis<|message|>Add: $2 + 3 = 5$.<|end|><|start|>assistant to=python"
                    "<|channel|>analysis code<|message|>print(2 + 3)<|call|><|channel|>analysis<|message|>"
                    "So $\\boxed{5}$.<|end|><|start|>assistant<|channel|>final<|message|>\\boxed{5}<|return|>")


def test_split_solution_rules():
  segs = harmony.split_solution("  intro \n```python\na = 1\n\nprint(a)\n```\n```output\n1\n```\n\n  end  ")
  assert segs == [("prose", "intro"), ("code", "a = 1\n\nprint(a)"), ("output", "1"), ("prose", "end")]
  assert harmony.split_solution("```python\n```\n```output\n```") == [("code", ""), ("output", "")]
  assert last_boxed("\\boxed{a} and \\boxed{\\frac{1}{2}} then \\boxed{x") == "\\boxed{\\frac{1}{2}}"
  assert last_boxed("no answer") is None
