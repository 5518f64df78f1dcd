"""Checkpoint retention and errors: the last N and the best by eval loss survive; damage is reported."""

import os

import numpy as np
import orbax.checkpoint as ocp
import pytest

from numina_jax import checkpoint as ckpt
from numina_jax.model import GptOss, tiny_config


def test_keeps_latest_and_best_by_eval_loss(tmp_path):
  mgr = ckpt.training_manager(str(tmp_path), max_to_keep=1, keep_best=1, async_save=False)
  for step, loss in [(1, 3.0), (2, 1.0), (3, 2.0), (4, 4.0)]:
    mgr.save(step, args=ocp.args.Composite(**{ckpt.TRAIN_META: ocp.args.JsonSave({"step": step})}),
             metrics={"eval_loss": loss})
  mgr.wait_until_finished()
  mgr.close()
  assert sorted(int(d) for d in os.listdir(tmp_path) if d.isdigit()) == [2, 4]
  assert ckpt.best_step(str(tmp_path)) == 2
  assert ckpt.latest_step(str(tmp_path)) == 4


def test_params_round_trip_and_clear_errors(tmp_path):
  cfg = tiny_config()
  params = GptOss(cfg).params_dict()
  ckpt.save_params(str(tmp_path / "c"), params, cfg)
  restored, cfg2 = ckpt.load_params(str(tmp_path / "c"))
  assert cfg2 == cfg
  for k, v in params.items():
    np.testing.assert_array_equal(np.asarray(restored[k]), np.asarray(v), err_msg=k)
  with pytest.raises(FileNotFoundError, match="no checkpoint directory at .*nowhere"):
    ckpt.load_params(str(tmp_path / "nowhere"))
  # A damaged parameter file is reported with the checkpoint's path, not silently zero-filled.
  for root, _, files in os.walk(tmp_path / "c" / "0" / "params"):
    for f in files:
      if f.startswith("ocdbt") or root.endswith("d"):
        path = os.path.join(root, f)
        with open(path, "r+b") as fh:
          fh.truncate(max(os.path.getsize(path) // 2, 1))
  with pytest.raises(ValueError, match="could not read checkpoint"):
    ckpt.load_params(str(tmp_path / "c"))
