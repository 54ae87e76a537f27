"""Progress on stderr (tqdm): slides done / total and tiles done / total with rate and ETA.

Commands show the bars on a terminal only; a log file (a cluster job) gets one line per
slide instead. Bars drawn into a file print at most every ``LOG_INTERVAL_S`` seconds.
"""

from __future__ import annotations

import sys

LOG_INTERVAL_S = 30.0


def note(message: str) -> None:
    """One status line on stderr, printed above the progress bars when they are shown."""
    from tqdm import tqdm

    tqdm.write(message, file=sys.stderr)


class CohortProgress:
    """Two bars: slides (done / total) and tiles (done / total, whose total grows as slides
    are planned). Silent when ``enabled`` is False. Use as a context manager."""

    def __init__(self, n_slides: int, enabled: bool = True):
        self.enabled = enabled
        self._slides = self._tiles = None
        self.n_slides = n_slides

    def __enter__(self) -> CohortProgress:
        if self.enabled:
            from tqdm import tqdm

            tty = sys.stderr.isatty()
            common = {"file": sys.stderr, "dynamic_ncols": True, "mininterval": 0.5 if tty else LOG_INTERVAL_S,
                      "maxinterval": 10 if tty else LOG_INTERVAL_S * 2}
            self._slides = tqdm(total=self.n_slides, desc="slides", unit="slide", position=0, **common)
            self._tiles = tqdm(total=0, desc="tiles ", unit="tile", position=1, **common)
        return self

    def add_tiles(self, n: int) -> None:
        """``n`` more tiles to segment (a slide was planned)."""
        if self._tiles is not None and n:
            self._tiles.total += n
            self._tiles.refresh()

    def tiles_done(self, n: int) -> None:
        if self._tiles is not None:
            self._tiles.update(n)

    def slide_done(self) -> None:
        if self._slides is not None:
            self._slides.update(1)

    def __exit__(self, *exc) -> None:
        for bar in (self._tiles, self._slides):
            if bar is not None:
                bar.close()
