"""Tokenizers: the real gpt-oss one (Hub id or local dir) and a small demo one built from the shipped sample data.

The demo tokenizer is a byte-level BPE trained on the harmony rendering of `sample/cot.jsonl` and `sample/tir.jsonl`,
with the harmony special tokens as single tokens, so a tiny model can train on the same format as gpt-oss.
A model's `vocab_size` must be at least `vocab_size(tokenizer)`, which is `len(tokenizer)`: DEMO_VOCAB_SIZE for the
demo tokenizer, 200019 for gpt-oss (whose embedding table has 201088 rows).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Iterable

import tokenizers

from numina_jax.data.harmony.conversation import SPECIAL_TOKENS
from numina_jax.data.harmony.tokens import special_token_ids
from numina_jax.data.sources import SAMPLE_DIR

DEMO_TOKENIZER_FILE = SAMPLE_DIR / "demo_tokenizer.json"
DEMO_VOCAB_SIZE = 1024  # total, special tokens included; the demo model's vocab_size
DEMO_NAMES = ("demo", "sample:demo")
_SPECIAL_SPLIT = re.compile("|".join(re.escape(t) for t in SPECIAL_TOKENS))


def vocab_size(tokenizer) -> int:
  """Number of token ids the tokenizer can produce (special tokens included): a model needs at least this many."""
  return len(tokenizer)


def _wrap(backend):
  from transformers import PreTrainedTokenizerFast  # heavy (torch probing): only when a tokenizer is made
  # gpt-oss's own choices: <|return|> ends a completion, <|endoftext|> pads; no BOS is prepended by the renderer.
  return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<|startoftext|>", eos_token="<|return|>",
                                 pad_token="<|endoftext|>")


def demo_tokenizer(path: str | Path | None = None):
  """The project's small tokenizer (DEMO_VOCAB_SIZE ids) as a transformers PreTrainedTokenizerFast."""
  path = Path(path) if path is not None else DEMO_TOKENIZER_FILE
  if not path.is_file():
    raise FileNotFoundError(f"demo tokenizer file not found: {path} (make it with python -m numina_jax.data.make_sample)")
  tok = _wrap(tokenizers.Tokenizer.from_file(str(path)))
  special_token_ids(tok)
  return tok


def load_tokenizer(name_or_path: str):
  """The tokenizer for `name_or_path`: "demo" for the demo tokenizer, else a Hub id or a local directory.

  Checks that every harmony special token is a single token, since the renderer depends on it.
  """
  if name_or_path in DEMO_NAMES:
    return demo_tokenizer()
  from transformers import AutoTokenizer  # heavy: only when a tokenizer is loaded
  local = Path(name_or_path).expanduser()
  if (name_or_path.startswith((".", "/", "~")) or local.exists()) and not local.is_dir():
    raise FileNotFoundError(f"tokenizer directory not found: {name_or_path}")
  tok = AutoTokenizer.from_pretrained(str(local) if local.is_dir() else name_or_path)
  if not getattr(tok, "is_fast", False):
    raise TypeError(f"{name_or_path}: need a fast tokenizer (tokenizer.json), got {type(tok).__name__}")
  special_token_ids(tok)
  return tok


def text_pieces(texts: Iterable[str]) -> Iterable[str]:
  """The ordinary text between special tokens, which is all a BPE should learn merges from."""
  for text in texts:
    for piece in _SPECIAL_SPLIT.split(text):
      if piece:
        yield piece


def train_demo_tokenizer(texts: Iterable[str], vocab: int = DEMO_VOCAB_SIZE):
  """Trains the byte-level BPE (deterministic for the same texts) and returns a tokenizers.Tokenizer."""
  byte_level = tokenizers.pre_tokenizers.ByteLevel
  tok = tokenizers.Tokenizer(tokenizers.models.BPE())
  tok.pre_tokenizer = byte_level(add_prefix_space=False, use_regex=True)
  tok.decoder = tokenizers.decoders.ByteLevel()
  trainer = tokenizers.trainers.BpeTrainer(vocab_size=vocab, min_frequency=2, special_tokens=list(SPECIAL_TOKENS),
                                           initial_alphabet=byte_level.alphabet(), show_progress=False)
  tok.train_from_iterator(list(text_pieces(texts)), trainer=trainer)
  if tok.get_vocab_size() != vocab:
    raise ValueError(f"demo tokenizer came out with {tok.get_vocab_size()} ids, wanted {vocab}: too little text")
  return tok


def demo_tokenizer_json(tok) -> str:
  """Canonical JSON of a trained tokenizer (stable across runs, so the shipped file can be checked)."""
  return json.dumps(json.loads(tok.to_str()), ensure_ascii=False, indent=1, sort_keys=False) + "\n"
