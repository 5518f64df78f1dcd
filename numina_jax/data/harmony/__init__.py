"""Harmony rendering of NuminaMath rows and OpenAI-style conversations, with the loss mask of harmony.md.

`rows` sends a row to `numina` or `openai_messages`, which build a `conversation` (`system` and `typescript` write
its system and developer text, per `options`); `tokens` encodes it to ids and loss mask, `text` to harmony text.
"""

from numina_jax.data.harmony.conversation import SPECIAL_TOKENS, Conversation, Message
from numina_jax.data.harmony.numina import numina_conversation, split_solution
from numina_jax.data.harmony.openai_messages import messages_conversation
from numina_jax.data.harmony.options import LAYOUTS, REASONING_EFFORTS, RenderOptions
from numina_jax.data.harmony.rows import format_example, row_conversation
from numina_jax.data.harmony.system import PYTHON_TOOL_DESCRIPTION, ToolSpec, developer_text, system_text
from numina_jax.data.harmony.text import render_text
from numina_jax.data.harmony.tokens import HarmonyRenderer, backend_tokenizer, renderer_for, special_token_ids
from numina_jax.data.harmony.typescript import json_schema_to_typescript

__all__ = ["Conversation", "HarmonyRenderer", "LAYOUTS", "Message", "PYTHON_TOOL_DESCRIPTION", "REASONING_EFFORTS",
           "RenderOptions", "SPECIAL_TOKENS", "ToolSpec", "backend_tokenizer", "developer_text", "format_example",
           "json_schema_to_typescript", "messages_conversation", "numina_conversation", "render_text",
           "renderer_for", "row_conversation", "special_token_ids", "split_solution", "system_text"]
