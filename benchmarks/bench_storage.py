"""How to write a large file (an HF export shard) to gs://: streamed through epath's file object (what
`storage.open_write` does) against the alternative, a local temporary file uploaded whole at the end.

  python benchmarks/bench_storage.py                       # against fake-gcs-server on 127.0.0.1
  python benchmarks/bench_storage.py --mib 1024 --bucket gs://my-bucket/tmp   # against a real bucket

Each method runs in its own subprocess, so its peak RSS (ru_maxrss) is its own.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CHUNK = 32 << 20  # what save_pretrained hands over at a time, at most (256 MiB) / 8


def _one(method: str, dest: str, mib: int) -> dict:
  from numina_jax import storage
  import numpy as np
  chunk = np.random.default_rng(0).integers(0, 255, CHUNK, dtype=np.uint8).tobytes()
  n = mib * (1 << 20) // CHUNK
  base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
  t = time.perf_counter()
  if method == "stream":
    with storage.open_write(dest, "wb") as f:
      for _ in range(n):
        f.write(chunk)
  else:
    with tempfile.NamedTemporaryFile() as tmp:
      for _ in range(n):
        tmp.write(chunk)
      tmp.flush()
      storage.upload(tmp.name, dest)
  dt = time.perf_counter() - t
  storage.refresh(dest)
  assert storage.path(dest).stat().length == n * CHUNK
  peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
  return {"seconds": dt, "mib_s": n * CHUNK / (1 << 20) / dt, "rss_growth_mib": (peak - base) / 1024}


def main() -> int:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--mib", type=int, default=512, help="file size in MiB (default: %(default)s)")
  p.add_argument("--bucket", default=None, help="gs:// folder to write to (default: a local fake-gcs-server)")
  p.add_argument("--_child", nargs=2, metavar=("METHOD", "DEST"), help=argparse.SUPPRESS)
  args = p.parse_args()
  if args._child:
    print(json.dumps(_one(*args._child, args.mib)))
    return 0

  env, server = dict(os.environ), None
  if args.bucket is None:
    sys.path.insert(0, str(REPO / "tests"))
    import gcs_emulator
    server = gcs_emulator.Emulator(gcs_emulator.binary()).start()
    env.update(server.env())
    env.pop("GOOGLE_APPLICATION_CREDENTIALS", None)
    base = f"gs://{server.create_bucket('bench')}"
  else:
    base = args.bucket.rstrip("/")
  env["PYTHONPATH"] = f"{REPO}{os.pathsep}{env.get('PYTHONPATH', '')}"
  try:
    res = {}
    for method in ("stream", "temp"):
      out = subprocess.run([sys.executable, __file__, "--mib", str(args.mib), "--_child", method,
                            f"{base}/bench-{method}.bin"], env=env, capture_output=True, text=True, check=True)
      res[method] = json.loads(out.stdout.strip().splitlines()[-1])
  finally:
    if server is not None:
      server.close()
  where = args.bucket or "fake-gcs-server on 127.0.0.1"
  print(f"{args.mib} MiB to {where}, written in {CHUNK >> 20} MiB pieces")
  print(f"{'method':<28}{'seconds':>9}{'MiB/s':>9}{'RSS growth MiB':>16}")
  names = {"stream": "stream (storage.open_write)", "temp": "local temp file + upload"}
  for m, r in res.items():
    print(f"{names[m]:<28}{r['seconds']:>9.2f}{r['mib_s']:>9.1f}{r['rss_growth_mib']:>16.0f}")
  print(f"stream / temp time: {res['stream']['seconds'] / res['temp']['seconds']:.2f}x "
        "(the temp file also needs that much local disk)")
  return 0


if __name__ == "__main__":
  sys.exit(main())
