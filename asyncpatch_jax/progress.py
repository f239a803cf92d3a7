"""Progress of long jobs (FID sampling, reference statistics, latent caching) as log lines with a
rate and an ETA, not bars: they read well in pod logs and files.

    progress = Progress("FID samples", total=50_000, unit="images")
    for batch in batches:
      ...
      progress.update(len(batch))   # logs at most every `every_secs`, and at the end

Training reports its own progress through CLU's `periodic_actions.ReportProgress`.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from absl import logging


def format_duration(seconds: float) -> str:
  """3725 → '1:02:05'; 65 → '1:05'."""
  seconds = max(0, round(seconds))
  hours, rest = divmod(seconds, 3600)
  minutes, secs = divmod(rest, 60)
  return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


class Progress:
  """Counts work done towards `total` and logs `what: done / total (pct), rate, ETA` at most every
  `every_secs` seconds and when the total is reached.

  The clock starts at the first `update`: that first chunk (which often includes compilation)
  happened before it, so the rate averages the work after it.
  """

  def __init__(self, what: str, total: int, *, unit: str = "", every_secs: float = 30.0,
               log: Callable[[str], None] | None = None,
               clock: Callable[[], float] = time.monotonic):
    self.what, self.total, self.unit, self.every_secs = what, int(total), unit, float(every_secs)
    self._log = log or (lambda line: logging.info("%s", line))
    self._clock = clock
    self.done = 0
    self._start: float | None = None
    self._first = 0
    self._last_log = -float("inf")

  def update(self, n: int = 1) -> None:
    """Records `n` more units of work; logs when due."""
    now = self._clock()
    if self._start is None:
      self._start, self._first = now, int(n)
    self.done += int(n)
    if self.done >= self.total or now - self._last_log >= self.every_secs:
      self._last_log = now
      self._log(self.line(now))

  def line(self, now: float | None = None) -> str:
    """The log line for the current count."""
    now = self._clock() if now is None else now
    elapsed = 0.0 if self._start is None else now - self._start
    counted = self.done - self._first
    unit = f" {self.unit}" if self.unit else ""
    text = f"{self.what}: {self.done:,} / {self.total:,}{unit}"
    if self.total > 0:
      text += f" ({100.0 * self.done / self.total:.1f}%)"
    if elapsed > 0 and counted > 0:
      rate = counted / elapsed
      text += f", {rate:,.3g}{unit}/s"
      if self.done < self.total:
        text += f", ETA {format_duration((self.total - self.done) / rate)}"
    return text
