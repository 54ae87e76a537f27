"""Progress for a non-terminal stderr (a batch job's log): a line at a fixed interval."""

from __future__ import annotations

import io
import sys

from wsi_ircr.progress import CohortProgress, ProgressLines


class Clock:
    def __init__(self):
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def test_a_line_per_interval_with_slide_tiles_rate_and_time_left():
    clock, out = Clock(), io.StringIO()
    lines = ProgressLines(2, interval_s=30, clock=clock, out=out)
    lines.add_tiles(100, "a.svs")
    lines.tiles_done(10, reused=True)  # an earlier run's results: not in the rate
    clock.t = 10
    lines.tiles_done(20)
    assert out.getvalue() == ""  # within the interval: quiet
    clock.t = 40
    lines.tiles_done(20)
    assert out.getvalue() == "progress: slide 1 of 2 (a.svs), tiles 50 of 100 (50 %), 1.00 tiles/s, about 50 s left\n"
    lines.slide_done()
    lines.add_tiles(200, "b.svs")
    clock.t = 100
    lines.tiles_done(50)
    last = out.getvalue().splitlines()[-1]
    assert last == "progress: slide 2 of 2 (b.svs), tiles 100 of 300 (33 %), 0.90 tiles/s, about 3 min 42 s left"


def test_cohort_progress_uses_lines_off_a_terminal(monkeypatch):
    err = io.StringIO()
    monkeypatch.setattr(sys, "stderr", err)
    monkeypatch.setattr("wsi_ircr.progress.LOG_INTERVAL_S", 0.0)
    with CohortProgress(1) as progress:
        progress.add_tiles(4, "s.svs")
        progress.tiles_done(4)
        progress.slide_done()
    text = err.getvalue()
    assert "progress: slide 1 of 1 (s.svs), tiles 4 of 4 (100 %)" in text and "\r" not in text and "it/s" not in text
