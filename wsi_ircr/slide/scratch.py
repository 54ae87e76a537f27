"""Where a slide's tile store lives: ``OUT/<stem>/tiles.zarr`` or node-local scratch (``scratch_dir``).

With ``scratch_dir`` the store is a cache on each worker node:
``<scratch_dir>/wsi-ircr/<stem>-<id>/tiles.zarr`` (``<id>``: a hash of the run folder's
path), the ``~`` and ``$VARS`` of ``scratch_dir`` expanded by the worker when its task runs.
The driver writes only the store's attributes to the run folder (``work/tile_store.json``);
a task that finds no store, or a half one, on its node creates it from them and reads its
missing tiles from the slide. What a resumed or retried run relies on stays in the shared
run folder (``run.json``, the per-tile results in ``work/`` with the unreadable boxes each
tile met), so a task on any node gives the same nuclei. The driver removes every worker's
copy when the slide ends (done or failed); the copies of workers gone by then stay where
their job left them (use a folder the site cleans at job end, such as ``$TMPDIR``).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import socket
import threading
from pathlib import Path

from wsi_ircr.errors import UserError
from wsi_ircr.io.atomic import atomic_open
from wsi_ircr.slide.run_folder import STORE_DIR, RunFolder

SCRATCH_SUBDIR = "wsi-ircr"
SPEC_FILE = "tile_store.json"
_VARIABLE = re.compile(r"\$\{?(\w+)")  # a $VAR or ${VAR} of scratch_dir
_LOCK = threading.Lock()  # tasks of one worker process run in threads
_CHECKED: dict[tuple[str, int], int] = {}  # (store path, spec mtime_ns) -> mtime_ns of the store's metadata


def _expand(scratch_dir: str) -> str:
    return os.path.expandvars(os.path.expanduser(scratch_dir))


def expand_scratch(scratch_dir: str) -> Path:
    """``scratch_dir`` with ``~`` and ``$VARS`` expanded in this process's environment (on a
    worker: its node's), created if absent; a one-line UserError naming the host when a
    variable is unset or the folder is not absolute, cannot be created or is not writable."""
    expanded = _expand(scratch_dir)
    where = f"scratch_dir {scratch_dir}" + (f" (= {expanded})" if expanded != scratch_dir else "")
    where += f" on {socket.gethostname()}"
    unset = _VARIABLE.search(expanded)
    if unset:
        raise UserError(f"{where}: ${unset.group(1)} is not set there; use a variable the worker nodes set "
                        "(e.g. $TMPDIR) or a folder")
    path = Path(expanded)
    if not path.is_absolute():
        raise UserError(f"{where}: not an absolute path; each worker runs in its own folder: pass an absolute "
                        "one, e.g. '$TMPDIR'")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"{where}: cannot create the folder ({e.strerror or e}); point it at node-local disk, "
                        "e.g. '$TMPDIR'") from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise UserError(f"{where}: not writable; point it at node-local disk the worker may write, e.g. '$TMPDIR'")
    return path


def scratch_template(scratch_dir: str, folder: RunFolder) -> str:
    """The store path of ``folder``'s slide under ``scratch_dir``, variables not expanded yet."""
    run_id = hashlib.sha1(str(folder.path).encode()).hexdigest()[:10]
    return str(Path(scratch_dir) / SCRATCH_SUBDIR / f"{folder.stem}-{run_id}" / STORE_DIR)


def store_path_here(template: str) -> Path:
    """The store path of ``template`` (``scratch_template``) on this node, its scratch folder checked."""
    slide_dir = Path(template).parent
    return expand_scratch(str(slide_dir.parent.parent)) / SCRATCH_SUBDIR / slide_dir.name / STORE_DIR


def prepare_store(folder: RunFolder, plan, slide_name: str, scratch_dir: str | None,
                  overwrite: bool = False) -> tuple[str, str | None, int]:
    """On the driver: where the tile tasks of ``plan`` (a ``pipeline.SlidePlan``) find its store.

    Returns ``(store path, spec path, tiles already stored)``. Without ``scratch_dir``: the
    store ``OUT/<stem>/tiles.zarr``, created or resumed now, and no spec. With it: the scratch
    template (expanded by each worker), the spec the workers create their copy from (written
    to the run folder's ``work/``) and 0 (the driver does not see the nodes' copies).
    """
    from wsi_ircr.slide.store import create_tile_store, store_attributes

    if not scratch_dir:
        store = create_tile_store(folder.store_path, plan.grid, plan.tiles, fingerprint=plan.fingerprint,
                                  slide_name=slide_name, overwrite=overwrite)
        return str(store.path), None, store.n_done
    spec = folder.work_dir / SPEC_FILE
    with atomic_open(spec) as f:
        json.dump(store_attributes(plan.grid, plan.tiles, fingerprint=plan.fingerprint, slide_name=slide_name), f)
    return scratch_template(scratch_dir, folder), str(spec), 0


@contextlib.contextmanager
def _node_lock(path: Path):
    """This process's threads and the other processes of this node, one at a time on ``path``."""
    import fcntl

    with _LOCK, open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        yield


def open_scratch_store(template: str, spec_path: str):
    """On a worker: this node's copy of the store (``TileStore``), created from the spec where
    it is missing, half created or of other attributes; its tiles not written yet are read by
    the task that needs them."""
    from wsi_ircr.slide.grid import TileGrid
    from wsi_ircr.slide.store import TileStore, create_tile_store, is_tile_store

    path = store_path_here(template)
    metadata = path / "zarr.json"
    try:
        key = (str(path), os.stat(spec_path).st_mtime_ns)
    except FileNotFoundError:
        raise UserError(f"{spec_path}: not found on the Dask worker on {socket.gethostname()}; workers need the "
                        "output folder at the same path (a shared filesystem)") from None
    with contextlib.suppress(FileNotFoundError):
        if _CHECKED.get(key) == metadata.stat().st_mtime_ns:
            return TileStore(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with _node_lock(path.parent / ".lock"):
        spec = json.loads(Path(spec_path).read_text())
        if path.exists() and not is_tile_store(path):
            shutil.rmtree(path)  # what a removal or a killed task left: never a store
        store = create_tile_store(path, TileGrid.from_dict(spec["grid"], where=spec_path), spec["tiles"],
                                  fingerprint=spec["slide_fingerprint"], slide_name=spec["slide_name"], overwrite=True)
        _CHECKED[key] = metadata.stat().st_mtime_ns
        return store


def remove_scratch_store(template: str) -> bool:
    """On a worker: remove this node's copy of the store (and ``<scratch_dir>/wsi-ircr`` once
    empty); True when there was one."""
    slide_dir = Path(_expand(str(Path(template).parent)))
    if "$" in str(slide_dir) or not slide_dir.is_absolute():
        return False
    found = slide_dir.is_dir()
    shutil.rmtree(slide_dir, ignore_errors=True)
    with contextlib.suppress(OSError):
        slide_dir.parent.rmdir()
    return found


def describe_store(scratch_dir: str | None) -> str:
    """Where the tile stores of a run go, in one line (``wsi-ircr cluster check``)."""
    if not scratch_dir:
        return (f"OUT/<stem>/{STORE_DIR} on the shared output folder (scratch_dir / --scratch puts them on "
                "node-local disk)")
    variables = sorted(set(_VARIABLE.findall(scratch_dir)))
    return (f"node-local {Path(scratch_dir) / SCRATCH_SUBDIR / '<stem>-<id>' / STORE_DIR} on each worker"
            + (f" (${', $'.join(variables)} expanded there when its task runs)" if variables else "")
            + "; a cache recreated from the slide where missing, removed when the slide ends; results stay in OUT")


def node_store_name(path: str | Path) -> str:
    """``host:path`` of a store on this node, as the summary lists them."""
    return f"{socket.gethostname()}:{path}"
