"""The execution plan: ``auto`` / ``0`` settings resolved once from the config and what the
cluster backend gives; the registry of backends; the plan in ``summary.json``."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from wsi_ircr.errors import UserError
from wsi_ircr.slide.cluster import BACKENDS, CLUSTERS, LocalBackend, SlurmBackend, backend_for
from wsi_ircr.slide.config import SegmentConfig
from wsi_ircr.slide.plan import MIN_IN_FLIGHT, ClusterSize, resolve_plan

CPU = ClusterSize("local", processes=2, threads_per_process=3, cores_per_process=6, gpu=False, local=True)
GPU = ClusterSize("slurm", processes=4, threads_per_process=8, cores_per_process=8, gpu=True, local=False,
                  gpu_per_process=True)
REMOTE_CPU = ClusterSize("scheduler", processes=3, threads_per_process=4, cores_per_process=None, gpu=False, local=False)


def test_cpu_plan_resolves_every_automatic_setting():
    plan = resolve_plan(SegmentConfig(batch_tiles=2), CPU)
    assert (plan.device, plan.postprocess, plan.precision) == ("cpu", "skimage", "fp32" if not _native() else "bf16")
    assert (plan.task_tiles, plan.post_threads) == (2, 1)  # one batch per task on the CPU
    assert plan.torch_threads == 2  # 6 cores / 3 concurrent tasks
    assert plan.tasks_in_flight == 2 * 2 * 3 and plan.task_resources is None


def test_gpu_plan_and_explicit_values():
    plan = resolve_plan(SegmentConfig(batch_tiles=2), GPU)
    assert (plan.device, plan.postprocess, plan.precision) == ("cuda", "torch", "bf16")
    assert (plan.task_tiles, plan.post_threads, plan.gpu_per_process) == (16, 4, True)
    assert plan.task_resources == {"GPU": 1} and plan.tasks_in_flight == 2 * 4 * 8
    fixed = resolve_plan(SegmentConfig(task_tiles=5, post_threads=3, batch_tiles=1, torch_threads=7, tasks_in_flight=9,
                                       precision="fp32", postprocess="skimage"), GPU)
    assert (fixed.task_tiles, fixed.post_threads, fixed.torch_threads, fixed.tasks_in_flight) == (5, 3, 7, 9)
    assert (fixed.precision, fixed.postprocess) == ("fp32", "skimage")
    with pytest.raises(ValueError, match="task_tiles"):
        SegmentConfig(task_tiles=-1)


def test_remote_cpu_workers_decide_precision_and_threads():
    plan = resolve_plan(SegmentConfig(), REMOTE_CPU)
    assert plan.precision == "auto" and plan.torch_threads == 0 and plan.cores_per_worker == 0
    assert plan.tasks_in_flight == 24
    empty = ClusterSize("scheduler", 0, 1, None, None, local=False)
    assert resolve_plan(SegmentConfig(), empty).tasks_in_flight == MIN_IN_FLIGHT
    assert resolve_plan(SegmentConfig(device="cuda"), empty).device == "cuda"  # workers may still join


def test_cuda_on_workers_without_gpu_is_one_line():
    with pytest.raises(UserError, match="--device cuda: the local cluster's workers have no GPU; use"):
        resolve_plan(SegmentConfig(device="cuda"), CPU)


def test_registry_and_backend_choice(tmp_path):
    assert set(BACKENDS) == {"local", "scheduler", "slurm"} and CLUSTERS == ("local", "slurm")
    config = SegmentConfig(workers=2, threads_per_worker=1)
    assert isinstance(backend_for(config), LocalBackend)
    size = backend_for(config).size()
    assert (size.processes, size.threads_per_process, size.local) == (2, 1, True)
    assert size.gpu == torch.cuda.is_available()
    with pytest.raises(UserError, match="--scheduler and --cluster slurm"):
        backend_for(config, "tcp://127.0.0.1:1", "slurm")
    with pytest.raises(UserError, match="--cluster pbs: expected one of local, slurm"):
        backend_for(config, cluster="pbs")
    with pytest.raises(UserError, match="--cluster-config is for --cluster slurm"):
        backend_for(config, cluster_config=tmp_path / "x.yaml")
    path = tmp_path / "slurm.yaml"
    path.write_text("cores: 16\ngpus: 2\nmaximum_jobs: 3\n")
    slurm = backend_for(config, cluster="slurm", cluster_config=path)
    assert isinstance(slurm, SlurmBackend)
    plan = resolve_plan(SegmentConfig(device="auto"), slurm.size())
    assert (plan.device, plan.workers, plan.threads_per_worker, plan.torch_threads) == ("cuda", 6, 8, 1)
    assert plan.tasks_in_flight == 2 * 6 * 8  # every job's threads busy, so the adaptive cluster starts them all


def _native() -> bool:
    from wsi_ircr.model.precision import native_bf16

    return native_bf16(torch.device("cpu"))


@pytest.mark.openslide
def test_summary_records_the_plan_and_what_ran(tmp_path, capfd):
    from model_fixtures import synthetic_signal_model
    from synthetic_slides import synthetic_he, write_aperio_svs

    from wsi_ircr.cli import main

    image, _ = synthetic_he((260, 300), n_nuclei=30, seed=3, radius_px=(4, 6))
    slide = write_aperio_svs(tmp_path / "he.svs", image, mpp=0.5)
    model = synthetic_signal_model(tmp_path / "m.pt")
    try:
        main(["segment", str(slide), "-o", str(tmp_path / "out"), "--model", str(model), "--core-px", "256",
              "--halo", "32", "--set", "max_nucleus_um=8", "--set", "threads_per_worker=1", "--quiet", "--fp32"])
    except SystemExit as e:
        assert e.code in (0, None)
    summary = json.loads(Path(tmp_path / "out" / "he" / "summary.json").read_text())
    execution = summary["execution"]
    assert (execution["device"], execution["precision"], execution["backend"]) == ("cpu", "fp32", "local")
    assert execution["threads_per_worker"] == 1 and execution["task_tiles"] == execution["batch_tiles"] == 1
    assert execution["ran"] == [{"device": "cpu", "precision": "fp32", "torch_threads": execution["torch_threads"],
                                 "engine": execution["engine"]}]
    assert summary["config"]["device"] == "auto"  # the request stays beside what ran


def test_precision_follows_what_the_checkpoint_proves():
    from types import SimpleNamespace

    unproven_bf16 = SimpleNamespace(meta={"precision": {"cuda": {"bf16": {"engine": "torch", "aji": 0.58, "fp32_aji": 0.6}}}})
    assert resolve_plan(SegmentConfig(), GPU, unproven_bf16).precision == "fp32"
    assert resolve_plan(SegmentConfig(), GPU).precision == "bf16"  # nothing recorded: bf16 where native
