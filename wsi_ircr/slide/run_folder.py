"""A slide's run folder ``OUT/<stem>/`` and its states: new, unfinished, finished.

``run.json`` (the run key: slide name and fingerprint, model hash, the settings that change
the results) is written first and ``summary.json`` last, both atomically: a folder with
``summary.json`` is a finished run; one with only ``run.json`` an unfinished run that the
same command resumes (its tile store and per-tile results are reused). ``--overwrite``
redoes a run but keeps a tile store that still matches (the slide is not read again).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from wsi_ircr.config import to_dict
from wsi_ircr.errors import UserError
from wsi_ircr.io.atomic import atomic_open

RUN_FILE = "run.json"
SUMMARY_FILE = "summary.json"
STORE_DIR = "tiles.zarr"
WORK_DIR = "work"
# Config keys left out of the run key: how a run is carried out (the model is in it by
# hash) and how the final export looks; they change neither the tile store nor the
# per-tile results that a resumed run reuses.
NOT_IN_RUN_KEY = ("model", "device", "outputs", "batch_tiles", "task_tiles", "post_threads", "workers", "threads_per_worker",
                  "torch_threads", "tasks_in_flight", "gzip", "overlay_crops", "max_unreadable_fraction", "scratch_dir")


def run_stem(slide_path: str | Path) -> str:
    """Name of a slide's run folder: the file name without its extension (nor ``.ome``).

    ``TCGA-...-DX1.8F9A....svs`` keeps its uuid part, so distinct slides get distinct folders.
    """
    name = Path(slide_path).name
    stem = Path(name).stem
    if stem.lower().endswith(".ome"):
        stem = stem[:-4]
    return stem or name


def run_key(slide_name: str, fingerprint: str, model_hash: str, config) -> dict:
    """What ``run.json`` holds: what a resumed or skipped run must share with this one.

    ``config`` is the ``SegmentConfig``; keys of ``NOT_IN_RUN_KEY`` are left out."""
    import wsi_ircr

    settings = {k: v for k, v in to_dict(config).items() if k not in NOT_IN_RUN_KEY}
    return {"slide": slide_name, "fingerprint": fingerprint, "model_hash": model_hash, "config": settings,
            "wsi_ircr": wsi_ircr.__version__}


def _difference(previous, current: dict) -> str:
    """What differs between two run keys, for a refusal message."""
    if not isinstance(previous, dict):
        return "whose run.json is unreadable"
    if previous.get("fingerprint") != current["fingerprint"]:
        return f"of another slide ({previous.get('slide')})"
    if previous.get("model_hash") != current["model_hash"]:
        return f"of another model (hash {previous.get('model_hash')})"
    old, new = previous.get("config") or {}, current["config"]
    keys = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
    if keys:
        return "with another " + ", ".join(f"{k} ({old.get(k)} -> {new.get(k)})" for k in keys)
    return f"of wsi-ircr {previous.get('wsi_ircr')}"


class RunFolder:
    """``OUT/<stem>/`` of one slide: paths of its artefacts and its state transitions."""

    def __init__(self, path: str | Path):
        self.path = Path(path).absolute()
        self.run_file = self.path / RUN_FILE
        self.summary_file = self.path / SUMMARY_FILE
        self.store_path = self.path / STORE_DIR
        self.work_dir = self.path / WORK_DIR

    @classmethod
    def for_slide(cls, out_root: str | Path, slide_path: str | Path) -> RunFolder:
        return cls(Path(out_root) / run_stem(slide_path))

    @property
    def stem(self) -> str:
        return self.path.name

    def _key(self):
        try:
            return json.loads(self.run_file.read_text())
        except (OSError, ValueError):
            return None

    def summary(self) -> dict | None:
        """The finished run's summary (None when unfinished or unreadable)."""
        try:
            return json.loads(self.summary_file.read_text())
        except (OSError, ValueError):
            return None

    def finished(self, key: dict) -> bool:
        """True when the folder holds a finished run with this key (a rerun skips it; the
        wsi-ircr version that made it does not matter); a UserError when it holds a finished
        run of another slide, model or settings."""
        if self.summary() is None:  # none, or unreadable: the run is redone from its saved parts
            return False
        previous = self._key()
        if not isinstance(previous, dict) or {**previous, "wsi_ircr": None} != {**key, "wsi_ircr": None}:
            raise UserError(f"{self.path}: holds a finished run {_difference(previous, key)}; "
                            "pass --overwrite to redo it or choose another -o")
        return True

    def prepare(self, key: dict, overwrite: bool = False) -> bool:
        """Create or resume the run folder for ``key``; returns True when resuming.

        An unfinished run of another key is refused (UserError) unless ``overwrite``, which
        deletes everything but the tile store (reused if it matches, else replaced)."""
        if self.path.exists() and not self.path.is_dir():
            raise UserError(f"{self.path}: exists and is not a folder; choose another -o")
        if self.path.is_dir() and any(self.path.iterdir()):
            if not (self.run_file.exists() or self.summary_file.exists()):
                raise UserError(f"{self.path}: exists and is not a wsi-ircr run folder; choose another -o")
            if overwrite:
                for child in self.path.iterdir():
                    if child.name != STORE_DIR:
                        shutil.rmtree(child) if child.is_dir() else child.unlink()
            else:
                previous = self._key()
                if previous != key:
                    raise UserError(f"{self.path}: holds an unfinished run {_difference(previous, key)}; "
                                    "pass --overwrite to start over or choose another -o")
                for partial in self.path.glob(".*.partial"):  # files a killed run was writing
                    shutil.rmtree(partial) if partial.is_dir() else partial.unlink()
                return True
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            with atomic_open(self.run_file) as f:
                json.dump(key, f, indent=1)
        except OSError as e:
            raise UserError(f"{self.path}: cannot create the run folder ({e.strerror or e}); choose another -o") from None
        return False

    def finish(self, summary: dict) -> None:
        """Write ``summary.json`` (the run is finished from this moment) and drop ``work/``."""
        with atomic_open(self.summary_file) as f:
            json.dump(summary, f, indent=1)
        shutil.rmtree(self.work_dir, ignore_errors=True)
