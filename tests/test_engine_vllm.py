"""EngineSampler against a real vLLM server (CPU build, fp32) serving our export of a tiny gpt-oss: greedy tokens
and log-probabilities equal transformers', seeded samples repeat, the load spreads, failures name the server."""

from __future__ import annotations

import http.server
import json
import threading
import time

import numpy as np
import pytest

from numina_jax.sampling.engine import EngineError, EngineSampler, parse_choice, request_body
from numina_jax.sampling.types import SamplingParams
import vllm_fixtures
from multihost import free_port

LOGPROB_TOL = 1e-4
# Prompt lengths on both sides of the window (8); with up to 24 new tokens every sequence outgrows it.
PROMPT_LENS = (3, 7, 8, 9, 12, 15, 20, 26)
MAX_TOKENS = 24


# Fixtures --------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def vllm_served(tmp_path_factory):
  """One vLLM server for the module: a `ServedModel` (url, name, export_dir, cfg, params, tokenizer, server)."""
  with vllm_fixtures.serve_tiny_model(tmp_path_factory.mktemp("vllm")) as served:
    yield served


@pytest.fixture(scope="module")
def sampler(vllm_served):
  with EngineSampler(vllm_served.url, progress=False) as s:
    yield s


@pytest.fixture(scope="module")
def reference(vllm_served):
  """transformers' GptOssForCausalLM (fp32, eager attention) loaded from the export vLLM serves."""
  import torch
  from transformers import GptOssForCausalLM
  # One thread: a tiny model's ops are too small to split, and on a busy machine two threads wait on each other
  # (a forward pass takes ~20x longer).
  threads = torch.get_num_threads()
  torch.set_num_threads(1)
  yield GptOssForCausalLM.from_pretrained(vllm_served.export_dir, dtype=torch.float32,
                                          attn_implementation="eager").eval()
  torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def stops(vllm_served):
  from numina_jax.data.harmony import special_token_ids
  ids = special_token_ids(vllm_served.tokenizer)
  return ids["<|call|>"], ids["<|return|>"]


def make_prompts(tokenizer, lens=PROMPT_LENS, seed=0):
  """`<|start|>` then random ordinary tokens (no special ones, which would be stop tokens)."""
  from numina_jax.data.harmony import special_token_ids
  specials = special_token_ids(tokenizer)
  rng = np.random.default_rng(seed)
  low = max(specials.values()) + 1
  return [[specials["<|start|>"]] + rng.integers(low, len(tokenizer), n - 1).tolist() for n in lens]


def hf_greedy(model, prompt, max_tokens, stop_ids):
  """transformers' greedy `generate`: (new tokens, the stop token included; log-softmax of each one's logits)."""
  import torch
  out = model.generate(torch.tensor([prompt]), max_new_tokens=max_tokens, do_sample=False, eos_token_id=list(stop_ids),
                       pad_token_id=model.config.pad_token_id, output_logits=True, return_dict_in_generate=True)
  tokens = out.sequences[0, len(prompt):].tolist()
  logprobs = [torch.log_softmax(step[0].float(), -1)[t].item() for step, t in zip(out.logits, tokens)]
  return tokens, logprobs


def hf_logprobs(model, prompt, completion):
  """Log-probabilities of `completion`'s tokens under the model given `prompt` (one teacher-forced forward)."""
  import torch
  with torch.no_grad():
    logits = model(torch.tensor([prompt + completion])).logits[0].float()
  lp = torch.log_softmax(logits[len(prompt) - 1:-1], -1)
  return lp[torch.arange(len(completion)), torch.tensor(completion)].tolist()


# Against transformers ----------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_greedy_tokens_finish_reasons_and_logprobs_equal_transformers(vllm_served, sampler, reference, stops):
  prompts = make_prompts(vllm_served.tokenizer)
  full = [hf_greedy(reference, p, MAX_TOKENS, stops)[0] for p in prompts]
  ended = [t[-1] for t in full if t[-1] in stops]
  # The fixture's model is built so that both stop tokens and max_tokens end some of these completions.
  assert set(ended) == set(stops) and len(ended) < len(full), full

  # Vary max_tokens too: a completion whose stop token is also its max_tokens-th is "stop", one cut short "length".
  stopped = next(i for i, t in enumerate(full) if t[-1] in stops)
  long = next(i for i, t in enumerate(full) if t[-1] not in stops)
  max_tokens = [MAX_TOKENS] * len(prompts)
  max_tokens[stopped] = len(full[stopped])
  max_tokens[long] = 5
  params = [SamplingParams(temperature=0.0, max_tokens=m, stop_token_ids=stops, logprobs=True) for m in max_tokens]

  got = sampler.generate(prompts, params)
  for i, (prompt, p, completions) in enumerate(zip(prompts, params, got)):
    want, want_lp = hf_greedy(reference, prompt, p.max_tokens, stops)
    [c] = completions
    assert c.token_ids == want, (i, len(prompt))
    assert c.finish_reason == ("stop" if want[-1] in stops else "length"), i
    assert c.stop_token_id == (want[-1] if want[-1] in stops else None)
    np.testing.assert_allclose(c.logprobs, want_lp, atol=LOGPROB_TOL, rtol=0, err_msg=f"prompt {i}")
  assert got[stopped][0].finish_reason == "stop" and len(got[stopped][0].token_ids) == max_tokens[stopped]
  assert got[long][0].finish_reason == "length" and len(got[long][0].token_ids) == 5


@pytest.mark.slow
def test_seeded_samples_repeat_and_their_logprobs_are_the_models(vllm_served, sampler, reference):
  prompts = make_prompts(vllm_served.tokenizer, lens=(5, 11), seed=1)
  params = SamplingParams(n=3, temperature=0.8, top_p=0.9, seed=1234, max_tokens=12, logprobs=True)
  first = sampler.generate(prompts, params)
  again = sampler.generate(prompts, params)
  other = sampler.generate(prompts, SamplingParams(n=3, temperature=0.8, top_p=0.9, seed=99, max_tokens=12))
  assert [[c.token_ids for c in cs] for cs in first] == [[c.token_ids for c in cs] for cs in again]
  assert [[c.token_ids for c in cs] for cs in first] != [[c.token_ids for c in cs] for cs in other]
  for prompt, completions in zip(prompts, first):
    assert len(completions) == 3 and len({tuple(c.token_ids) for c in completions}) == 3  # n distinct samples
    for c in completions:
      assert c.finish_reason == "length" and len(c.token_ids) == 12
      # The raw model's log-probabilities, whatever the temperature and top_p (vLLM's default logprobs mode).
      np.testing.assert_allclose(c.logprobs, hf_logprobs(reference, prompt, c.token_ids), atol=LOGPROB_TOL, rtol=0)


@pytest.mark.slow
def test_a_completion_cut_by_the_servers_context_is_an_error_not_a_length(vllm_served):
  with EngineSampler(vllm_served.url, progress=False) as s:
    assert s.max_model_len == 512
    prompt = make_prompts(vllm_served.tokenizer, lens=(500,))[0]
    with pytest.raises(ValueError, match=r"prompt 0: 500 tokens \+ max_tokens=20 exceed the server's "
                                         r"max_model_len=512"):
      s.generate([prompt], SamplingParams(temperature=0.0, max_tokens=20))
    s.max_model_len = None  # without the check up front, vLLM stops at 512 tokens and says "length"
    with pytest.raises(EngineError, match=r"prompt 0, completion 0: ended after 12 of max_tokens=20 tokens without "
                                          r"a stop token \(finish_reason='length'"):
      s.generate([prompt], SamplingParams(temperature=0.0, max_tokens=20))


# Several servers, failures ---------------------------------------------------------------------------------------
@pytest.mark.slow
def test_two_urls_share_the_load_and_give_the_same_completions(vllm_served, sampler):
  port = vllm_served.url.rsplit(":", 1)[1]
  prompts = make_prompts(vllm_served.tokenizer, lens=(4, 6, 9, 13, 5, 10), seed=2)
  params = SamplingParams(temperature=0.0, max_tokens=8)
  with EngineSampler([f"http://127.0.0.1:{port}", f"http://localhost:{port}/v1"], max_prompts_per_request=2,
                     progress=False) as two:
    assert two.model == vllm_served.name
    got = two.generate(prompts, params)
    assert sum(two.requests_sent.values()) == 3  # six prompts, two per request
    assert all(n >= 1 for n in two.requests_sent.values()), two.requests_sent
  assert got == sampler.generate(prompts, params)


class _StubServer:
  """A plain HTTP server on 127.0.0.1 that lists the real server's models and answers completions with `status`
  (after `delay_s`): an overloaded or hung server next to a real one."""

  def __init__(self, models: dict, status: int, delay_s: float = 0.0):
    stub = self
    self.completions = 0

    class Handler(http.server.BaseHTTPRequestHandler):
      def _send(self, code, body):
        raw = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(raw)))
        self.end_headers()
        self.wfile.write(raw)

      def do_GET(self):
        self._send(200, models)

      def do_POST(self):
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        stub.completions += 1
        time.sleep(delay_s)
        self._send(status, {"error": {"message": "the engine is overloaded", "type": "Unavailable", "code": status}})

      def log_message(self, *args):
        pass

    self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
    self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

  def __enter__(self):
    self.thread.start()
    return self

  def __exit__(self, *exc):
    self.httpd.shutdown()
    self.httpd.server_close()


@pytest.fixture(scope="module")
def models_json(vllm_served):
  import httpx2
  return httpx2.get(vllm_served.url + "/v1/models").json()


@pytest.mark.slow
def test_a_transient_failure_is_retried_on_the_other_server(vllm_served, sampler, models_json):
  prompts = make_prompts(vllm_served.tokenizer, lens=(4, 7), seed=3)
  params = SamplingParams(temperature=0.0, max_tokens=6)
  with _StubServer(models_json, 503) as busy:
    with EngineSampler([busy.url, vllm_served.url], retries=1, progress=False) as s:
      got = s.generate(prompts, params)
    assert busy.completions >= 1 and s.requests_sent[busy.url] == busy.completions
    assert got == sampler.generate(prompts, params)

    with EngineSampler(busy.url, retries=2, progress=False) as s:
      with pytest.raises(EngineError, match=rf"POST {busy.url}/v1/completions: HTTP 503: the engine is overloaded "
                                            r"\(gave up after 3 tries\)") as err:
        s.generate(prompts[:1], params)
    assert err.value.url == busy.url


@pytest.mark.slow
def test_server_errors_name_the_url_and_the_servers_message_and_are_not_retried(vllm_served, models_json):
  url = vllm_served.url
  with EngineSampler(url, retries=3, progress=False) as s:
    with pytest.raises(EngineError, match=rf"POST {url}/v1/completions: HTTP 400: Token id 5000 is out of vocabulary"):
      s.generate([[5, 5000]], SamplingParams(max_tokens=3))
    assert s.requests_sent[url] == 1
  with pytest.raises(EngineError, match=rf"{url} does not serve 'nope' \(it serves \['{vllm_served.name}'\]\)"):
    EngineSampler(url, model="nope")
  with _StubServer(models_json, 200, delay_s=3.0) as hung:
    with EngineSampler(hung.url, timeout_s=0.5, retries=2, progress=False) as s:
      with pytest.raises(EngineError, match=rf"POST {hung.url}/v1/completions: no answer within timeout_s=0.5 s"):
        s.generate([[5, 6]], SamplingParams(max_tokens=3))
    assert hung.completions == 1  # a slow generation is not sent again


def test_a_dead_url_is_an_error_naming_it():
  dead = f"http://127.0.0.1:{free_port()}"  # a port nobody listens on
  with pytest.raises(EngineError, match=rf"GET {dead}/v1/models: ConnectError: .*is a server running there\? "
                                        r"\(gave up after 2 tries\)") as err:
    EngineSampler([dead], retries=1)
  assert err.value.url == dead


# Without a server: the request and the normalisation of the answer ------------------------------------------------
def test_request_body_sends_every_knob_and_asks_for_token_ids():
  p = SamplingParams(n=2, max_tokens=7, temperature=0.7, top_p=0.5, seed=3, stop_token_ids=(8, 2), logprobs=True)
  body = request_body("m", [[1, 2]], p)
  assert body == dict(model="m", prompt=[[1, 2]], n=2, max_tokens=7, temperature=0.7, top_p=0.5, top_k=-1,
                      min_p=0.0, presence_penalty=0.0, frequency_penalty=0.0, repetition_penalty=1.0,
                      stop_token_ids=[8, 2], ignore_eos=True, skip_special_tokens=False, return_token_ids=True,
                      seed=3, logprobs=0, return_tokens_as_token_ids=True)
  plain = request_body("m", [[1]], SamplingParams(temperature=0.0))
  assert "seed" not in plain and "logprobs" not in plain


@pytest.mark.parametrize("choice, finish", [
    (dict(token_ids=[4, 5, 8], finish_reason="stop", stop_reason=8), "stop"),
    (dict(token_ids=[4, 5, 2], finish_reason="stop", stop_reason=2), "stop"),  # also the max_tokens-th token
    (dict(token_ids=[4, 5, 6], finish_reason="length", stop_reason=None), "length"),
])
def test_finish_reason_is_read_from_the_tokens(choice, finish):
  c = parse_choice(choice, SamplingParams(max_tokens=3, stop_token_ids=(2, 8)), "here")
  assert c.finish_reason == finish and c.token_ids == choice["token_ids"]


@pytest.mark.parametrize("choice, error", [
    (dict(token_ids=[4, 5], finish_reason="stop", stop_reason="</s>"),
     r"here: ended after 2 of max_tokens=3 tokens without a stop token \(finish_reason='stop', stop_reason='</s>'\)"),
    (dict(token_ids=[4, 8, 5], finish_reason="length"), "here: stop token 8 at position 1 of 3, yet the completion"),
    (dict(token_ids=[4, 5, 6, 7], finish_reason="length"), "here: 4 tokens, more than max_tokens=3"),
    (dict(text="ab", finish_reason="length"), "here: no token_ids in the answer"),
])
def test_an_answer_our_semantics_cannot_express_is_an_error(choice, error):
  with pytest.raises(EngineError, match=error):
    parse_choice(choice, SamplingParams(max_tokens=3, stop_token_ids=(2, 8)), "here")


def test_logprobs_must_belong_to_the_completions_tokens():
  p = SamplingParams(max_tokens=2, logprobs=True)
  ok = dict(token_ids=[4, 5], logprobs=dict(token_logprobs=[-1.0, -2.5], tokens=["token_id:4", "token_id:5"]))
  assert parse_choice(ok, p, "here").logprobs == [-1.0, -2.5]
  bad = dict(token_ids=[4, 5], logprobs=dict(token_logprobs=[-1.0, -2.5], tokens=["token_id:4", "x"]))
  with pytest.raises(EngineError, match=r"here: logprobs are for tokens \['token_id:4', 'x'\]"):
    parse_choice(bad, p, "here")
  with pytest.raises(EngineError, match=r"here: asked for logprobs, got \[-1.0\] for 2 tokens"):
    parse_choice(dict(token_ids=[4, 5], logprobs=dict(token_logprobs=[-1.0])), p, "here")


@pytest.mark.slow
@pytest.mark.parametrize("prompts, params, error", [
    (["2+2="], SamplingParams(), (TypeError, "prompt 0 is text; EngineSampler takes token ids")),
    ([[5, 6], [5, -1]], SamplingParams(), (ValueError, "prompt 1, position 1: token id -1 is negative")),
    ([[5, 6.0]], SamplingParams(), (TypeError, r"prompt 0, position 1: 6.0 is not a token id")),
    ([[5], []], SamplingParams(), (ValueError, "prompt 1 is empty")),
    ([[5], [6]], [SamplingParams()], (ValueError, "got 1 SamplingParams for 2 prompts; pass one, or one each")),
])
def test_bad_input_is_refused_before_anything_is_sent(sampler, prompts, params, error):
  sent = dict(sampler.requests_sent)
  with pytest.raises(error[0], match=error[1]):
    sampler.generate(prompts, params)
  assert sampler.requests_sent == sent


@pytest.mark.parametrize("urls, kwargs, error", [
    ("127.0.0.1:8000", {}, "server URL '127.0.0.1:8000' must start with http:// or https://"),
    ([], {}, "needs at least one server URL"),
    (["http://a:1/v1", "http://a:1/"], {}, "server URL listed twice: http://a:1"),
    ("http://a:1", dict(retries=-1), "retries must be an integer >= 0, got -1"),
    ("http://a:1", dict(max_concurrency=0), "max_concurrency must be an integer >= 1, got 0"),
])
def test_bad_settings_are_refused_up_front(urls, kwargs, error):
  with pytest.raises(ValueError, match=error):
    EngineSampler(urls, **kwargs)


# The server helper ---------------------------------------------------------------------------------------------------
def test_a_server_that_exits_at_start_is_an_error_with_its_log(tmp_path, vllm_export_stub):
  import sys
  from numina_jax.sampling.vllm_server import VllmServer
  server = VllmServer(vllm_export_stub, python=sys.executable, log_path=tmp_path / "log")  # a python without vLLM
  with pytest.raises(RuntimeError, match=r"(?s)exited with status 1 before it was ready; the end of its log .*"
                                         r"No module named 'vllm'"):
    server.start()
  assert server.proc is None


def test_a_server_not_ready_in_time_is_stopped_whole(tmp_path, vllm_export_stub):
  import os
  from numina_jax.sampling.vllm_server import VllmServer
  fake = tmp_path / "python"  # stands in for a server that never gets ready; its child must go with it
  fake.write_text("#!/bin/sh\necho loading weights\nsleep 300 &\necho $! > \"$0.child\"\nwait\n")
  fake.chmod(0o755)
  server = VllmServer(vllm_export_stub, python=fake, startup_timeout_s=1.0, log_path=tmp_path / "log")
  with pytest.raises(TimeoutError, match=r"(?s)not healthy after 1 s; the end of its log .*loading weights"):
    server.start()
  child = int((tmp_path / "python.child").read_text())
  with pytest.raises(ProcessLookupError):
    os.kill(child, 0)


@pytest.fixture
def vllm_export_stub(tmp_path):
  """A folder that passes VllmServer's check (a config.json); the servers above never read it."""
  (tmp_path / "model").mkdir()
  (tmp_path / "model" / "config.json").write_text("{}")
  return tmp_path / "model"


@pytest.mark.slow
def test_greedy_sctir_traces_through_vllm_equal_the_jax_samplers(vllm_served, sampler):
  """The same SC-TIR run (greedy, harmony prompts, rounds, the real sandbox) through vLLM and through our JAX
  sampler on the same weights gives the same traces, token for token, with the same finishes and answers. (A random
  model writes no well-formed python call, so this holds the prompts, the rounds' stop handling and decoding; the
  tool path is held by tests/test_eval_sctir.py.)"""
  from numina_jax.eval.datasets import EvalProblem
  from numina_jax.eval.grading import Grader
  from numina_jax.eval.sctir import SCTIRConfig, run_sctir
  from numina_jax.sampling.jax_sampler import JaxSampler

  problems = [EvalProblem(str(i), text, answer) for i, (text, answer) in enumerate(
      [("Compute 2 + 3.", 5), ("What is 7 times 6?", 42), ("How many primes are below 20?", 8)])]
  cfg = SCTIRConfig(samples=1, rounds=2, temperature=0.0, max_tokens_per_round=12, max_context=vllm_fixtures.MAX_MODEL_LEN)
  grader = Grader("integer")
  tok = vllm_served.tokenizer
  ours = JaxSampler(vllm_served.params, vllm_served.cfg, max_len=vllm_fixtures.MAX_MODEL_LEN, max_batch=4,
                    progress=False)
  by_vllm = run_sctir(problems, sampler, tok, grader, cfg)
  by_jax = run_sctir(problems, ours, tok, grader, cfg)
  assert [r.id for r in by_vllm] == [r.id for r in by_jax] == ["0", "1", "2"]
  for a, b in zip(by_vllm, by_jax):
    (ta,), (tb,) = a.traces, b.traces
    assert ta.generated_tokens > 0
    assert list(ta.token_ids) == list(tb.token_ids), a.id
    assert (ta.finish, ta.answer, len(ta.rounds)) == (tb.finish, tb.answer, len(tb.rounds)), a.id
