"""Progress on stderr (tqdm): slides done / total and tiles done / total with rate and ETA.

Commands show the bars on a terminal; a log file (a batch job's stderr) gets a progress
line at most every ``LOG_INTERVAL_S`` seconds instead (slides, tiles, rate, time left), and
one line per slide as it ends.
"""

from __future__ import annotations

import sys
import time

LOG_INTERVAL_S = 30.0


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    if seconds >= 3600:
        return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"
    return f"{seconds // 60} min {seconds % 60:02d} s" if seconds >= 60 else f"{seconds} s"


class ProgressLines:
    """Progress for a non-terminal stderr: one line every ``interval_s`` seconds while work
    goes on, e.g. ``progress: slide 2 of 5 (b.svs), tiles 120 of 400 (30 %), 2.1 tiles/s,
    about 2 min 13 s left``."""

    def __init__(self, n_slides: int, interval_s: float | None = None, clock=time.monotonic, out=None):
        self.n_slides, self.clock = n_slides, clock
        self.interval_s = LOG_INTERVAL_S if interval_s is None else interval_s
        self.out = out if out is not None else sys.stderr
        self.slides_done = self.tiles_total = self.tiles = self.tiles_reused = 0
        self.current = ""
        self.t0 = self.t_last = clock()

    def add_tiles(self, n: int, name: str = "") -> None:
        self.tiles_total += n
        self.current = name or self.current

    def tiles_done(self, n: int, reused: bool = False) -> None:
        self.tiles += n
        self.tiles_reused += n if reused else 0
        self._maybe_print()

    def slide_done(self) -> None:
        self.slides_done += 1
        self._maybe_print()

    def line(self) -> str:
        elapsed = max(self.clock() - self.t0, 1e-9)
        rate = (self.tiles - self.tiles_reused) / elapsed
        slide = min(self.slides_done + 1, self.n_slides)
        parts = [f"progress: slide {slide} of {self.n_slides}" + (f" ({self.current})" if self.current else ""),
                 f"tiles {self.tiles} of {self.tiles_total} ({100 * self.tiles / max(self.tiles_total, 1):.0f} %)",
                 f"{rate:.2f} tiles/s"]
        if rate > 0 and self.tiles_total > self.tiles:
            parts.append(f"about {_duration((self.tiles_total - self.tiles) / rate)} left")
        return ", ".join(parts)

    def _maybe_print(self) -> None:
        now = self.clock()
        if now - self.t_last >= self.interval_s:
            self.t_last = now
            print(self.line(), file=self.out, flush=True)


def note(message: str) -> None:
    """One status line on stderr, printed above the progress bars when they are shown."""
    from tqdm import tqdm

    tqdm.write(message, file=sys.stderr)


class CohortProgress:
    """Two bars: slides (done / total) and tiles (done / total, whose total grows as slides
    are planned), or ``ProgressLines`` when stderr is not a terminal. Silent when ``enabled``
    is False. Use as a context manager."""

    def __init__(self, n_slides: int, enabled: bool = True):
        self.enabled = enabled
        self._slides = self._tiles = None
        self._lines: ProgressLines | None = None
        self.n_slides = n_slides

    def __enter__(self) -> CohortProgress:
        if self.enabled and not sys.stderr.isatty():
            self._lines = ProgressLines(self.n_slides)
        elif self.enabled:
            from tqdm import tqdm

            common = {"file": sys.stderr, "dynamic_ncols": True, "mininterval": 0.5, "maxinterval": 10}
            self._slides = tqdm(total=self.n_slides, desc="slides", unit="slide", position=0, **common)
            self._tiles = tqdm(total=0, desc="tiles ", unit="tile", position=1, **common)
        return self

    def add_tiles(self, n: int, name: str = "") -> None:
        """``n`` more tiles to segment (slide ``name`` was planned)."""
        if self._lines is not None:
            self._lines.add_tiles(n, name)
        if self._tiles is not None and n:
            self._tiles.total += n
            self._tiles.refresh()

    def tiles_done(self, n: int, reused: bool = False) -> None:
        """``n`` more tiles segmented (``reused``: results an earlier run had saved)."""
        if self._lines is not None:
            self._lines.tiles_done(n, reused)
        if self._tiles is not None:
            self._tiles.update(n)

    def slide_done(self) -> None:
        if self._lines is not None:
            self._lines.slide_done()
        if self._slides is not None:
            self._slides.update(1)

    def __exit__(self, *exc) -> None:
        for bar in (self._tiles, self._slides):
            if bar is not None:
                bar.close()
