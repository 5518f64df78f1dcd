"""Sandboxed python calls per second and per-call overhead, against a bare `python -c` subprocess.

  python benchmarks/bench_sandbox.py                    # 100 timed calls each, pool of os.cpu_count() workers
  python benchmarks/bench_sandbox.py --calls 300 --workers 4 --json

Latency: each sandboxed call is paired with bare calls of the same code run just before it, and the overhead is the
difference within the pair (p50, p99). Two bare references: `python -I -c` (a fresh interpreter, as Numina ran it)
and `python -I -S -c` (the start the sandbox itself uses: no site, no .pth files), which isolates bwrap's cost.
Throughput: the same calls through `SandboxPool` and through a thread pool of bare `python -I -c` subprocesses.
CPU per call (all processes of a call, summed): read from a temporary cgroup when one can be made (as root); on a
shared machine it is the figure that does not depend on the other jobs, and cores / CPU per call bounds the rate.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from numina_jax.sandbox import SandboxPool, find_bwrap, run_python  # noqa: E402

CODE = "print(sum(i * i for i in range(1000)))"
EXPECTED = "332833500\n"


class CpuMeter:
  """Total CPU time of this process and everything it starts (bwrap's orphaned pid 1 included), from a cgroup of
  its own: cgroup v1 cpuacct, or v2. `None` readings when no cgroup could be made."""

  def __init__(self):
    self.path = self.parent = None
    for root, usage in (("/sys/fs/cgroup/cpuacct", "cpuacct.usage"), ("/sys/fs/cgroup/unified", "cpu.stat"),
                        ("/sys/fs/cgroup", "cpu.stat")):
      path = Path(root, f"bench-sandbox-{os.getpid()}")
      try:
        path.mkdir()
      except OSError:
        continue
      try:
        (path / "cgroup.procs").write_text(str(os.getpid()))
        self.path, self.parent, self.usage = path, Path(root), usage
        return
      except OSError:
        path.rmdir()

  def read(self) -> float | None:
    if self.path is None:
      return None
    text = (self.path / self.usage).read_text()
    if self.usage == "cpuacct.usage":
      return int(text) / 1e9
    return int(dict(line.split() for line in text.splitlines())["usage_usec"]) / 1e6

  def close(self) -> None:
    if self.path is not None:
      (self.parent / "cgroup.procs").write_text(str(os.getpid()))
      for _ in range(50):  # the last sandboxes' pid 1 may take a moment to be reaped
        try:
          self.path.rmdir()
          return
        except OSError:
          time.sleep(0.1)


def bare(code: str, site: bool) -> None:
  cmd = [sys.executable, "-I", *(() if site else ("-S",)), "-c", code]
  proc = subprocess.run(cmd, capture_output=True, check=True, timeout=60)
  assert proc.stdout.decode() == EXPECTED, proc.stdout


def sandboxed(code: str) -> None:
  r = run_python(code)
  assert r.output == EXPECTED, r


def pct(xs, q) -> float:
  return float(np.percentile(np.asarray(xs) * 1e3, q))


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--calls", type=int, default=100, help="timed calls per measurement")
  ap.add_argument("--workers", type=int, default=os.cpu_count(), help="parallel calls in the throughput runs")
  ap.add_argument("--json", action="store_true", help="print one JSON line instead of the table")
  args = ap.parse_args()
  if args.calls < 2 or args.workers < 1:
    ap.error("--calls must be at least 2 and --workers at least 1")
  find_bwrap()  # the one-time probe is not part of any call
  runs = {"sandbox": lambda: sandboxed(CODE), "bare": lambda: bare(CODE, True),
          "bare_nosite": lambda: bare(CODE, False)}
  for _ in range(3):  # warm the page cache for every side
    for fn in runs.values():
      fn()

  meter = CpuMeter()
  try:
    wall = {k: [] for k in runs}
    cpu = {k: 0.0 for k in runs}
    for _ in range(args.calls):
      for k, fn in runs.items():
        c, t = meter.read(), time.perf_counter()
        fn()
        wall[k].append(time.perf_counter() - t)
        if c is not None:
          cpu[k] += meter.read() - c
  finally:
    meter.close()
  over = {ref: [s - b for s, b in zip(wall["sandbox"], wall[ref])] for ref in ("bare", "bare_nosite")}

  def rate(fn) -> float:
    t = time.perf_counter()
    fn()
    return args.calls / (time.perf_counter() - t)

  with SandboxPool(workers=args.workers) as pool:
    sb_rate = rate(lambda: [f.result() for f in [pool.submit(CODE) for _ in range(args.calls)]])
  with concurrent.futures.ThreadPoolExecutor(args.workers) as ex:
    bare_rate = rate(lambda: list(ex.map(lambda _: bare(CODE, True), range(args.calls))))

  out = {
      "calls": args.calls, "workers": args.workers, "cpus": os.cpu_count(), "load_avg_1m": os.getloadavg()[0],
      "sandbox_calls_per_s": sb_rate, "bare_calls_per_s": bare_rate, "throughput_ratio": sb_rate / bare_rate,
      **{f"{k}_p50_ms": pct(v, 50) for k, v in wall.items()},
      **{f"{k}_p99_ms": pct(v, 99) for k, v in wall.items()},
      **{f"overhead_vs_{k}_p50_ms": pct(v, 50) for k, v in over.items()},
      **{f"overhead_vs_{k}_p99_ms": pct(v, 99) for k, v in over.items()},
      **{f"{k}_cpu_ms": (1e3 * v / args.calls if meter.path else None) for k, v in cpu.items()},
  }
  if args.json:
    print(json.dumps(out))
    return
  print(f"{args.calls} calls of {CODE!r}; {args.workers} workers on {out['cpus']} cpus; "
        f"load average {out['load_avg_1m']:.1f}")
  print(f"{'':26s}{'p50 ms':>9s}{'p99 ms':>9s}{'cpu ms':>9s}")
  for k in wall:
    c = out[f"{k}_cpu_ms"]
    print(f"{k + ' latency':26s}{out[k + '_p50_ms']:9.1f}{out[k + '_p99_ms']:9.1f}"
          + (f"{c:9.1f}" if c is not None else f"{'n/a':>9s}"))
  for k in over:
    print(f"{'overhead vs ' + k:26s}{out[f'overhead_vs_{k}_p50_ms']:9.1f}{out[f'overhead_vs_{k}_p99_ms']:9.1f}")
  print(f"latency ratio sandbox / bare (p50): {out['sandbox_p50_ms'] / out['bare_p50_ms']:.2f}x; "
        f"sandbox / bare_nosite: {out['sandbox_p50_ms'] / out['bare_nosite_p50_ms']:.2f}x")
  print(f"throughput: sandbox {sb_rate:.1f}/s, bare {bare_rate:.1f}/s, ratio {out['throughput_ratio']:.2f}x")
  if out["sandbox_cpu_ms"]:
    print(f"CPU per call: sandbox {out['sandbox_cpu_ms']:.1f} ms, bare {out['bare_cpu_ms']:.1f} ms "
          f"(ratio {out['sandbox_cpu_ms'] / out['bare_cpu_ms']:.2f}x); on {out['cpus']} idle cores at most "
          f"{out['cpus'] * 1e3 / out['sandbox_cpu_ms']:.0f} sandboxed calls/s")
  else:
    print("CPU per call: n/a (needs a cgroup this process may create, e.g. as root)")


if __name__ == "__main__":
  main()
