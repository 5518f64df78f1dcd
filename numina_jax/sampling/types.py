"""The sampler interface shared by every backend: prompts as token ids in, completions as token ids out."""

from __future__ import annotations

import dataclasses
import math
from typing import Protocol, Sequence

FINISH_REASONS = ("stop", "length")


@dataclasses.dataclass(frozen=True)
class SamplingParams:
  n: int = 1  # completions per prompt
  max_tokens: int = 2048  # most new tokens per completion
  temperature: float = 1.0  # 0 = greedy (then n must be 1: greedy samples are all the same)
  top_p: float = 1.0  # nucleus sampling: keep the smallest set of tokens whose probability reaches top_p
  seed: int | None = None  # the same seed, prompt and params give the same completions on the same backend
  stop_token_ids: tuple[int, ...] = ()  # a completion ends after emitting one of these (it is kept in token_ids)
  logprobs: bool = False  # also return the log-probability of each sampled token

  def __post_init__(self):
    object.__setattr__(self, "stop_token_ids", tuple(int(t) for t in self.stop_token_ids))
    self.validate()

  def validate(self) -> None:
    def need(ok: bool, field: str, msg: str):
      if not ok:
        raise ValueError(f"SamplingParams.{field}: {msg}")

    need(isinstance(self.n, int) and self.n >= 1, "n", f"must be an integer >= 1, got {self.n!r}")
    need(isinstance(self.max_tokens, int) and self.max_tokens >= 1, "max_tokens",
         f"must be an integer >= 1, got {self.max_tokens!r}")
    need(math.isfinite(self.temperature) and self.temperature >= 0, "temperature",
         f"must be >= 0, got {self.temperature!r}")
    need(self.temperature > 0 or self.n == 1, "n", "greedy sampling (temperature 0) gives one completion; set n=1")
    need(0 < self.top_p <= 1, "top_p", f"must be in (0, 1], got {self.top_p!r}")
    need(all(t >= 0 for t in self.stop_token_ids), "stop_token_ids", "token ids must be >= 0")


@dataclasses.dataclass
class Completion:
  token_ids: list[int]  # the new tokens, the stop token included when finish_reason is "stop"
  finish_reason: str  # "stop": ended on a stop token; "length": reached max_tokens
  logprobs: list[float] | None = None  # log-probability of each token in token_ids, when asked for

  @property
  def stop_token_id(self) -> int | None:
    return self.token_ids[-1] if self.finish_reason == "stop" and self.token_ids else None


class Sampler(Protocol):
  """What SC-TIR and evaluation call; implemented in-process (JAX) and over HTTP (vLLM, vLLM-TPU)."""

  def generate(self, prompts: Sequence[Sequence[int]],
               params: SamplingParams | Sequence[SamplingParams]) -> list[list[Completion]]:
    """For each prompt, `params.n` completions, in order. `params` is one for all prompts or one per prompt."""
    ...
