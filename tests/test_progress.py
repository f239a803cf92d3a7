"""`progress.Progress`: log lines with count, percentage, rate and ETA, at most every
`every_secs` and at the end; the rate leaves out the first chunk (compilation)."""

from asyncpatch_jax.progress import Progress, format_duration


def test_lines_rate_and_eta():
  now, lines = [100.0], []
  progress = Progress("FID samples", 1000, unit="images", every_secs=30, log=lines.append,
                      clock=lambda: now[0])
  progress.update(100)  # the first batch, compilation included: starts the clock
  assert lines == ["FID samples: 100 / 1,000 images (10.0%)"]
  now[0] = 110.0
  progress.update(100)  # not due yet
  now[0] = 140.0
  progress.update(300)  # 400 images after the first in 40 s: 10/s, 500 to go
  assert lines[-1] == "FID samples: 500 / 1,000 images (50.0%), 10 images/s, ETA 0:50"
  now[0] = 141.0
  progress.update(500)  # the end is always logged
  assert len(lines) == 3 and lines[-1].startswith("FID samples: 1,000 / 1,000 images (100.0%)")
  assert "ETA" not in lines[-1]


def test_format_duration():
  assert format_duration(65) == "1:05"
  assert format_duration(3725) == "1:02:05"
  assert format_duration(-3) == "0:00"
