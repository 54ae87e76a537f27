"""``wsi-ircr train --scheduler`` on a real ``dask scheduler`` + ``dask worker`` on 127.0.0.1
(CPU), and what makes a lost run continue: resuming from the run folder's last.pt."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from local_dask import dask_processes, free_port
from test_train import IRCR, _history_steps, _weights, dataset, run_cli, train_argv  # noqa: F401 (dataset: fixture)

from wsi_ircr.config import resolve_config
from wsi_ircr.model.checkpoint import load_checkpoint
from wsi_ircr.slide import cluster
from wsi_ircr.train.config import TrainConfig
from wsi_ircr.train.loop import Trainer
from wsi_ircr.train.remote import task_resources, train_task

TRAIN_STEP = Trainer.train_step


def test_task_resources_ask_for_a_gpu_unless_the_run_is_on_cpu():
    gpu = {"tcp://a": {"resources": {"GPU": 1}}, "tcp://b": {"resources": {}}}
    cpu = {"tcp://b": {"resources": {}}}
    assert task_resources("cuda", cpu) == {"GPU": 1} and task_resources("cuda", gpu) == {"GPU": 1}
    assert task_resources("auto", gpu) == {"GPU": 1} and task_resources("auto", cpu) is None
    assert task_resources("cpu", gpu) is None


@pytest.mark.distributed
def test_train_on_a_real_scheduler_and_worker(dataset, tmp_path, capsys):
    worker_dir = tmp_path / "worker"
    worker_dir.mkdir()
    with dask_processes(worker_dir) as address:
        out = tmp_path / "run"
        argv = train_argv(dataset, out, 3, "--scheduler", address, "--set", "tune_postprocess=false")
        code, stdout, err = run_cli(argv, capsys)
        assert code == 0, err
        assert f"training on {address} (any worker)" in err and str(out / "model.pt") in stdout
        assert "data: 5 labelled" in err and "step 3/3 sup=" in err and "val step 2: AJI" in err  # the worker's progress
        assert load_checkpoint(out / "last.pt").train_state["step"] == 3 and (out / "metrics.json").is_file()
        assert not any(worker_dir.iterdir())  # everything went to the run folder

        code, _, err = run_cli(train_argv(dataset, tmp_path / "gpu", 3, "--scheduler", address, "--device", "cuda"), capsys)
        assert code == 2 and "declares a GPU" in err and len(err.strip().splitlines()) == 1

        code, _, err = run_cli(train_argv(dataset, out, 3, "--scheduler", address, "--set", "tune_postprocess=false",
                                          "--resume", "--set", "lr=0.002"), capsys)
        assert code == 2 and "different config" in err  # errors on the worker come back as one line


@pytest.mark.distributed
@pytest.mark.parametrize("address, words", [
    (f"tcp://127.0.0.1:{free_port()}", ["cannot reach a Dask scheduler there", "dask scheduler"]),
    ("head", ["not a scheduler address", "tcp://HOST:PORT"]),
])
def test_a_scheduler_that_does_not_answer_is_one_line(dataset, tmp_path, capsys, address, words, monkeypatch):
    monkeypatch.setattr(cluster, "CONNECT_TIMEOUT_S", 2)  # the client gives up after its connect timeout
    code, _, err = run_cli(train_argv(dataset, tmp_path / "run", 2, "--scheduler", address), capsys)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and f"--scheduler {address}" in lines[0], err
    for word in words:
        assert word in lines[0], (word, lines[0])
    assert "Traceback" not in err and not (tmp_path / "run" / "last.pt").exists()


def _config(dataset, steps: int, *extra: str) -> TrainConfig:
    argv = train_argv(dataset, Path("unused"), steps, "--unlabelled", str(dataset["unlabelled"]),
                      "--set", "tune_postprocess=false", *IRCR, *extra)
    sets = [argv[i + 1] for i, a in enumerate(argv) if a == "--set"]
    explicit = {"data.images": str(dataset["images"]), "data.labels": str(dataset["labels"]),
                "data.unlabelled": str(dataset["unlabelled"]), "steps": steps, "device": "cpu"}
    return resolve_config(TrainConfig, None, sets, explicit)


class Killed(Exception):
    """A process killed in the middle of a step (outside the CLI, where Ctrl-C is KeyboardInterrupt)."""


def _count_steps(monkeypatch, stop_at: int | None = None, kill: type[BaseException] = KeyboardInterrupt) -> list[int]:
    """Record the step at which every ``train_step`` starts; raise ``kill`` when it is ``stop_at``."""
    seen = []

    def step(self):
        if self.step == stop_at:
            raise kill
        seen.append(self.step)
        return TRAIN_STEP(self)

    monkeypatch.setattr(Trainer, "train_step", step)
    return seen


def test_a_retried_task_continues_from_last_pt(dataset, tmp_path, monkeypatch):
    """A lost worker: Dask runs the task again, which finds last.pt and resumes from it."""
    cfg = _config(dataset, 6)
    out = tmp_path / "run"
    seen = _count_steps(monkeypatch, stop_at=3, kill=Killed)
    with pytest.raises(Killed):
        train_task(cfg, str(out), str(tmp_path), resume=False)
    assert seen == [0, 1, 2] and load_checkpoint(out / "last.pt").train_state["step"] == 2
    seen = _count_steps(monkeypatch)
    summary = train_task(cfg, str(out), str(tmp_path), resume=False)
    assert seen == [2, 3, 4, 5] and summary["steps"] == 6 and _history_steps(out / "model.pt") == [2, 4, 6]


@pytest.mark.parametrize("kill_at, checkpoint_every, saved", [(1, 0, None), (3, 0, 2), (3, 1, 3), (5, 2, 4)])
def test_a_killed_run_resumes_and_loses_only_the_steps_since_its_last_checkpoint(dataset, tmp_path, capsys, monkeypatch,
                                                                              kill_at, checkpoint_every, saved):
    """Killed during step ``kill_at + 1`` (val_every=2): last.pt holds the last multiple of
    val_every or checkpoint_every (none before step 2: --resume starts at 0); the resumed run
    redoes only the steps after it and ends with the uninterrupted run's weights."""
    def argv(out: Path, *extra: str) -> list[str]:
        return train_argv(dataset, out, 6, "--unlabelled", str(dataset["unlabelled"]), "--set", "tune_postprocess=false",
                          "--quiet", *IRCR, "--set", f"checkpoint_every={checkpoint_every}", *extra)

    assert run_cli(argv(tmp_path / "full"), capsys)[0] == 0
    out = tmp_path / "killed"
    _count_steps(monkeypatch, stop_at=kill_at)
    code, _, _ = run_cli(argv(out), capsys)
    assert code == 130
    assert (load_checkpoint(out / "last.pt").train_state["step"] if saved else None) == saved
    assert saved is not None or not (out / "last.pt").exists()
    seen = _count_steps(monkeypatch)
    code, _, err = run_cli(argv(out, "--resume"), capsys)
    assert code == 0, err
    assert seen == list(range(saved or 0, 6))
    for a, b in zip(_weights(tmp_path / "full" / "last.pt"), _weights(out / "last.pt")):
        for key in a:
            assert torch.equal(a[key], b[key]), key


def test_a_kill_while_writing_last_pt_keeps_the_previous_one(dataset, tmp_path, capsys, monkeypatch):
    def argv(out: Path, *extra: str) -> list[str]:
        return train_argv(dataset, out, 6, "--set", "tune_postprocess=false", "--quiet", *extra)

    out = tmp_path / "run"
    real_save = torch.save

    def dies_writing_step_4(obj, f, *args, **kwargs):
        if isinstance(obj, dict) and (obj.get("train_state") or {}).get("step") == 4:
            Path(f).write_bytes(b"half a checkpoint")
            raise KeyboardInterrupt
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", dies_writing_step_4)
    assert run_cli(argv(out), capsys)[0] == 130
    assert load_checkpoint(out / "last.pt").train_state["step"] == 2
    monkeypatch.setattr(torch, "save", real_save)
    code, _, err = run_cli(argv(out, "--resume"), capsys)
    assert code == 0, err
    assert load_checkpoint(out / "last.pt").train_state["step"] == 6


def test_a_stop_request_saves_the_current_step_and_resume_finishes(dataset, tmp_path, monkeypatch):
    """What a remote run does when its client goes away: stop after the step, last.pt at it."""
    from wsi_ircr.train.loop import TrainingStopped, train

    cfg = _config(dataset, 6)
    out = tmp_path / "run"
    steps = _count_steps(monkeypatch)
    with pytest.raises(TrainingStopped, match="stopped at step 3"):
        train(cfg, out, resume=False, progress=False, stop=lambda: len(steps) == 3)
    assert load_checkpoint(out / "last.pt").train_state["step"] == 3 and not (out / "model.pt").exists()
    steps.clear()
    train(cfg, out, resume=True, progress=False)
    assert steps == [3, 4, 5] and _history_steps(out / "model.pt") == [2, 4, 6]


KILL_ONCE = '''
import os
from pathlib import Path


def dask_setup(worker):
    """Kill this worker process (as a lost node would be) at training step 3, once; log the
    step every ``train_step`` starts at."""
    from wsi_ircr.train.loop import Trainer

    marker, real = Path(os.environ["KILL_MARKER"]), Trainer.train_step

    def step(self):
        if self.step == 3 and not marker.exists():
            marker.write_text("killed at step 3")
            os._exit(1)
        with open(f"{marker}.steps", "a") as f:
            f.write(f"{self.step} ")
        return real(self)

    Trainer.train_step = step
'''


@pytest.mark.slow  # a worker process killed mid-run, replaced by its nanny
@pytest.mark.distributed
def test_a_lost_worker_is_replaced_and_the_run_continues_from_last_pt(dataset, tmp_path, capsys):
    """The worker process dies at step 3 (last.pt holds step 2); its nanny starts a new one, Dask
    runs the task again there and it resumes: the command succeeds with all 6 steps."""
    import os

    preload = tmp_path / "kill_once.py"
    preload.write_text(KILL_ONCE)
    marker = tmp_path / "killed"
    with dask_processes(tmp_path, worker_args=("--preload", str(preload)),
                        worker_env={**os.environ, "KILL_MARKER": str(marker)}) as address:
        out = tmp_path / "run"
        code, _, err = run_cli(train_argv(dataset, out, 6, "--scheduler", address, "--set", "tune_postprocess=false"), capsys)
    assert code == 0, err
    assert marker.read_text() == "killed at step 3"
    assert Path(f"{marker}.steps").read_text().split() == ["0", "1", "2", "2", "3", "4", "5"]  # steps 3-6 redone from 2
    assert load_checkpoint(out / "last.pt").train_state["step"] == 6 and _history_steps(out / "model.pt") == [2, 4, 6]
