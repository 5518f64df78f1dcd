"""Rows per second through render + tokenize + pack on CPU, against openai-harmony's renderer with the same packer.

  python benchmarks/bench_data.py                 # the real gpt-oss tokenizer if ../shared exists, else the demo one
  python benchmarks/bench_data.py --rows 4000 --seq-len 2048

Rows are the shipped sample (CoT and TIR) plus the real NuminaMath rows of ../shared, repeated to --rows.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from numina_jax.data import demo_tokenizer, harmony, packing  # noqa: E402
from numina_jax.data.make_sample import read_jsonl  # noqa: E402
from numina_jax.data.sources import SAMPLES  # noqa: E402

SHARED = Path(os.environ.get("NUMINA_SHARED", Path(__file__).resolve().parents[2] / "shared"))


def load_rows(n: int) -> list[dict]:
  rows = read_jsonl(SAMPLES["sample:cot"]) + read_jsonl(SAMPLES["sample:tir"])
  real = SHARED / "data" / "numina-samples"
  if real.is_dir():
    for path in sorted(real.glob("*.jsonl")):
      rows += read_jsonl(path) * 50  # long real solutions weigh in like real data
  rng = np.random.default_rng(0)
  rows = [rows[i] for i in rng.permutation(len(rows))]
  return list(itertools.islice(itertools.cycle(rows), n))


def pack_and_assemble(docs, seq_len: int, batch: int) -> int:
  blocks = list(packing.pack_documents(iter(docs), seq_len))
  for i in range(0, len(blocks), batch):
    packing.assemble(blocks[i:i + batch], seq_len, batch)
  return len(blocks)


def ours(rows, tok, seq_len: int, batch: int, chunk: int = 512) -> float:
  opts = harmony.RenderOptions()
  renderer = harmony.renderer_for(tok)
  t = time.perf_counter()
  docs = []
  for i in range(0, len(rows), chunk):
    convs = [harmony.row_conversation(r, opts).messages for r in rows[i:i + chunk]]
    docs += renderer.encode(convs)
  pack_and_assemble(docs, seq_len, batch)
  return time.perf_counter() - t


def openai_harmony(rows, seq_len: int, batch: int) -> float | None:
  tiktoken = SHARED / "tokenizers" / "tiktoken"
  if not tiktoken.is_dir():
    return None
  os.environ["TIKTOKEN_ENCODINGS_BASE"] = str(tiktoken)
  try:
    import openai_harmony as oh
  except ImportError:
    return None
  enc = oh.load_harmony_encoding(oh.HarmonyEncodingName.HARMONY_GPT_OSS)
  cfg = oh.RenderConversationConfig(auto_drop_analysis=False)
  opts = harmony.RenderOptions()

  def convert(messages):
    out = []
    for m in messages:
      if m.author in ("system", "developer", "user", "assistant"):
        msg = oh.Message.from_role_and_content(oh.Role(m.author), m.content)
      else:
        msg = oh.Message.from_author_and_content(oh.Author.new(oh.Role.TOOL, m.author), m.content)
      msg = msg.with_channel(m.channel) if m.channel else msg
      msg = msg.with_recipient(m.recipient) if m.recipient else msg
      out.append(msg.with_content_type(m.content_type) if m.content_type else msg)
    return oh.Conversation.from_messages(out)

  t = time.perf_counter()
  docs = []
  for r in rows:
    ids = np.asarray(enc.render_conversation_for_training(convert(harmony.row_conversation(r, opts).messages), cfg),
                     np.int32)
    docs.append((ids, np.ones(len(ids), np.uint8)))  # harmony gives no loss mask
  pack_and_assemble(docs, seq_len, batch)
  return time.perf_counter() - t


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--rows", type=int, default=3000)
  parser.add_argument("--seq-len", type=int, default=2048)
  parser.add_argument("--batch", type=int, default=32)
  parser.add_argument("--tokenizer", default="", help="tokenizer dir or Hub id (default: ../shared gpt-oss, else demo)")
  args = parser.parse_args()
  name = args.tokenizer or (str(SHARED / "hf" / "gpt-oss-20b") if (SHARED / "hf" / "gpt-oss-20b").is_dir() else "demo")
  if name == "demo":
    tok = demo_tokenizer()
  else:
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(name)
  rows = load_rows(args.rows)
  harmony.renderer_for(tok)  # built once per process; not part of the per-row cost
  ours(rows[:200], tok, args.seq_len, args.batch)  # warm-up
  t_ours = ours(rows, tok, args.seq_len, args.batch)
  print(json.dumps({"tokenizer": name, "rows": len(rows), "seq_len": args.seq_len, "cpus": os.cpu_count()}))
  print(f"numina_jax render+tokenize+pack: {len(rows) / t_ours:,.0f} rows/s ({t_ours:.2f} s)")
  if name != "demo":
    t_oh = openai_harmony(rows, args.seq_len, args.batch)
    if t_oh is not None:
      print(f"openai-harmony render + same packing: {len(rows) / t_oh:,.0f} rows/s ({t_oh:.2f} s); "
            f"ours is {t_oh / t_ours:.2f}x its speed")


if __name__ == "__main__":
  main()
