"""The convert CLI: HF -> Orbax -> HF gives back the same tensors; user errors are one line, exit code 1."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors import safe_open

from helpers import MXFP4_OVERRIDES, tiny_hf_model, write_mxfp4_checkpoint
from numina_jax import convert
from numina_jax.checkpoint import load_params
from numina_jax.hf.load import SafetensorsCheckpoint


def _tensors(directory):
  out = {}
  for f in os.listdir(directory):
    if f.endswith(".safetensors"):
      with safe_open(os.path.join(directory, f), framework="pt") as h:
        out.update({k: h.get_tensor(k) for k in h.keys()})
  return out


@pytest.fixture(scope="module")
def mxfp4_dir(tmp_path_factory):
  path = str(tmp_path_factory.mktemp("mx"))
  model, _, _ = tiny_hf_model(seed=5, **MXFP4_OVERRIDES)
  write_mxfp4_checkpoint(model, path, n_files=3)
  return path


def test_import_then_export_round_trip(mxfp4_dir, tmp_path, capsys):
  ckpt, hf_out = str(tmp_path / "ckpt"), str(tmp_path / "hf")
  assert convert.main(["import", "--hf", mxfp4_dir, "--out", ckpt, "--dtype", "float32",
                       "--mesh", "fsdp=2,tensor=2,expert=2"]) == 0
  params, cfg = load_params(ckpt)
  assert cfg.hidden_size == 64 and params["layers/gate_w"].dtype == np.float32
  assert convert.main(["export", "--checkpoint", ckpt, "--out", hf_out, "--dtype", "bfloat16",
                       "--max-shard-size", "300KB"]) == 0
  assert "wrote" in capsys.readouterr().out

  # Every exported tensor equals the MXFP4 source, dequantized (exact in bf16) and laid out densely.
  src = SafetensorsCheckpoint(mxfp4_dir)
  exported = _tensors(hf_out)
  assert len([f for f in os.listdir(hf_out) if f.endswith(".safetensors")]) >= 2
  for name, t in exported.items():
    assert t.dtype == torch.bfloat16, name
    want = src.read_dense(name, tuple(slice(None) for _ in t.shape))
    if name.endswith(("experts.gate_up_proj", "experts.down_proj")):
      assert want.dtype == np.float32  # dequantized from _blocks/_scales
    np.testing.assert_array_equal(t.float().numpy(), np.asarray(want, np.float32), err_msg=name)
  assert {n for n in exported} | {n + s for n in exported for s in ("_blocks", "_scales")} >= set(src.tensors)
  with open(os.path.join(hf_out, "config.json")) as f:
    assert "quantization_config" not in json.load(f)

  # A second import into the same folder needs --overwrite, and then replaces the step.
  assert convert.main(["import", "--hf", mxfp4_dir, "--out", ckpt]) == 1
  assert "--overwrite" in capsys.readouterr().err
  assert convert.main(["import", "--hf", mxfp4_dir, "--out", ckpt, "--overwrite"]) == 0
  params, _ = load_params(ckpt)
  assert params["layers/gate_w"].dtype == np.dtype("bfloat16")


def test_user_errors_are_one_line(tmp_path, capsys):
  missing = str(tmp_path / "no_such_ckpt")
  assert convert.main(["export", "--checkpoint", missing, "--out", str(tmp_path / "o")]) == 1
  err = capsys.readouterr().err
  assert err.count("\n") == 1 and missing in err and "Traceback" not in err
  assert convert.main(["import", "--hf", missing, "--out", str(tmp_path / "o")]) == 1
  err = capsys.readouterr().err
  assert err.count("\n") == 1 and missing in err
  bad = tmp_path / "bad"
  bad.mkdir()
  (bad / "config.json").write_text(json.dumps({"model_type": "llama"}))
  assert convert.main(["import", "--hf", str(bad), "--out", str(tmp_path / "o")]) == 1
  assert "llama" in capsys.readouterr().err


def test_help_runs_as_a_module():
  out = subprocess.run([sys.executable, "-m", "numina_jax.convert", "export", "--help"], capture_output=True,
                       text=True, check=True).stdout
  assert "--checkpoint" in out and "--tokenizer" in out and "--step" in out
  bad = subprocess.run([sys.executable, "-m", "numina_jax.convert", "import", "--hf", "/nonexistent/x",
                        "--out", "/tmp/never"], capture_output=True, text=True)
  assert bad.returncode == 1 and bad.stderr.strip().splitlines() == [
      "convert import: error: no checkpoint folder at /nonexistent/x (and it is not a Hugging Face Hub repo id)"]
