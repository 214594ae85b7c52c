"""Progress of long CLI jobs that shows in a terminal and in logs alike.

On a terminal: tqdm's bar. Elsewhere (stderr redirected to a file, a job scheduler's log, a pipe): one plain line
each time another 10% is done or every INTERVAL_S seconds, whichever comes first, so a long run is never silent
in a log; nothing is printed before FIRST_LINE_AFTER_S seconds (``MSDDA_PROGRESS_AFTER_S`` overrides it), so a
short command's stderr stays empty and an error stays its one line. ``quiet`` turns both off.
"""
from __future__ import annotations

import math
import os
import sys
import time

__all__ = ["Progress", "INTERVAL_S", "FIRST_LINE_AFTER_S"]

INTERVAL_S = 10.0            # a log line at least this often while a job runs
FIRST_LINE_AFTER_S = 5.0     # nothing before this much time has passed (MSDDA_PROGRESS_AFTER_S overrides)
FRACTION = 0.1               # and a line each time another tenth is done


class Progress:
    """Counts ``total`` units (denoising steps) of the job ``desc``; ``update(n)`` as they finish, ``close()``
    at the end (or use it as a context manager)."""

    def __init__(self, total: int, desc: str, *, quiet: bool = False, unit: str = "step", stream=None,
                 clock=time.monotonic):
        self.total, self.desc, self.unit = max(int(total), 0), desc, unit
        self.stream = stream if stream is not None else sys.stderr
        self.clock = clock
        self.done = 0
        self.bar = None
        self.lines = 0
        self.last_done = 0
        self.mode = "off" if quiet or self.total == 0 else ("bar" if _isatty(self.stream) else "lines")
        if self.mode == "bar":
            from tqdm import tqdm

            self.bar = tqdm(total=self.total, desc=desc, unit=unit, leave=False, file=self.stream)
        self.first_line_after = first_line_after_s()
        self.start = self.last_line = clock()
        self.next_fraction = FRACTION

    def update(self, n: int = 1) -> None:
        self.done += n
        if self.mode == "bar":
            self.bar.update(n)
        elif self.mode == "lines":
            now = self.clock()
            if now - self.start < self.first_line_after:
                return
            fraction = self.done / self.total
            if fraction >= self.next_fraction or now - self.last_line >= INTERVAL_S:
                self._line(now)
                while self.next_fraction <= fraction:
                    self.next_fraction += FRACTION

    def _line(self, now: float) -> None:
        elapsed = now - self.start
        fraction = self.done / self.total
        left = f", about {elapsed * (1 - fraction) / fraction:.0f} s left" if 0 < fraction < 1 else ""
        print(f"msdda: {self.desc}: {self.done}/{self.total} {self.unit}s ({100 * fraction:.0f}%), "
              f"{elapsed:.0f} s{left}", file=self.stream, flush=True)
        self.lines += 1
        self.last_line, self.last_done = now, self.done

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        elif self.mode == "lines" and self.lines and self.last_done != self.done:
            self._line(self.clock())          # the log ends with where the job stopped

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def first_line_after_s() -> float:
    """Seconds before the first log line: $MSDDA_PROGRESS_AFTER_S (a number >= 0, or inf for never) or
    FIRST_LINE_AFTER_S."""
    text = os.environ.get("MSDDA_PROGRESS_AFTER_S", "").strip()
    try:
        value = float(text) if text else FIRST_LINE_AFTER_S
    except ValueError:
        return FIRST_LINE_AFTER_S
    return value if value >= 0 and not math.isnan(value) else FIRST_LINE_AFTER_S


def _isatty(stream) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False
