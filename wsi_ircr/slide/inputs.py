"""The slides of one command: files, folders of slides and list files, checked before any work."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from wsi_ircr.errors import UserError
from wsi_ircr.slide.run_folder import run_stem

# Suffixes of the formats OpenSlide reads: files with them are slides even when damaged
# (they then fail alone); other files count when OpenSlide recognises their content.
SLIDE_SUFFIXES = {".svs", ".tif", ".tiff", ".ndpi", ".vms", ".vmu", ".scn", ".mrxs", ".svslide", ".bif", ".dcm"}


def _slides_in_folder(folder: Path) -> list[Path]:
    """Files of ``folder`` (not recursive, hidden files skipped) that OpenSlide may read, sorted."""
    import openslide

    found = []
    for path in sorted(folder.iterdir()):
        if path.is_file() and not path.name.startswith("."):
            if path.suffix.lower() in SLIDE_SUFFIXES:
                found.append(path)
                continue
            try:
                if openslide.OpenSlide.detect_format(str(path)):
                    found.append(path)
            except (OSError, openslide.OpenSlideError):
                continue
    if not found:
        raise UserError(f"{folder}: no slide that OpenSlide can read in this folder; pass slide files, "
                        "another folder or --list FILE")
    return found


def _slides_in_list(list_file: Path) -> list[Path]:
    """Paths listed one per line (blank lines and ``#`` comments skipped); relative paths
    resolve against the list file's folder; a listed folder stands for its slides. A listed
    path that does not exist is a UserError."""
    try:
        lines = list_file.read_text().splitlines()
    except FileNotFoundError:
        raise UserError(f"--list {list_file}: no such file; pass a text file with one slide path per line") from None
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"--list {list_file}: cannot read it as text ({type(e).__name__}); "
                        "pass a text file with one slide path per line") from None
    paths = [Path(line.strip()) for line in lines if line.strip() and not line.lstrip().startswith("#")]
    if not paths:
        raise UserError(f"--list {list_file}: lists no slide; write one slide path per line")
    paths = [p if p.is_absolute() else list_file.parent / p for p in paths]
    for p in paths:
        _require_exists(p, f"--list {list_file}: ")
    return [slide for p in paths for slide in (_slides_in_folder(p) if p.is_dir() else [p])]


def _require_exists(path: Path, where: str = "") -> None:
    """UserError, before any work, for a slide path or folder that does not exist."""
    if not path.exists():
        raise UserError(f"{where}{path}: no such file or folder; check the path (nothing was run)")


def collect_slides(paths: Iterable[str | Path], list_file: str | Path | None = None) -> list[Path]:
    """Absolute slide paths from ``paths`` (files, or folders of slides) and ``list_file``.

    A path that does not exist, no slide at all, a folder without slides, or two slides that
    would share a run folder are UserErrors raised before any work.
    """
    slides: list[Path] = []
    for path in map(Path, paths):
        _require_exists(path)
        slides.extend(_slides_in_folder(path) if path.is_dir() else [path])
    if list_file is not None:
        slides.extend(_slides_in_list(Path(list_file)))
    if not slides:
        raise UserError("no slides given; pass slide files, folders of slides or --list FILE")
    slides = [p.absolute() for p in slides]
    check_distinct_stems(slides)
    return slides


def check_distinct_stems(slide_paths: Iterable[Path]) -> None:
    """UserError if two slides would share a run folder ``OUT/<stem>/`` (or one is listed twice)."""
    seen: dict[str, Path] = {}
    for path in map(Path, slide_paths):
        stem = run_stem(path)
        if stem in seen:
            if seen[stem].absolute() == path.absolute():
                raise UserError(f"{path} is listed twice; list each slide once")
            raise UserError(f"{seen[stem]} and {path} would both write OUT/{stem}/; rename one or run them with "
                            "different -o")
        seen[stem] = path
