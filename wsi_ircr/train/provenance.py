"""Where a model's training data came from, for its checkpoint's ``meta["sources"]``.

One entry per role (labelled, validation, unlabelled) and dataset folder: the dataset's name,
how many tiles, a hash of the files' contents (never a machine path) and the dataset's licence
where a README states it. Links are followed, so a folder of links to several datasets (an
unlabelled pool) gives one entry per dataset it points into. Licences are read from, in order,
a README.md beside the dataset folder with a table that has a "licence" column and a row
naming the folder (``../shared/data/README.md``), or a "Licence: ..." line in the folder's
own README.md; the tiles' folder and its parent are tried.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Sequence
from pathlib import Path

LICENCE_LINE = re.compile(r"\blicen[cs]e\b\**\s*:\s*\**\s*(.+)", re.IGNORECASE)


def _clean(text: str) -> str:
    return text.replace("**", "").replace("`", "").strip().rstrip(",;.").strip()


def _table_licence(text: str, folder: str) -> str | None:
    """The "licence" cell of the markdown table row whose first cell names ``folder`` (None: no such row)."""
    column = None
    for line in text.splitlines():
        if not line.lstrip().startswith("|"):
            column = None
            continue
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        lower = [c.lower() for c in cells]
        if column is None:
            column = next((i for i, c in enumerate(lower) if c in ("licence", "license")), None)
            continue
        if column < len(cells) and _clean(cells[0]).rstrip("/") == folder:
            return _clean(cells[column]) or None
    return None


def folder_licence(folder: Path) -> str | None:
    """The licence stated for ``folder``: its row in the parent's README.md table, else the
    "Licence:" line of its own README.md (None: neither says)."""
    beside = folder.parent / "README.md"
    if beside.is_file():
        licence = _table_licence(beside.read_text(errors="replace"), folder.name)
        if licence:
            return licence
    own = folder / "README.md"
    if own.is_file():
        match = LICENCE_LINE.search(own.read_text(errors="replace"))
        if match and _clean(match.group(1)):
            return _clean(match.group(1))
    return None


def dataset_of(tiles_folder: Path) -> tuple[str, str | None]:
    """(name, licence) of the dataset a real folder of tiles belongs to: the nearest of the
    folder and its parent with a stated licence (its name), else the folder's last two path parts."""
    for folder in (tiles_folder, tiles_folder.parent):
        licence = folder_licence(folder)
        if licence is not None:
            return folder.name, licence
    return "/".join(tiles_folder.parts[-2:]), None


def content_hash(files: Sequence[Sequence[Path]]) -> str:
    """First 16 hex digits of a SHA-256 over the sorted (file name, content hash) of every file."""
    from wsi_ircr.model.checkpoint import file_hash

    lines = sorted(f"{p.name}:{file_hash(p)}" for group in files for p in group)
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()[:16]


def describe_sources(roles: dict[str, Sequence[Sequence[Path]]]) -> list[dict]:
    """``roles``: role -> one tuple of files per tile (image first, then its label map / masks).
    One entry per role and dataset: ``{"role", "dataset", "tiles", "hash", "licence"}``."""
    out = []
    for role, tiles in roles.items():
        groups: dict[Path, list[Sequence[Path]]] = {}
        for files in tiles:
            groups.setdefault(Path(files[0]).resolve().parent, []).append([Path(p).resolve() for p in files])
        for folder, group in sorted(groups.items()):
            name, licence = dataset_of(folder)
            out.append({"role": role, "dataset": name, "tiles": len(group), "hash": content_hash(group), "licence": licence})
    return out


def licences(sources: list[dict]) -> dict[str, str | None]:
    """Dataset -> licence of every source a model was trained or validated on."""
    return {s["dataset"]: s["licence"] for s in sorted(sources, key=lambda s: s["dataset"])}
