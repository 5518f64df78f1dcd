"""The SC-TIR harmony codec held against openai-harmony 0.0.8 on real gpt-oss token ids: completions parsed into the
same messages, prompts and tool replies rendered to the same tokens."""

import random

import pytest

from numina_jax.data.harmony import PYTHON_TOOL_DESCRIPTION, RenderOptions
from numina_jax.eval.completion import CompletionCodec, ParsedMessage, parse_header

TEMPLATE = "Solve: {problem}\nPut the answer in \\boxed{}."


@pytest.fixture(scope="module")
def codec(harmony_tok):
  return CompletionCodec(harmony_tok)


def _ids(harmony_tok, text):
  return harmony_tok.encode(text, add_special_tokens=False)


def _reference(enc, oh, ids):
  """openai-harmony's parse, as (author, recipient, channel, content_type, content) per message."""
  out = []
  for m in enc.parse_messages_from_completion_tokens(ids, oh.Role.ASSISTANT):
    author = m.author.name if m.author.role == oh.Role.TOOL else m.author.role.value
    out.append((author, m.recipient, m.channel, m.content_type, m.content[0].text if m.content else ""))
  return out


def _ours(parsed):
  return [(m.author, m.recipient, m.channel, m.content_type, m.content) for m in parsed.messages]


COMPLETIONS = [
    # (completion text, terminators of its messages)
    ("<|channel|>analysis<|message|>Compute 3^20.<|end|><|start|>assistant<|channel|>analysis to=python code"
     "<|message|>print(3**20)<|call|>", ["<|end|>", "<|call|>"]),
    (" to=python<|channel|>analysis code<|message|>import sympy\nprint(sympy.factorint(2**32 + 1))<|call|>",
     ["<|call|>"]),
    ("<|channel|>final<|message|>The answer is $\\boxed{\\frac{63}{400}}$.<|return|>", ["<|return|>"]),
    ("<|channel|>commentary to=functions.lookup <|constrain|>json<|message|>{\"q\": \"x\"}<|call|>", ["<|call|>"]),
    ("<|channel|>analysis<|message|>Unicode: é ∑ 🎉 — 数学<|end|>"
     "<|start|>assistant<|channel|>final<|message|>42<|return|>", ["<|end|>", "<|return|>"]),
    ("<|channel|>analysis<|message|>hm<|end|><|start|>python to=assistant<|channel|>analysis<|message|>7\n<|end|>",
     ["<|end|>", "<|end|>"]),
    ("<|channel|>analysis<|message|>special tokens in content: <|channel|> and <|constrain|> stay text<|end|>",
     ["<|end|>"]),
    ("<|channel|>final<|message|>cut off in the midd", [None]),
    ("<|channel|>analysis<|message|>done<|end|>", ["<|end|>"]),
    ("<|message|>no channel at all<|return|>", ["<|return|>"]),
]


@pytest.mark.parametrize("text, terminators", COMPLETIONS)
def test_parse_equals_openai_harmony(harmony_tok, enc, oh, codec, text, terminators):
  ids = _ids(harmony_tok, text)
  parsed = codec.parse(ids)
  assert parsed.error is None
  assert _ours(parsed) == _reference(enc, oh, ids)
  assert [m.terminator for m in parsed.messages] == terminators


def test_parse_fields_by_hand(harmony_tok, codec):
  text = COMPLETIONS[0][0]
  think, call = codec.parse(_ids(harmony_tok, text)).messages
  assert think == ParsedMessage("assistant", "Compute 3^20.", "analysis", None, None, "<|end|>")
  assert call == ParsedMessage("assistant", "print(3**20)", "analysis", "python", "code", "<|call|>")
  assert codec.stop_token_ids == (200002, 200012)


@pytest.mark.parametrize("text, why", [
    ("<|channel|>analysis<|message|>a<|end|>oops", "must open with <|start|>"),
    ("<|channel|>analysis<|message|>a<|end|><|start|>wizard<|message|>b<|end|>", "unknown role 'wizard'"),
    ("<|channel|>analysis to=python code extra<|message|>x<|call|>", "unexpected words in message header"),
    ("<|channel|>analysis to=pyth", "ended inside a message header"),
    ("", "ended inside a message header"),
    ("<|channel|><|message|>x<|end|>", "no channel name"),
])
def test_malformed_where_harmony_refuses(harmony_tok, enc, oh, codec, text, why):
  ids = _ids(harmony_tok, text)
  with pytest.raises(Exception):
    enc.parse_messages_from_completion_tokens(ids, oh.Role.ASSISTANT)
  parsed = codec.parse(ids)
  assert parsed.error is not None and why in parsed.error


def test_parse_agrees_with_harmony_on_random_token_soup(harmony_tok, enc, oh, codec):
  """Random sequences of harmony's pieces: where harmony parses, the messages are equal; where it refuses, ours
  reports an error. One difference by design: a terminator inside a header is an error here, while harmony keeps
  it as header text (its strict mode)."""
  pieces = ["<|start|>", "<|end|>", "<|call|>", "<|return|>", "<|message|>", "<|channel|>", "<|constrain|>",
            "assistant", "python", " to=python", " code", "analysis", "final", " json", "hello", " ", "x=1",
            "to=functions.f", "user", " é"]
  rng = random.Random(0)
  agree = refused = 0
  terminators = {200002, 200007, 200012}
  for _ in range(600):
    ids = _ids(harmony_tok, "".join(rng.choice(pieces) for _ in range(rng.randint(1, 12))))
    parsed = codec.parse(ids)
    try:
      reference = _reference(enc, oh, ids)
    except Exception:  # noqa: BLE001 - harmony's refusal is a pyo3 error
      assert parsed.error is not None, ids
      refused += 1
      continue
    if parsed.error is None:
      assert _ours(parsed) == reference, ids
      agree += 1
    else:
      assert "before <|message|>" in parsed.error and terminators & set(ids), (ids, parsed.error)
  assert agree > 20 and refused > 200


def test_parse_header_rules():
  assert parse_header("<|channel|>analysis to=python code", "assistant") == ("assistant", "python", "analysis", "code")
  assert parse_header(" to=python<|channel|>analysis code", "assistant") == ("assistant", "python", "analysis", "code")
  assert parse_header("python to=assistant<|channel|>analysis", None) == ("python", "assistant", "analysis", None)
  assert parse_header("assistant<|channel|>final", None) == ("assistant", None, "final", None)
  assert parse_header("<|channel|>commentary to=functions.f<|constrain|>json", "assistant") == (
      "assistant", "functions.f", "commentary", "<|constrain|>json")


def _system(oh, effort, description=None):
  content = oh.SystemContent.new().with_conversation_start_date("2025-06-28").with_reasoning_effort(effort)
  if description is None:
    return content.with_python_tool()
  return content.with_tools(oh.ToolNamespaceConfig(name="python", description=description, tools=[]))


@pytest.mark.parametrize("effort, description", [("medium", None), ("high", "Our sandbox.\nNo network; 5 s.")])
def test_prompt_equals_harmony_render(harmony_tok, enc, oh, codec, effort, description):
  problem = "Find $x$ if $x^2 = 49$ and $x > 0$."
  conv = oh.Conversation.from_messages([
      oh.Message.from_role_and_content(oh.Role.SYSTEM, _system(oh, getattr(oh.ReasoningEffort, effort.upper()),
                                                               description)),
      oh.Message.from_role_and_content(oh.Role.USER, TEMPLATE.replace("{problem}", problem))])
  reference = enc.render_conversation_for_completion(conv, oh.Role.ASSISTANT)
  opts = RenderOptions(reasoning_effort=effort, python_tool_description=description or "")
  assert codec.prompt(problem, user_template=TEMPLATE, opts=opts) == reference
  if description is None:
    assert PYTHON_TOOL_DESCRIPTION in harmony_tok.decode(reference)


def test_tool_reply_equals_harmony_render(harmony_tok, enc, oh, codec):
  output = "Traceback (most recent call last):\n  File \"<cell>\", line 1\nZeroDivisionError: division by zero"
  message = oh.Message.from_author_and_content(oh.Author.new(oh.Role.TOOL, "python"), output).with_channel(
      "analysis").with_recipient("assistant")
  reference = enc.render_conversation_for_completion(oh.Conversation.from_messages([message]), oh.Role.ASSISTANT)
  assert codec.tool_reply("python", output, "analysis") == reference
  text = harmony_tok.decode(reference)
  assert text == f"<|start|>python to=assistant<|channel|>analysis<|message|>{output}<|end|><|start|>assistant"
