"""A real ``dask scheduler`` and ``dask worker`` processes on 127.0.0.1, for tests."""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import pytest


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def dask_cli() -> str:
    beside = Path(sys.executable).parent / "dask"
    found = str(beside) if beside.exists() else shutil.which("dask")
    if found is None:
        pytest.skip("the dask command-line tool is not installed")
    return found


def wait_until(condition, proc: subprocess.Popen, what: str, timeout_s: float = 180, poll_s: float = 0.01) -> None:
    """Poll ``condition()`` until true; fail the test (killing ``proc``) if ``proc`` ends or ``timeout_s`` passes first."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"the process ended or timed out before {what}: {proc.communicate()}")
        time.sleep(poll_s)


def stop(procs: list[subprocess.Popen]) -> None:
    for proc in reversed(procs):
        proc.terminate()
    for proc in procs:
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@contextmanager
def dask_processes(cwd: Path, n_workers: int = 1, nthreads: int = 1, worker_args: tuple[str, ...] = (),
                   worker_env: dict[str, str] | None = None):
    """Yield the address of a scheduler with ``n_workers`` nanny-managed worker processes
    (``dask worker --nworkers``, plus ``worker_args``, environment ``worker_env``) running in
    ``cwd``; all are stopped on exit."""
    cli = dask_cli()
    port = free_port()
    address = f"tcp://127.0.0.1:{port}"
    quiet = {"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL, "cwd": cwd}
    procs = [subprocess.Popen([cli, "scheduler", "--host", "127.0.0.1", "--port", str(port), "--no-dashboard"],
                              **quiet)]
    try:
        procs.append(subprocess.Popen([cli, "worker", address, "--nworkers", str(n_workers), "--nthreads",
                                       str(nthreads), "--no-dashboard", "--host", "127.0.0.1", *worker_args],
                                      env=worker_env, **quiet))
        from distributed import Client

        deadline = time.monotonic() + 90
        while True:
            try:
                with Client(address, timeout="5s") as client:
                    client.wait_for_workers(n_workers, timeout=90)
                break
            except (OSError, TimeoutError):
                if time.monotonic() > deadline or any(p.poll() is not None for p in procs):
                    pytest.fail("the dask scheduler or workers did not start")
                time.sleep(0.5)
        yield address
    finally:
        stop(procs)
