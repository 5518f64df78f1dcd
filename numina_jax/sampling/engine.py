"""A `Sampler` over running inference servers (vLLM, vLLM-TPU): token ids in and out through the OpenAI-compatible
`/v1/completions`, the load spread over several servers."""

from __future__ import annotations

import collections
import math
import threading
import time
from concurrent import futures
from typing import Any, Sequence

import httpx2 as httpx
from tqdm.auto import tqdm

from numina_jax.sampling.types import Completion, SamplingParams

# Worth another try (on another server when there is one): overloaded, restarting or behind a failing proxy.
TRANSIENT_STATUS = frozenset({408, 429, 502, 503, 504})
_COOLDOWN_S = 10.0  # a server that just failed is avoided this long while others are up
_TOKEN_PREFIX = "token_id:"


class EngineError(RuntimeError):
  """A server could not be reached or refused a request; the message names the URL, the status and the reason."""

  def __init__(self, message: str, url: str | None = None, status: int | None = None):
    super().__init__(message)
    self.url = url
    self.status = status


def _normalize_url(url: str) -> str:
  """'http://host:8000/v1/' -> 'http://host:8000': the server's root, as OpenAI clients' base URLs end in /v1."""
  if not isinstance(url, str) or not url.startswith(("http://", "https://")):
    raise ValueError(f"server URL {url!r} must start with http:// or https:// (e.g. http://127.0.0.1:8000)")
  url = url.rstrip("/")
  return url[:-3] if url.endswith("/v1") else url


def _server_message(response: httpx.Response) -> str:
  """vLLM's JSON error (`{"error": {"message": ...}}`, or the older `{"message": ...}`), else the body's start."""
  try:
    body = response.json()
  except ValueError:
    body = None
  if isinstance(body, dict):
    err = body.get("error")
    if isinstance(err, dict) and err.get("message"):
      return str(err["message"])
    if isinstance(err, str):
      return err
    if body.get("message"):
      return str(body["message"])
    if body.get("detail"):
      return str(body["detail"])
  text = response.text.strip()
  return text[:500] + (" ..." if len(text) > 500 else "") if text else "(empty body)"


def _as_prompt(i: int, prompt: Sequence[int]) -> list[int]:
  if isinstance(prompt, (str, bytes)):
    raise TypeError(f"prompt {i} is text; EngineSampler takes token ids (tokenize it first)")
  out = []
  for k, t in enumerate(prompt):
    if isinstance(t, bool) or not hasattr(t, "__index__"):
      raise TypeError(f"prompt {i}, position {k}: {t!r} is not a token id (an integer)")
    t = t.__index__()
    if t < 0:
      raise ValueError(f"prompt {i}, position {k}: token id {t} is negative")
    out.append(t)
  if not out:
    raise ValueError(f"prompt {i} is empty; a completion needs at least one prompt token")
  return out


def request_body(model: str, prompts: list[list[int]], params: SamplingParams) -> dict[str, Any]:
  """The `/v1/completions` JSON for prompts that share `params`.

  Every sampling knob is sent, so the server's defaults (its `generation_config.json`) change nothing.
  `ignore_eos` because a completion ends only on our `stop_token_ids`, not on the model's EOS; vLLM keeps the stop
  token in `token_ids`. Log-probabilities are those vLLM returns by default (`--logprobs-mode raw_logprobs`):
  the model's, before temperature and top_p.
  """
  body: dict[str, Any] = dict(
      model=model, prompt=prompts, n=params.n, max_tokens=params.max_tokens, temperature=params.temperature,
      top_p=params.top_p, top_k=-1, min_p=0.0, presence_penalty=0.0, frequency_penalty=0.0,
      repetition_penalty=1.0, stop_token_ids=list(params.stop_token_ids), ignore_eos=True,
      skip_special_tokens=False, return_token_ids=True)
  if params.seed is not None:
    body["seed"] = params.seed
  if params.logprobs:
    body["logprobs"] = 0  # only the sampled token's
    body["return_tokens_as_token_ids"] = True
  return body


def parse_choice(choice: dict, params: SamplingParams, where: str) -> Completion:
  """One `choices[i]` of a vLLM completion as our `Completion`, with the finish reason normalised.

  Ours is decided by the tokens: "stop" when the last token is one of `stop_token_ids` (vLLM says "stop" with
  `stop_reason` = that id, also when it is the `max_tokens`-th token), "length" when `max_tokens` tokens came
  without one. Anything else (a stop string, the server's `max_model_len`, an abort) is an error, not a guess.
  """
  token_ids = choice.get("token_ids")
  if not isinstance(token_ids, list):
    raise EngineError(f"{where}: no token_ids in the answer; the server must support `return_token_ids` "
                      "(vLLM's OpenAI-compatible server does)")
  stops = set(params.stop_token_ids)
  early = [k for k, t in enumerate(token_ids[:-1]) if t in stops]
  if early:
    raise EngineError(f"{where}: stop token {token_ids[early[0]]} at position {early[0]} of {len(token_ids)}, "
                      "yet the completion went on")
  if len(token_ids) > params.max_tokens:
    raise EngineError(f"{where}: {len(token_ids)} tokens, more than max_tokens={params.max_tokens}")
  if token_ids and token_ids[-1] in stops:
    finish = "stop"
  elif len(token_ids) == params.max_tokens:
    finish = "length"
  else:
    raise EngineError(
        f"{where}: ended after {len(token_ids)} of max_tokens={params.max_tokens} tokens without a stop token "
        f"(finish_reason={choice.get('finish_reason')!r}, stop_reason={choice.get('stop_reason')!r}); "
        "if it reached the server's --max-model-len, ask for fewer tokens or raise that limit")
  logprobs = None
  if params.logprobs:
    lp = choice.get("logprobs") or {}
    logprobs = lp.get("token_logprobs")
    if not isinstance(logprobs, list) or len(logprobs) != len(token_ids) or any(x is None for x in logprobs):
      raise EngineError(f"{where}: asked for logprobs, got {lp.get('token_logprobs')!r} for {len(token_ids)} tokens")
    tokens = lp.get("tokens")
    if tokens is not None:  # "token_id:N" keys name the tokens the logprobs belong to: they must be ours
      named = [int(t[len(_TOKEN_PREFIX):]) if isinstance(t, str) and t.startswith(_TOKEN_PREFIX) else None
               for t in tokens]
      if named != token_ids:
        raise EngineError(f"{where}: logprobs are for tokens {tokens!r}, the completion is {token_ids!r}")
    logprobs = [float(x) for x in logprobs]
  return Completion(token_ids=[int(t) for t in token_ids], finish_reason=finish, logprobs=logprobs)


class EngineSampler:
  """`Sampler` over one or more vLLM (or vLLM-TPU: `tpu-inference`, the same server and API) servers.

  Prompts that share their `SamplingParams` go together, several per request; requests run on a thread pool and
  each goes to the server with the fewest requests in flight. Connection failures and HTTP 408/429/502/503/504 are
  retried (`retries` more times, on another server when there is one, with backoff); any other HTTP error, or no
  answer within `timeout_s`, raises `EngineError` naming the URL, the status and the server's message.
  `model` defaults to the one model every server lists in `/v1/models`. The servers should run with the default
  `--logprobs-mode raw_logprobs` so log-probabilities match the in-process sampler's.
  """

  def __init__(self, urls: str | Sequence[str], *, model: str | None = None, timeout_s: float = 600.0,
               max_concurrency: int = 16, retries: int = 2, max_prompts_per_request: int = 64,
               progress: bool | None = None):
    urls = [urls] if isinstance(urls, str) else list(urls)
    if not urls:
      raise ValueError("EngineSampler needs at least one server URL")
    self.urls = [_normalize_url(u) for u in urls]
    dupes = sorted({u for u in self.urls if self.urls.count(u) > 1})
    if dupes:
      raise ValueError(f"server URL listed twice: {', '.join(dupes)}")
    if not timeout_s > 0:
      raise ValueError(f"timeout_s must be > 0, got {timeout_s!r}")
    if not (isinstance(max_concurrency, int) and max_concurrency >= 1):
      raise ValueError(f"max_concurrency must be an integer >= 1, got {max_concurrency!r}")
    if not (isinstance(retries, int) and retries >= 0):
      raise ValueError(f"retries must be an integer >= 0, got {retries!r}")
    if not (isinstance(max_prompts_per_request, int) and max_prompts_per_request >= 1):
      raise ValueError(f"max_prompts_per_request must be an integer >= 1, got {max_prompts_per_request!r}")
    self.timeout_s = float(timeout_s)
    self.retries = retries
    self.max_prompts_per_request = max_prompts_per_request
    self.progress = progress
    self.requests_sent: dict[str, int] = {u: 0 for u in self.urls}  # completion requests per server (tries too)
    self._in_flight = {u: 0 for u in self.urls}
    self._down_until = {u: 0.0 for u in self.urls}
    self._lock = threading.Lock()
    self._client = httpx.Client(
        timeout=httpx.Timeout(self.timeout_s, connect=min(self.timeout_s, 10.0)),
        limits=httpx.Limits(max_connections=max_concurrency, max_keepalive_connections=max_concurrency))
    self._pool = futures.ThreadPoolExecutor(max_concurrency, thread_name_prefix="engine")
    try:
      self.model, self.max_model_len = self._discover(model)
    except BaseException:
      self.close()
      raise

  # Servers -----------------------------------------------------------------------------------------------------
  def _discover(self, model: str | None) -> tuple[str, int | None]:
    """The model to ask for, checked on every server, and the smallest `max_model_len` they report."""
    listed = {}
    for url in self.urls:
      data = self._request("GET", "/v1/models", url=url)[1].get("data")
      if not isinstance(data, list) or not data:
        raise EngineError(f"GET {url}/v1/models: no models listed", url)
      listed[url] = {m.get("id"): m for m in data if isinstance(m, dict)}
    if model is None:
      first = sorted(listed[self.urls[0]])
      if len(first) != 1:
        raise ValueError(f"{self.urls[0]} serves {first}; pass model= to pick one")
      model = first[0]
    missing = {url: sorted(ms) for url, ms in listed.items() if model not in ms}
    if missing:
      raise EngineError("; ".join(f"{url} does not serve {model!r} (it serves {ms})" for url, ms in missing.items()),
                        next(iter(missing)))
    lens = [listed[u][model].get("max_model_len") for u in self.urls]
    lens = [int(n) for n in lens if isinstance(n, int)]
    return model, (min(lens) if lens else None)

  def _pick(self, avoid: str | None) -> str:
    """Fewest requests in flight among servers not in cool-down (ties: fewest sent so far), marked busy."""
    with self._lock:
      now = time.monotonic()
      up = [u for u in self.urls if self._down_until[u] <= now and u != avoid]
      candidates = up or [u for u in self.urls if u != avoid] or self.urls
      url = min(candidates, key=lambda u: (self._in_flight[u], self.requests_sent[u]))
      self._in_flight[url] += 1
      return url

  def _request(self, method: str, path: str, body: dict | None = None,
               url: str | None = None) -> tuple[str, dict]:
    """(server URL, JSON answer): `url` pinned, else picked per try. Retries transient failures only."""
    failures, last = [], None
    for attempt in range(self.retries + 1):
      if attempt:
        time.sleep(min(0.5 * 2 ** (attempt - 1), 8.0))
      if url is None:
        target = self._pick(avoid=last if len(self.urls) > 1 else None)
      else:
        target = url
        with self._lock:
          self._in_flight[target] += 1
      if body is not None:
        with self._lock:
          self.requests_sent[target] += 1
      where = f"{method} {target}{path}"
      try:
        response = self._client.request(method, target + path, json=body)
      except (httpx.ConnectError, httpx.ConnectTimeout, httpx.RemoteProtocolError, httpx.ReadError,
              httpx.WriteError) as e:
        hint = "; is a server running there?" if isinstance(e, httpx.ConnectError) else ""
        failures.append(f"{where}: {type(e).__name__}: {e or 'connection lost'}{hint}")
        self._mark_down(target)
        last = target
        continue
      except httpx.TimeoutException as e:
        raise EngineError(f"{where}: no answer within timeout_s={self.timeout_s:g} s ({type(e).__name__}); "
                          "raise timeout_s for long generations, or check the server", target) from e
      except httpx.TransportError as e:
        raise EngineError(f"{where}: {type(e).__name__}: {e}", target) from e
      finally:
        with self._lock:
          self._in_flight[target] -= 1
      if response.status_code == 200:
        try:
          return target, response.json()
        except ValueError as e:
          raise EngineError(f"{where}: HTTP 200 but the body is not JSON: {response.text[:200]!r}", target) from e
      message = f"{where}: HTTP {response.status_code}: {_server_message(response)}"
      if response.status_code not in TRANSIENT_STATUS:
        raise EngineError(message, target, response.status_code)
      failures.append(message)
      self._mark_down(target)
      last = target
    counts = collections.Counter(failures)  # the same failure on every try is said once
    if len(counts) == 1:
      raise EngineError(f"{failures[0]} (gave up after {len(failures)} tries)", last)
    said = "; ".join(m + (f" (x{k})" if k > 1 else "") for m, k in counts.items())
    raise EngineError(f"gave up after {len(failures)} tries: {said}", last)

  def _mark_down(self, url: str) -> None:
    with self._lock:
      self._down_until[url] = time.monotonic() + _COOLDOWN_S

  # Sampling ----------------------------------------------------------------------------------------------------
  def generate(self, prompts: Sequence[Sequence[int]],
               params: SamplingParams | Sequence[SamplingParams]) -> list[list[Completion]]:
    """For each prompt, `params.n` completions, in order. `params` is one for all prompts or one per prompt."""
    prompts = [_as_prompt(i, p) for i, p in enumerate(prompts)]
    if isinstance(params, SamplingParams):
      per_prompt = [params] * len(prompts)
    else:
      per_prompt = list(params)
      if len(per_prompt) != len(prompts):
        raise ValueError(f"got {len(per_prompt)} SamplingParams for {len(prompts)} prompts; pass one, or one each")
    for i, p in enumerate(per_prompt):
      if not isinstance(p, SamplingParams):
        raise TypeError(f"params[{i}] is {type(p).__name__}, not SamplingParams")
      p.validate()
      if self.max_model_len is not None and len(prompts[i]) + p.max_tokens > self.max_model_len:
        raise ValueError(f"prompt {i}: {len(prompts[i])} tokens + max_tokens={p.max_tokens} exceed the server's "
                         f"max_model_len={self.max_model_len}; ask for fewer tokens or serve a longer context")
    groups: dict[SamplingParams, list[int]] = collections.defaultdict(list)
    for i, p in enumerate(per_prompt):
      groups[p].append(i)
    chunks = []
    for p, idx in groups.items():
      # One request per server at least, so a small batch still uses them all.
      size = min(self.max_prompts_per_request, math.ceil(len(idx) / len(self.urls)))
      chunks += [(p, idx[k:k + size]) for k in range(0, len(idx), size)]

    out: list[list[Completion] | None] = [None] * len(prompts)
    jobs = {self._pool.submit(self._complete, [prompts[i] for i in idx], p, idx): idx for p, idx in chunks}
    try:
      with tqdm(total=len(prompts), desc="sampling", unit="prompt", disable=self._quiet()) as bar:
        for job in futures.as_completed(jobs):
          for i, completions in zip(jobs[job], job.result()):
            out[i] = completions
          bar.update(len(jobs[job]))
    except BaseException:
      for job in jobs:
        job.cancel()
      raise
    return out  # type: ignore[return-value]

  def _quiet(self) -> bool | None:
    return None if self.progress is None else not self.progress  # None: tqdm is quiet when not on a terminal

  def _complete(self, prompts: list[list[int]], params: SamplingParams, idx: list[int]) -> list[list[Completion]]:
    url, answer = self._request("POST", "/v1/completions", request_body(self.model, prompts, params))
    choices = answer.get("choices")
    want = len(prompts) * params.n
    if not isinstance(choices, list) or len(choices) != want:
      got = len(choices) if isinstance(choices, list) else choices
      raise EngineError(f"POST {url}/v1/completions: {got} choices for {len(prompts)} prompts x n={params.n}", url)
    # vLLM numbers the choices prompt by prompt: index = prompt * n + sample.
    by_index = {c.get("index"): c for c in choices}
    if sorted(by_index) != list(range(want)):
      raise EngineError(f"POST {url}/v1/completions: choice indices {sorted(by_index)} are not 0..{want - 1}", url)
    return [[parse_choice(by_index[k * params.n + j], params,
                          f"POST {url}/v1/completions: prompt {i}, completion {j}")
             for j in range(params.n)] for k, i in enumerate(idx)]

  # Lifetime ----------------------------------------------------------------------------------------------------
  def close(self) -> None:
    self._pool.shutdown(wait=True, cancel_futures=True)
    self._client.close()

  def __enter__(self) -> "EngineSampler":
    return self

  def __exit__(self, *exc) -> None:
    self.close()
