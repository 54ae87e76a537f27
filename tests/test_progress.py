"""Cohort progress bars (tqdm): totals grow as slides are planned; silent when disabled."""

from __future__ import annotations

import io
import sys

from wsi_ircr.progress import CohortProgress, note


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_bars_count_slides_and_tiles_with_a_growing_total(monkeypatch):
    err = _Terminal()
    monkeypatch.setattr(sys, "stderr", err)
    with CohortProgress(2) as progress:
        progress.add_tiles(6)
        progress.tiles_done(6)
        progress.slide_done()
        progress.add_tiles(4)
        progress.tiles_done(4)
        progress.slide_done()
        assert (progress._tiles.n, progress._tiles.total) == (10, 10)
        assert (progress._slides.n, progress._slides.total) == (2, 2)
    text = err.getvalue()
    assert "slides: 100%" in text and "10/10" in text and "2/2" in text


def test_disabled_progress_is_silent_and_notes_are_one_line(monkeypatch, capsys):
    with CohortProgress(3, enabled=False) as progress:
        progress.add_tiles(5)
        progress.tiles_done(5)
        progress.slide_done()
    note("a.svs: done")
    assert capsys.readouterr().err == "a.svs: done\n"
