"""benchmarks/speed/bench_slide.py: its synthetic slide and its refusals of bad input."""

from __future__ import annotations

import sys

import numpy as np
import pytest

from benchmarks.speed import bench_slide
from benchmarks.speed.bench_slide import BACKGROUND, SyntheticSlide


def run_bench(monkeypatch, capsys, *args: str) -> tuple[int, list[str]]:
    """``python -m benchmarks.speed.bench_slide ARGS --no-record``, in this process: (exit status, stderr lines)."""
    monkeypatch.setattr(sys, "argv", ["bench_slide.py", *args, "--no-record"])
    with pytest.raises(SystemExit) as exit_info:
        bench_slide.main()
    return exit_info.value.code, capsys.readouterr().err.strip().splitlines()


def test_a_slide_too_large_for_the_disk_is_refused_in_one_line(tmp_path, monkeypatch, capsys):
    code, lines = run_bench(monkeypatch, capsys, "--side-px", str(2**20), "--scales", "1", "--dir", str(tmp_path / "runs"))
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: a 1,099,512 Mpx slide needs")
    assert not (tmp_path / "runs").exists()


def test_cuda_without_a_gpu_is_refused_in_one_line(monkeypatch, capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    code, lines = run_bench(monkeypatch, capsys, "--side-px", "1024", "--scales", "1", "--device", "cuda")
    assert code == 2 and lines == ["error: --device cuda: no CUDA GPU is visible to torch; use --device cpu"]


@pytest.mark.openslide
def test_the_synthetic_slide_is_a_40x_pyramid_of_tissue_on_glass(tmp_path):
    import openslide

    slide = SyntheticSlide(2048, n_blocks=1)
    path = slide.write(tmp_path / "s.tiff")
    with openslide.OpenSlide(str(path)) as osr:
        assert osr.dimensions == (2048, 2048) and osr.level_count == 2
        assert float(osr.properties["openslide.mpp-x"]) == pytest.approx(0.25)
        corner = np.asarray(osr.read_region((0, 0), 0, (64, 64)))[..., :3].astype(int)
        centre = np.asarray(osr.read_region((896, 896), 0, (256, 256)))[..., :3].astype(int)
    assert np.abs(corner - BACKGROUND).mean() < 3  # glass outside the tissue
    assert np.abs(centre - slide.region(0, 896, 896, 256, 256)).mean() < 6  # JPEG of the rendered texture
    purple = (centre[..., 0] < 140) & (centre[..., 2] > centre[..., 1] + 40)
    assert 0.05 < purple.mean() < 0.6  # nuclei among pink stroma
