"""A test double of the model for SC-TIR: per (problem id, trace, round), the harmony text it "samples".

Requests are recognised by their seed (`sctir.trace_seed`), as a real backend's samples would be by theirs. The text
is tokenized with special tokens, then treated as a sampler treats a model's output: it stops after the first stop
token, and is cut at `max_tokens`; text that neither stops nor reaches `max_tokens` goes on with filler (" la")
until it does, as a model that never stops would.
"""

from __future__ import annotations

from typing import Callable, Mapping

from numina_jax.eval.sctir import trace_seed
from numina_jax.sampling.types import Completion

Script = Mapping[tuple[str, int, int], str] | Callable[[str, int, int], str]


class ScriptedSampler:
  def __init__(self, tokenizer, script: Script, problem_ids, *, samples: int, rounds: int, seed: int = 0):
    self.tokenizer = tokenizer
    self.script = script
    self.by_seed = {trace_seed(seed, pid, i, r): (pid, i, r)
                    for pid in problem_ids for i in range(samples) for r in range(1, rounds + 2)}
    self.requests: list[list[tuple[str, int, int]]] = []  # per generate call, the (problem, trace, round) sent
    self.prompts: dict[tuple[str, int, int], list[int]] = {}
    self.params: dict[tuple[str, int, int], object] = {}
    self.filler = tokenizer.encode(" la", add_special_tokens=False)

  def text(self, key) -> str:
    return self.script(*key) if callable(self.script) else self.script[key]

  def generate(self, prompts, params):
    params = list(params) if isinstance(params, (list, tuple)) else [params] * len(prompts)
    keys, out = [], []
    for prompt, sp in zip(prompts, params):
      assert sp.n == 1, "SC-TIR asks one completion per trace"
      key = self.by_seed.get(sp.seed)
      assert key is not None, f"a request with a seed no trace of the script has: {sp.seed}"
      assert key not in self.prompts, f"{key} was requested twice"
      keys.append(key)
      self.prompts[key] = list(prompt)
      self.params[key] = sp
      ids = self.tokenizer.encode(self.text(key), add_special_tokens=False)
      stop = next((i for i, t in enumerate(ids) if t in sp.stop_token_ids), None)
      if stop is not None and stop < sp.max_tokens:
        out.append([Completion(ids[:stop + 1], "stop")])
        continue
      while len(ids) < sp.max_tokens:
        ids += self.filler
      out.append([Completion(ids[:sp.max_tokens], "length")])
    self.requests.append(keys)
    return out
