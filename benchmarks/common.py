"""What every benchmark needs: the repository's paths, a description of the machine, a memory sampler.

Benchmarks run as modules from the repository root (``python -m benchmarks.speed.bench_slide``)
and import from here.
"""

from __future__ import annotations

import os
import platform
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("WSI_IRCR_SHARED", REPO.parent / "shared"))
MONUSEG = SHARED / "data" / "monuseg-train"

# /proc/cpuinfo flag -> the name reports use; the ones that decide CPU speed of the network
CPU_FLAGS = {"avx2": "AVX2", "avx512f": "AVX512", "avx512_vnni": "AVX512-VNNI", "avx_vnni": "AVX-VNNI",
             "avx512_bf16": "AVX512-BF16", "amx_bf16": "AMX-BF16"}


def _cpuinfo() -> dict[str, str]:
    """The first processor's fields of /proc/cpuinfo ({} where there is none)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return {}
    fields = {}
    for line in text.split("\n\n", 1)[0].splitlines():
        key, _, value = line.partition(":")
        fields[key.strip()] = value.strip()
    return fields


def cpu_name() -> str:
    """The CPU model, e.g. ``AMD EPYC 9454 48-Core Processor`` (the machine type where unknown)."""
    return _cpuinfo().get("model name") or platform.processor() or platform.machine()


def cpu_flags() -> list[str]:
    """The vector extensions of ``CPU_FLAGS`` this CPU has, e.g. ``["AVX2", "AVX512", "AVX512-VNNI"]``."""
    have = set(_cpuinfo().get("flags", "").split())
    return [name for flag, name in CPU_FLAGS.items() if flag in have]


def load_average() -> str:
    """The 1/5/15-minute load averages, ``"1.02 / 0.36 / 0.14"``."""
    return " / ".join(f"{v:.2f}" for v in os.getloadavg())


def machine(device: str = "cpu") -> str:
    """One line for a report: CPU, its extensions, cores usable, memory, torch, and the GPU on CUDA."""
    import psutil

    flags = ", ".join(cpu_flags()) or "no AVX2"
    text = (f"{cpu_name()} ({flags}), {len(os.sched_getaffinity(0))} cores, "
            f"{psutil.virtual_memory().total / 2**30:.0f} GiB RAM, Python {platform.python_version()}")
    try:
        import torch
    except ImportError:
        return text
    text += f", torch {torch.__version__}"
    if device.startswith("cuda") and torch.cuda.is_available():
        text += f", {torch.cuda.get_device_name(0)}"
    return text


def tree_rss_mb(pid: int) -> float:
    """Resident memory (MiB) of a process and all its descendants; 0 once it is gone."""
    import psutil

    try:
        root = psutil.Process(pid)
        tree = [root, *root.children(recursive=True)]
    except psutil.Error:
        return 0.0
    total = 0
    for proc in tree:
        try:
            total += proc.memory_info().rss
        except psutil.Error:
            pass
    return total / 2**20


class MemorySampler:
    """Peak resident memory of a process tree (and the GPU's busy fraction), sampled in a thread.

    ``with MemorySampler(child.pid) as s: child.wait()`` then ``s.peak_rss_mb``, ``s.gpu_busy``.
    """

    def __init__(self, pid: int, gpu: bool = False, period_s: float = 0.2):
        self.pid, self.gpu, self.period_s = pid, gpu, period_s
        self.peak_rss_mb = 0.0
        self.gpu_busy: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _nvml(self):
        try:
            import pynvml

            pynvml.nvmlInit()
            return pynvml, pynvml.nvmlDeviceGetHandleByIndex(0)
        except Exception:  # noqa: BLE001 - no NVML: no busy fraction
            return None, None

    def _run(self) -> None:
        pynvml, handle = self._nvml() if self.gpu else (None, None)
        while not self._stop.is_set():
            self.peak_rss_mb = max(self.peak_rss_mb, tree_rss_mb(self.pid))
            if handle is not None:
                self.gpu_busy.append(pynvml.nvmlDeviceGetUtilizationRates(handle).gpu / 100.0)
            time.sleep(self.period_s)

    def __enter__(self) -> MemorySampler:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
