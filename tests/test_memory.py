"""Process memory settings (wsi_ircr.slide.memory); their effect is measured in benchmarks/slide.md."""

from __future__ import annotations

import ctypes
import subprocess
import sys

import pytest

from wsi_ircr.slide import memory


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_arenas_are_capped_on_glibc():
    code = "from wsi_ircr.slide.memory import limit_malloc_arenas as f; import sys; sys.exit(0 if f(2) and f(1) else 3)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


def test_without_mallopt_nothing_happens(monkeypatch):
    def no_libc(*args, **kwargs):
        raise OSError("no C library here")

    monkeypatch.setattr(ctypes, "CDLL", no_libc)
    assert memory.limit_malloc_arenas() is False
