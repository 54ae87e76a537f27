"""Shared test fixtures: paths to ../shared data (skipped cleanly when absent)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from slurm_cluster import slurm_cluster  # noqa: F401 - the session fixture of a real one-node SLURM cluster

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("WSI_IRCR_SHARED", REPO.parent / "shared"))


@pytest.fixture(scope="session")
def shared_slides() -> Path:
    """``../shared/slides`` (real and synthetic OpenSlide test slides)."""
    path = SHARED / "slides"
    if not path.is_dir():
        pytest.skip(f"{path} is absent: the shared test slides live beside the repository")
    return path


@pytest.fixture(scope="session")
def monuseg_dir() -> Path:
    """``../shared/data/monuseg-train`` (CC BY-NC-SA; never copied into the repository)."""
    path = SHARED / "data" / "monuseg-train"
    if not path.is_dir():
        pytest.skip(f"{path} is absent: MoNuSeg tiles are read from ../shared, never committed")
    return path


@pytest.fixture(scope="session", autouse=True)
def _engine_cache(tmp_path_factory):
    """Exported inference graphs go to a folder of this test session, never the user's cache
    (``$WSI_IRCR_CACHE`` is inherited by the CLI and worker processes the tests start)."""
    old = os.environ.get("WSI_IRCR_CACHE")
    os.environ["WSI_IRCR_CACHE"] = str(tmp_path_factory.mktemp("engine-cache"))
    yield
    if old is None:
        os.environ.pop("WSI_IRCR_CACHE", None)
    else:
        os.environ["WSI_IRCR_CACHE"] = old


@pytest.fixture(autouse=True)
def _few_threads():
    """Keep torch to one thread per test so the suite behaves on 2-core CI machines."""
    try:
        import torch
    except ImportError:
        yield
        return
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
