"""Training progress: a tqdm bar on a terminal; in a log file, a plain line every N steps or 30 s, whichever is rarer."""

from __future__ import annotations

import datetime
import logging
import sys
import time
from typing import Any, Callable

log = logging.getLogger("numina_jax")


class Progress:
  """`update(step)` after every step, `note(record)` with each logged metrics record, `close()` at the end.

  When `stream` (stderr) is not a terminal, a bar would write a line per step into log files (and block a parent
  that does not drain the pipe); there, a line goes out only once both `every_steps` steps and `min_secs`
  seconds passed since the last one.
  """

  def __init__(self, desc: str, total: int, initial: int, every_steps: int, *, enabled: bool = True,
               stream=None, min_secs: float = 30.0, clock: Callable[[], float] = time.monotonic):
    self.desc, self.total, self.every_steps, self.min_secs = desc, total, max(every_steps, 1), min_secs
    self.enabled = enabled
    self._clock = clock
    self._info: dict[str, str] = {}
    self._bar = None
    self._last_step, self._start_step = initial, initial
    self._start_t = self._last_t = clock()
    stream = sys.stderr if stream is None else stream
    self.interactive = enabled and bool(getattr(stream, "isatty", lambda: False)())  # a bar (not lines)
    if self.interactive:
      from tqdm.auto import tqdm  # only a terminal gets a bar
      self._bar = tqdm(total=total, initial=initial, desc=desc, unit="step", dynamic_ncols=True, file=stream)

  def note(self, record: dict[str, Any]) -> None:
    """The latest logged metrics, shown with the next line (or on the bar)."""
    self._info = {"loss": f"{record['loss']:.4f}", "lr": f"{record['lr']:.2e}",
                  "tok_s": f"{record.get('tokens_per_s', 0.0):,.0f}"}
    if self._bar is not None:
      self._bar.set_postfix(self._info, refresh=False)

  def update(self, step: int) -> None:
    if not self.enabled:
      return
    if self._bar is not None:
      self._bar.update(step - self._bar.n)
      return
    now = self._clock()
    if step - self._last_step >= self.every_steps and now - self._last_t >= self.min_secs:
      log.info("%s", self.line(step, now))
      self._last_step, self._last_t = step, now

  def line(self, step: int, now: float) -> str:
    elapsed = now - self._start_t
    done = step - self._start_step
    eta = elapsed / done * (self.total - step) if done > 0 else None
    parts = [f"{self.desc} step {step}/{self.total} ({100 * step / max(self.total, 1):.0f}%)"]
    parts += [f"{k} {v}" for k, v in self._info.items()]
    parts.append(f"elapsed {_hms(elapsed)}" + (f", eta {_hms(eta)}" if eta is not None else ""))
    return ", ".join(parts)

  def close(self) -> None:
    if self._bar is not None:
      self._bar.close()
      self._bar = None


def _hms(seconds: float) -> str:
  return str(datetime.timedelta(seconds=int(seconds)))
