"""A small progress bar on stderr (done / total, rate, ETA); silent when disabled."""

from __future__ import annotations

import sys
import time


def _clock(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    return f"{seconds // 60:02d}:{seconds % 60:02d}" if seconds < 3600 else f"{seconds // 3600}h{seconds % 3600 // 60:02d}"


def note(message: str) -> None:
    """One status line on stderr (for the user, beside the progress bars)."""
    sys.stderr.write(message + "\n")
    sys.stderr.flush()


class Progress:
    """``with Progress("segment", total) as bar: bar.update(n)``.

    On a terminal the line is redrawn in place; otherwise a line is printed at most every
    10 % so logs of cluster jobs stay short.
    """

    def __init__(self, label: str, total: int, enabled: bool = True, unit: str = "tiles"):
        self.label, self.total, self.enabled, self.unit = label, total, enabled, unit
        self.done = 0
        self.start = time.monotonic()
        self._tty = enabled and sys.stderr.isatty()
        self._last_decile = -1

    def __enter__(self) -> Progress:
        self._draw()
        return self

    def update(self, n: int = 1) -> None:
        self.done += n
        self._draw()

    def _draw(self, final: bool = False) -> None:
        if not self.enabled:
            return
        elapsed = time.monotonic() - self.start
        rate = self.done / elapsed if elapsed > 0 else 0.0
        eta = max(self.total - self.done, 0) / rate if rate > 0 else 0.0
        frac = min(self.done / self.total, 1.0) if self.total else 1.0
        bar = "#" * int(frac * 20)
        line = f"{self.label}: [{bar:<20}] {self.done}/{self.total} {self.unit} {_clock(elapsed)} elapsed, ETA {_clock(eta)}"
        if self._tty:
            sys.stderr.write("\r" + line + ("\n" if final else ""))
            sys.stderr.flush()
            return
        decile = int(frac * 10)
        if decile > self._last_decile:
            self._last_decile = decile
            sys.stderr.write(line + "\n")
            sys.stderr.flush()

    def __exit__(self, *exc) -> None:
        if self._tty:
            self._draw(final=True)
