"""The `data` section of a training config: every field of the data path, with its default, and reading one."""

from __future__ import annotations

import ml_collections

# openai-harmony's defaults for the first lines of the system message; gpt-oss was trained with them.
DEFAULT_MODEL_IDENTITY = "You are ChatGPT, a large language model trained by OpenAI."
DEFAULT_KNOWLEDGE_CUTOFF = "2024-06"


def default_data_config() -> ml_collections.ConfigDict:
  """Returns the data config with every field defined; the trainer embeds it as `config.data`."""
  c = ml_collections.ConfigDict()
  c.tokenizer = "demo"  # "demo" (the project's small tokenizer), or a Hub id / local dir such as openai/gpt-oss-20b
  # Where rows come from.
  c.dataset_name = "sample:cot"  # hub id (AI-MO/NuminaMath-CoT), local .jsonl/.json/.parquet file or dir, "tfds:NAME", "sample:cot"/"sample:tir"
  c.dataset_config = ""  # hub dataset config name; "" = the default config
  c.split = "train"  # split read from hub or tfds sources (a local file or directory is a single split)
  c.mixture = ()  # weighted sources, dicts (name, weight (default 1), optional config/split/field overrides) or "NAME=WEIGHT"; () = dataset_name alone
  # How a row maps to a conversation.
  c.row_format = "auto"  # "numina" (question/answer fields), "messages" (OpenAI messages), "auto" (numina if the question field exists)
  c.question_field = "problem"  # field holding the problem, rendered as the user message
  c.answer_field = "solution"  # field holding the solution: CoT prose, or TIR prose with ```python / ```output fences
  c.messages_field = "messages"  # field holding OpenAI-style messages (row_format "messages")
  c.tools_field = "tools"  # field holding OpenAI-style function declarations, rendered in the developer message
  c.tool_calls_field = "tool_calls"  # key of an assistant message's list of tool calls
  c.tool_name_field = "name"  # key of a tool call's function name
  c.tool_input_field = "arguments"  # key of a tool call's arguments (a JSON object, usually as a string)
  c.tool_output_field = "content"  # key of a tool reply's text
  # Row filters (the NuminaMath-1.5 columns; rows without the column pass).
  c.require_valid = True  # drop rows whose problem_is_valid or solution_is_valid is not "Yes"
  c.drop_answers = ("proof", "notfound")  # drop rows whose `answer` is one of these sentinels
  c.allowed_sources = ()  # keep only rows whose `source` is listed; () = keep all
  c.on_bad_row = "error"  # malformed row: "error" (raise, naming dataset, row and field) or "skip" (counted in stats)
  # Held-out evaluation split.
  c.eval_size = 0.02  # held-out rows, drawn before filtering: a fraction (< 1) of each source, or a count (>= 1) spread over sources by size
  c.eval_seed = 0  # seed of the held-out choice, separate from the shuffle seed so the eval set never moves
  c.eval_dataset_name = ""  # a separate eval source instead of a held-out split; "" = hold out from the train sources
  c.eval_split = "test"  # split of eval_dataset_name
  # Harmony rendering (harmony.md section 2).
  c.layout = "analysis_final"  # CoT rows: "analysis_final" (solution as analysis, \boxed{} as final) or "final_only"
  c.system_date = "2025-06-28"  # "Current date:" of the system message, fixed so tokens are reproducible; "" = no date line
  c.reasoning_effort = "medium"  # "Reasoning:" of the system message: low, medium or high
  c.model_identity = DEFAULT_MODEL_IDENTITY  # first line of the system message
  c.knowledge_cutoff = DEFAULT_KNOWLEDGE_CUTOFF  # "Knowledge cutoff:" of the system message; "" = no line
  c.python_tool = "auto"  # declare the python tool in the system message: "auto" (rows that call it) or "always"
  c.python_tool_description = ""  # the python tool's text, the model's only knowledge of its sandbox; "" = openai-harmony's
  c.drop_history_analysis = True  # multi-turn rows: drop the analysis of earlier, finished turns, as at inference
  # Packing and iteration.
  c.overlong = "skip"  # a document longer than seq_len: "skip" (counted in stats) or "error"; never cut
  c.pack_window = 2048  # documents of one row slot packed together, best-fit-decreasing; larger packs tighter
  c.shuffle = True  # reshuffle each row slot's documents every epoch from make_pipeline's seed (no shuffle buffer)
  c.stream_epochs = 0  # passes the train stream makes, then it ends; 0 = endless (the trainer counts its own epochs)
  c.prefetch = 2  # batches prepared ahead by grain's prefetch thread; 0 = none
  # Tokenization cache.
  c.cache_dir = ""  # tokenized-data cache, a folder per row slot's shard of a source, each host its own; "" = $NUMINA_JAX_CACHE or ~/.cache/numina_jax/tokenized
  c.tokenize_batch_size = 512  # rows rendered and tokenized per call
  c.progress_bar = True  # show a tqdm bar while tokenizing
  return c


def get(config, name: str):
  """One field of a data config (a ConfigDict or dict; None stands for default_data_config()).

  A field missing from a given config is an error naming it, not a silent default: a config built by hand with a
  misspelled field would otherwise run with the default.
  """
  if config is None:
    return _DEFAULTS[name]
  try:
    return config[name]
  except (KeyError, AttributeError):
    raise ValueError(f"config.data.{name}: missing from the data config; start from default_data_config(), which "
                     f"defines every field") from None


_DEFAULTS = default_data_config().to_dict()
