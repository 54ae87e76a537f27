"""Atomic file writes: a crash or a kill never leaves a half file under the final name."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` only on success.

    Works for files and directories; an existing target is replaced.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent)
    os.close(fd)
    os.unlink(tmp_name)
    tmp = Path(tmp_name)
    try:
        yield tmp
        if tmp.is_dir() and path.is_dir():
            shutil.rmtree(path)
        os.replace(tmp, path)
    finally:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        elif tmp.exists():
            tmp.unlink()


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "w", **kwargs) -> Iterator[IO]:
    """``open()`` a temporary file beside ``path``; fsync and rename it onto ``path`` on success."""
    with atomic_path(path) as tmp:
        with open(tmp, mode, **kwargs) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())


@contextlib.contextmanager
def atomic_binary(path: str | os.PathLike, gzip: bool, compresslevel: int = 6) -> Iterator[IO[bytes]]:
    """A binary file (gzip stream if ``gzip``) that appears at ``path``, fsynced, only when
    the block ends without an exception; otherwise nothing is left behind."""
    import gzip as gzip_module

    with atomic_path(path) as tmp, open(tmp, "wb") as raw:
        if gzip:
            with gzip_module.GzipFile(filename="", fileobj=raw, mode="wb", compresslevel=compresslevel, mtime=0) as out:
                yield out
        else:
            yield raw
        raw.flush()
        os.fsync(raw.fileno())


class StreamWriter:
    """Base of the streaming output writers: a context manager whose file is written as a
    stream and appears under ``path`` only when the block ends without an exception.

    Subclasses implement ``_begin(out)`` (``out``: the open binary stream, gzip when
    ``self.gzip``) and ``_end()`` (write what closes the format); ``count`` counts what they wrote.
    """

    gzip = False
    compresslevel = 6

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self._output: contextlib.AbstractContextManager | None = None
        self.count = 0

    def _begin(self, out: IO[bytes]) -> None:
        raise NotImplementedError

    def _end(self) -> None:
        raise NotImplementedError

    def _discard(self) -> None:
        """Drop what the format holds after an error (the file is not kept)."""

    def _require_open(self) -> None:
        if self._output is None:
            raise RuntimeError(f"{self.path}: use {type(self).__name__} as a context manager ('with')")

    def __enter__(self):
        if self._output is not None:
            raise RuntimeError(f"{self.path}: writer already open")
        self._output = atomic_binary(self.path, self.gzip, self.compresslevel)
        out = self._output.__enter__()
        self.count = 0
        try:
            self._begin(out)
        except BaseException as error:
            self.__exit__(type(error), error, error.__traceback__)
            raise
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        output = self._output
        self._output = None
        if exc_type is None:
            try:
                self._end()
            except BaseException as error:
                output.__exit__(type(error), error, error.__traceback__)
                raise
        else:
            self._discard()
        return bool(output.__exit__(exc_type, exc, tb))
