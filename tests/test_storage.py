"""Every output on a local disk and on gs:// (a real fake-gcs-server on 127.0.0.1): the path layer, metrics.jsonl
without appends, TensorBoard events, and a training run that writes to a bucket and resumes from it."""

import gc
import json
import struct

import numpy as np
import pytest

from numina_jax import storage
from numina_jax.metrics import MetricWriter, read_metrics


@pytest.fixture(params=["local", "gs"])
def workdir(request, tmp_path):
  if request.param == "local":
    return str(tmp_path / "run")
  return request.getfixturevalue("gcs_bucket") + "/run"


def tb_events(workdir):
  """{event file name: [(step, tag or 'purge', value)]} read back from workdir/tb (TFRecord framing)."""
  from tensorboardX.proto import event_pb2
  out = {}
  for name in storage.listdir(storage.join(workdir, "tb")):
    data = storage.path(storage.join(workdir, "tb", name)).read_bytes()
    events, i = [], 0
    while i < len(data):
      (n,) = struct.unpack("<Q", data[i:i + 8])
      e = event_pb2.Event.FromString(data[i + 12:i + 12 + n])
      i += 12 + n + 4
      if e.HasField("session_log"):
        events.append((e.step, "purge", None))
      for v in e.summary.value:
        events.append((e.step, v.tag, v.simple_value))
    out[name] = events
  return out


def steps(workdir, key="loss"):
  return [(r["step"], r[key]) for r in read_metrics(workdir) if key in r]


def test_writes_show_after_flush_and_no_line_is_lost(workdir):
  w = MetricWriter(workdir, flush_every_secs=3600)
  for s in (1, 2, 3):
    w.write(s, {"loss": float(s)})
  # On a bucket nothing shows before a flush (the whole object is written then); on a disk each line at once.
  assert steps(workdir) == ([] if storage.is_remote(workdir) else [(1, 1.0), (2, 2.0), (3, 3.0)])
  w.flush()
  assert steps(workdir) == [(1, 1.0), (2, 2.0), (3, 3.0)]
  for s in (4, 5):
    w.write(s, {"loss": float(s)})
  w.flush()  # a second write of the object: appending there would keep only these two lines
  w.write(6, {"loss": 6.0})
  w.close()
  assert steps(workdir) == [(s, float(s)) for s in range(1, 7)]
  (events,) = tb_events(workdir).values()
  assert [(s, v) for s, tag, v in events if tag == "loss"] == [(s, float(s)) for s in range(1, 7)]


def test_resume_drops_what_an_earlier_attempt_logged_after_the_checkpoint(workdir):
  w = MetricWriter(workdir)
  for s in range(1, 7):
    w.write(s, {"loss": float(s)})
    if s == 4:
      w.write(s, {"eval_loss": 0.5})
  w.close()
  # The run crashed after step 6 and restarts from its checkpoint at step 4.
  w = MetricWriter(workdir, resume_step=4)
  assert [r["step"] for r in read_metrics(workdir)] == [1, 2, 3, 4, 4]
  for s in (5, 6):
    w.write(s, {"loss": 10.0 + s})
  w.close()
  assert steps(workdir) == [(1, 1.0), (2, 2.0), (3, 3.0), (4, 4.0), (5, 15.0), (6, 16.0)]
  assert steps(workdir, "eval_loss") == [(4, 0.5)]
  # TensorBoard: a second event file that starts with a purge of steps >= 5, so the old 5 and 6 are hidden.
  files = tb_events(workdir)
  assert len(files) == 2
  (second,) = [ev for ev in files.values() if ev and ev[0][1] == "purge"]
  assert second[0][0] == 5 and [(s, v) for s, tag, v in second if tag == "loss"] == [(5, 15.0), (6, 16.0)]
  # resume_step=None keeps every line.
  MetricWriter(workdir, resume_step=None).close()
  assert len(read_metrics(workdir)) == 7


def test_a_disabled_writer_touches_nothing(workdir):
  w = MetricWriter(workdir, enabled=False)
  w.write(1, {"loss": 1.0})
  w.write_summary({"a": 1})
  w.close()
  assert storage.listdir(workdir) == []


def test_unfinished_last_line_is_left_out_and_bad_lines_are_named(tmp_path, caplog):
  wd = tmp_path / "run"
  wd.mkdir()
  (wd / "metrics.jsonl").write_text('{"step": 1, "loss": 1.0}\n{"step": 2, "lo')  # killed mid-line
  w = MetricWriter(str(wd), resume_step=1)
  assert "leaving out the unfinished last line 2" in caplog.text
  w.write(2, {"loss": 2.0})
  w.close()
  assert steps(str(wd)) == [(1, 1.0), (2, 2.0)]
  (wd / "metrics.jsonl").write_text('{"step": 1, "loss": 1.0}\nnot json\n{"step": 3, "loss": 1.0}\n')
  with pytest.raises(ValueError, match=r"metrics\.jsonl line 2: not a metrics record"):
    read_metrics(str(wd))


def test_open_write_is_whole_or_nothing(workdir):
  storage.makedirs(workdir)
  target = storage.join(workdir, "model.safetensors")
  storage.write_text(target, "old")
  big = "x" * (6 << 20)  # past gcsfs's 5 MiB block: the upload has started when the error comes
  for dest, mode in [(target, "wb"), (storage.join(workdir, "new.bin"), "wb"), (target, "w")]:
    with pytest.raises(RuntimeError, match="device lost"):
      with storage.open_write(dest, mode) as f:
        f.write(big if mode == "w" else big.encode())
        raise RuntimeError("device lost")
  gc.collect()  # a dropped file object must not commit the partial upload when collected
  storage.refresh(workdir)
  assert storage.read_text(target) == "old"
  assert storage.listdir(workdir) == ["model.safetensors"]
  with storage.open_write(target, "w") as f:
    f.write("new")
  assert storage.read_text(target) == "new"


def _download(remote_dir, local_dir):
  storage.refresh(remote_dir)
  local_dir.mkdir(parents=True)
  for name in storage.listdir(remote_dir):
    (local_dir / name).write_bytes(storage.path(storage.join(remote_dir, name)).read_bytes())
  return local_dir


def _same_files(a, b, names):
  for name in names:
    assert (a / name).read_bytes() == (b / name).read_bytes(), name


@pytest.mark.slow
def test_a_training_run_writes_everything_to_a_bucket_and_resumes_from_it(gcs_bucket, tmp_path):
  from numina_jax import convert
  from numina_jax.checkpoint import latest_step, load_params
  from numina_jax.hf import load_pretrained_params, save_pretrained
  from numina_jax.trainer import train
  from test_trainer import tiny_config

  wd, ckpts = f"{gcs_bucket}/run", f"{gcs_bucket}/run/checkpoints"

  def config(**kw):
    cfg = tiny_config(tmp_path / "unused", max_steps=6, checkpoint_every_steps=3, export_dtype="float32", **kw)
    cfg.workdir, cfg.data.cache_dir = wd, str(tmp_path / "cache")
    return cfg

  ra = train(config())
  assert ra["final_step"] == 6 and not ra["preempted"]
  losses_a = steps(wd)
  assert [s for s, _ in losses_a] == [1, 2, 3, 4, 5, 6]
  assert latest_step(ckpts) == 6
  params_a, model_cfg = load_params(ckpts)

  # A crash while step 6 was being saved: its folder is there but unfinished (on gs:// Orbax marks a finished
  # step with commit_success.txt), and metrics.jsonl already holds steps 4-6. The same command, now also
  # plotting and exporting, resumes from step 3.
  storage.remove(f"{ckpts}/6/commit_success.txt")
  assert latest_step(ckpts) == 3
  rb = train(config(plot=True, export_hf=True))
  assert rb["start_step"] == 3 and rb["final_step"] == 6 and rb["hf_export"] == f"{wd}/hf"
  assert steps(wd) == losses_a  # every step once, and 4-6 recomputed bit for bit
  assert latest_step(ckpts) == 6
  params_b, _ = load_params(ckpts)
  for k in params_a:
    np.testing.assert_array_equal(np.asarray(params_b[k]), np.asarray(params_a[k]), err_msg=k)

  # Every output is in the bucket, none in a local folder named after it.
  assert {"checkpoints", "metrics.jsonl", "tb", "training.png", "summary.json", "config.json",
          "model_config.json", "hf"} <= set(storage.listdir(wd))
  assert not any(p.name.startswith("gs:") for p in tmp_path.iterdir()) and not (tmp_path / "unused").exists()
  assert storage.path(f"{wd}/training.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  summary = json.loads(storage.read_text(f"{wd}/summary.json"))
  assert (summary["start_step"], summary["final_step"]) == (3, 6)
  assert json.loads(storage.read_text(f"{wd}/config.json"))["workdir"] == wd
  assert json.loads(storage.read_text(f"{wd}/model_config.json"))["hidden_size"] == 32
  assert len(tb_events(wd)) == 2  # one event file per attempt

  # The export in the bucket is byte for byte what a local export of the same weights writes, and loads.
  hf = _download(f"{wd}/hf", tmp_path / "hf")
  ref = tmp_path / "hf_ref"
  save_pretrained(params_a, str(ref), np.float32, cfg=model_cfg, progress=False)
  model_files = sorted(p.name for p in ref.iterdir())
  assert "tokenizer.json" in {p.name for p in hf.iterdir()}
  _same_files(hf, ref, model_files)
  loaded, _ = load_pretrained_params(str(hf), np.float32, progress=False)
  for k in params_a:
    np.testing.assert_array_equal(np.asarray(loaded[k]), np.asarray(params_a[k]), err_msg=k)
  # `convert export` from the bucket's checkpoint into the bucket.
  assert convert.main(["export", "--checkpoint", ckpts, "--out", f"{gcs_bucket}/export", "--dtype", "float32",
                       "--mesh", "data=2,fsdp=2,tensor=2"]) == 0  # the run's mesh: its compiled slices are reused
  _same_files(_download(f"{gcs_bucket}/export", tmp_path / "hf_convert"), ref, model_files)
  # `convert import` into the bucket (and again over it); reading HF weights from gs:// asks for a local copy.
  for extra in ([], ["--overwrite"]):
    assert convert.main(["import", "--hf", str(hf), "--out", f"{gcs_bucket}/imported", "--dtype", "float32",
                         "--mesh", "data=2,fsdp=2,tensor=2", *extra]) == 0
  assert storage.listdir(f"{gcs_bucket}/imported") == ["0"]
  imported, _ = load_params(f"{gcs_bucket}/imported")
  for k in params_a:
    np.testing.assert_array_equal(np.asarray(imported[k]), np.asarray(params_a[k]), err_msg=k)
  with pytest.raises(FileNotFoundError, match="copy it first"):
    load_pretrained_params(f"{wd}/hf")
