"""Workers load the model as soon as they start (``WorkerSetup(preload=...)``), not in the
first tile task, and a preload that fails leaves the error to that task."""

from __future__ import annotations

import time

import pytest

from wsi_ircr.errors import UserError
from wsi_ircr.slide import tasks
from wsi_ircr.slide.config import SegmentConfig
from wsi_ircr.slide.pipeline import model_info
from wsi_ircr.slide.plan import ClusterSize, resolve_plan


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    from model_fixtures import synthetic_signal_model

    return synthetic_signal_model(tmp_path_factory.mktemp("model") / "signal.pt")


@pytest.fixture
def no_predictors(monkeypatch):
    """An empty predictor cache for this test (the module's cache is process-wide)."""
    monkeypatch.setattr(tasks, "_PREDICTORS", {})
    return tasks._PREDICTORS


def cpu_plan(config: SegmentConfig):
    return resolve_plan(config, ClusterSize("local", 1, 1, 1, False, local=True))


def predictor_of(info, plan):
    return tasks.get_predictor(info.path, info.hash, plan.device, plan.tta, plan.postprocess, plan.precision,
                               plan.engine)


def test_the_preloaded_predictor_is_the_one_tasks_get(model, no_predictors):
    config = SegmentConfig(model=str(model), device="cpu")
    info, plan = model_info(config), cpu_plan(config)
    tasks.preload_predictor(info.path, info.hash, plan)
    assert len(no_predictors) == 1
    [preloaded] = no_predictors.values()
    assert predictor_of(info, plan) is preloaded


def test_a_failed_preload_leaves_the_error_to_the_first_task(model, no_predictors):
    config = SegmentConfig(model=str(model), device="cpu")
    info, plan = model_info(config), cpu_plan(config)
    tasks.preload_predictor(info.path, "0" * 16, plan)  # another file than the driver's: no exception here
    assert not no_predictors
    with pytest.raises(UserError, match="hash"):
        tasks.get_predictor(info.path, "0" * 16, "cpu")


def test_workers_of_a_segment_cluster_load_the_model_when_they_start(model, no_predictors):
    """A local cluster of one worker (threads in this process, so its cache is this module's):
    with ``preload`` the predictor is there before any task; without, it is not."""
    from wsi_ircr.slide.cluster import open_cluster

    config = SegmentConfig(model=str(model), device="cpu", workers=1, threads_per_worker=1)
    info = model_info(config)
    with open_cluster(config, checkpoint=info) as (client, plan):
        time.sleep(0.5)
        assert not no_predictors
    with open_cluster(config, checkpoint=info, preload=True) as (client, plan):
        deadline = time.monotonic() + 60
        while not no_predictors and time.monotonic() < deadline:
            time.sleep(0.05)
        assert len(no_predictors) == 1
        assert predictor_of(info, plan) is next(iter(no_predictors.values()))


def test_an_engine_session_is_made_once_for_its_threads(tmp_path, monkeypatch):
    from wsi_ircr.model import engines

    if "onnxruntime" not in engines.installed_engines():
        pytest.skip('ONNX Runtime and onnx not installed: pip install "wsi-ircr[cpu-fast]"')
    import numpy as np
    import torch

    from wsi_ircr.model.checkpoint import load_checkpoint
    from wsi_ircr.model.inference import Predictor

    monkeypatch.setenv("WSI_IRCR_CACHE", str(tmp_path))
    from model_fixtures import synthetic_signal_model

    predictor = Predictor(load_checkpoint(synthetic_signal_model(tmp_path / "m.pt")), device="cpu", precision="fp32",
                          engine="onnxruntime")
    runner = predictor.net.prepare(1)
    assert predictor.net.prepare(1) is runner
    torch.set_num_threads(1)
    predictor.predict_maps(np.zeros((1, 32, 32, 3), np.uint8))
    assert predictor.net.prepare(1) is runner  # the call ran on the prepared session
    assert predictor.net.prepare(2) is not runner
