"""CPU inference engines of the ``cpu-fast`` extra: the network exported once to ONNX and run by
ONNX Runtime or OpenVINO, in fp32 or int8.

int8 is static post-training quantization (ONNX QDQ: weights int8 per output channel in a
7-bit range, activations uint8 calibrated by min/max on ``CALIBRATION_IMAGE``, H&E crops of
the bundled sample slide resampled to the model's mpp); the output heads stay fp32. The 7-bit
weight range ("reduce_range") keeps the u8 x s8 products of CPUs without VNNI (AVX2) from
saturating: with full-range weights the bundled model lost 0.028 validation AJI there, with
7 bits 0.001 (benchmarks/cpu.md). OpenVINO runs the same graph less accurately on such a CPU
(0.016 AJI lost), so the extra installs ONNX Runtime only.

Exported graphs are cached in ``cache_dir()``, keyed by the checkpoint's hash, the precision
and the versions of everything that made them; every file is written atomically, so
concurrent workers exporting the same model at once are safe.
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
from importlib.util import find_spec
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from wsi_ircr.errors import UserError

if TYPE_CHECKING:
    import torch

    from wsi_ircr.model.checkpoint import Checkpoint

ENGINES = ("onnxruntime", "openvino")  # preference order; openvino runs only where asked for (not in the extra)
CPU_FAST_HINT = 'pip install "wsi-ircr[cpu-fast]"'
RECIPE = 2  # bump when the export or quantization recipe changes: cached graphs are then rebuilt
CALIBRATION_IMAGE = Path(__file__).resolve().parent.parent / "weights" / "calibration-he.png"
CALIBRATION_MPP = 0.499  # the sample slide's level 0
CALIBRATION_CROP_PX = 256  # the image is a 2 x 2 mosaic of crops this size
_OPSET = 17
NOT_EXPORTABLE = ("an engine runs a checkpoint file's export (its hash keys the cache): save this in-memory checkpoint "
                  "with save_checkpoint and load it, or use engine torch and precision fp32 or bf16")


def installed_engines() -> list[str]:
    """Engines that can run here, in preference order; exporting needs ``onnx`` and quantizing
    ``onnxruntime``, so without both there are none."""
    if find_spec("onnx") is None or find_spec("onnxruntime") is None:
        return []
    return [name for name in ENGINES if find_spec(name) is not None]


def require_engine(engine: str) -> None:
    """A one-line ``UserError`` naming the extra when ``engine`` is not installed."""
    if engine not in ENGINES:
        raise UserError(f"engine {engine!r}: expected one of {', '.join(ENGINES)}")
    if engine not in installed_engines():
        raise UserError(f"the {engine} engine is not installed (with onnx and onnxruntime): {CPU_FAST_HINT}")


def cache_dir() -> Path:
    """Where exported graphs live: ``$WSI_IRCR_CACHE``, else ``$XDG_CACHE_HOME/wsi-ircr``, else ``~/.cache/wsi-ircr``."""
    if os.environ.get("WSI_IRCR_CACHE"):
        return Path(os.environ["WSI_IRCR_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "wsi-ircr"


def package_version(name: str) -> str:
    """``name.__version__`` from the installed distribution's metadata, without importing the
    package (``onnx`` takes a second or more to import, needed only to build a graph); the
    import where no distribution of that name is installed (e.g. ``onnxruntime-gpu``)."""
    from importlib import import_module, metadata

    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return import_module(name).__version__


def _recipe_key(precision: str) -> str:
    """Short hash of what makes the graph: torch (exporter), onnx, onnxruntime (quantizer),
    the recipe number and, for int8, the calibration image."""
    parts = [f"recipe{RECIPE}", f"torch{package_version('torch')}", f"onnx{package_version('onnx')}",
             f"ort{package_version('onnxruntime')}"]
    if precision == "int8":
        parts.append(hashlib.sha256(CALIBRATION_IMAGE.read_bytes()).hexdigest()[:16])
    return hashlib.sha256("-".join(parts).encode()).hexdigest()[:12]


def graph_path(checkpoint: Checkpoint, precision: str) -> Path:
    """The cached ONNX graph of ``checkpoint`` at ``precision`` (fp32 or int8), built on first use."""
    if not checkpoint.model_hash:
        raise UserError(NOT_EXPORTABLE)
    folder = cache_dir() / "onnx"
    path = folder / f"{checkpoint.model_hash}-{precision}-{_recipe_key(precision)}.onnx"
    if path.exists():
        return path
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"{folder}: cannot create the engine cache ({e.strerror}); set WSI_IRCR_CACHE to a writable folder") from None
    if precision == "fp32":
        export_onnx(checkpoint.build(), path)
    elif precision == "int8":
        quantize_int8(graph_path(checkpoint, "fp32"), path, calibration_tiles(checkpoint.mpp))
    else:
        raise ValueError(f"no engine graph for precision {precision!r}")
    return path


def export_onnx(net: torch.nn.Module, path: Path) -> None:
    """Write ``net`` (float (N, 3, H, W) in [0, 1] -> {"np", "hv"} (N, 2, H, W)) as ONNX, batch
    and size dynamic, atomically."""
    import warnings

    import torch

    from wsi_ircr.io.atomic import atomic_path

    axes = {0: "n", 2: "h", 3: "w"}
    with atomic_path(path) as tmp, warnings.catch_warnings(), torch.inference_mode(False), torch.no_grad():
        warnings.simplefilter("ignore")  # the exporter's deprecation and tracer notes
        torch.onnx.export(net.eval(), (torch.rand(1, 3, 64, 64),), str(tmp), input_names=["image"],
                          output_names=["np", "hv"], dynamic_axes={"image": axes, "np": axes, "hv": axes},
                          opset_version=_OPSET, dynamo=False)


def calibration_tiles(mpp: float) -> list[np.ndarray]:
    """The calibration crops at ``mpp``: float32 (1, 3, H, W) in [0, 1], one per crop."""
    from wsi_ircr.io.images import read_image
    from wsi_ircr.model.resample import resize_image, scaled_shape

    mosaic = read_image(CALIBRATION_IMAGE)
    size = CALIBRATION_CROP_PX
    crops = [mosaic[r:r + size, c:c + size] for r in range(0, mosaic.shape[0], size) for c in range(0, mosaic.shape[1], size)]
    shape = scaled_shape((size, size), CALIBRATION_MPP, mpp)
    shape = (shape[0] // 16 * 16, shape[1] // 16 * 16)
    return [resize_image(crop, shape).transpose(2, 0, 1)[None].astype(np.float32) / 255.0 for crop in crops]


def _head_nodes(model) -> list[str]:
    """Names of the last Conv before each graph output (the NP and HV heads)."""
    producers = {out: node for node in model.graph.node for out in node.output}
    heads = []
    for output in model.graph.output:
        node = producers.get(output.name)
        while node is not None and node.op_type != "Conv":
            node = producers.get(node.input[0])
        if node is not None:
            heads.append(node.name)
    return heads


def quantize_int8(fp32_path: Path, path: Path, tiles: list[np.ndarray]) -> None:
    """Static QDQ quantization of the fp32 graph (weights per channel, 7-bit; activations by
    min/max on ``tiles``; the heads stay fp32), written atomically to ``path``."""
    import onnx
    from onnxruntime.quantization import CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType, quantize_static

    from wsi_ircr.io.atomic import atomic_path

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.batches = iter(tiles)

        def get_next(self):
            batch = next(self.batches, None)
            return None if batch is None else {"image": batch}

    heads = _head_nodes(onnx.load(str(fp32_path)))
    quiet = _DropRecordsFrom("onnxruntime")  # its advice to pre-process, logged on the root logger
    logging.getLogger().addFilter(quiet)
    try:
        with atomic_path(path) as tmp:
            quantize_static(str(fp32_path), str(tmp), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                            reduce_range=True, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                            calibrate_method=CalibrationMethod.MinMax, nodes_to_exclude=heads)
    finally:
        logging.getLogger().removeFilter(quiet)


class _DropRecordsFrom(logging.Filter):
    """Drops log records emitted from files under a package's folder."""

    def __init__(self, package: str):
        super().__init__()
        self.marker = f"{os.sep}{package}{os.sep}"

    def filter(self, record: logging.LogRecord) -> bool:
        return self.marker not in record.pathname


class EngineNetwork:
    """A cached ONNX graph run by ``engine``, called like the network: float (N, 3, H, W) -> dict
    of "np", "hv" (N, 2, H, W) float32 tensors. The engine's threads follow torch's CPU threads
    (re-made when ``torch.set_num_threads`` changes them)."""

    def __init__(self, path: Path, engine: str):
        require_engine(engine)
        self.path, self.engine = path, engine
        self._lock = threading.Lock()
        self._threads = 0
        self._runner = None

    def _make(self, threads: int):
        if self.engine == "onnxruntime":
            import onnxruntime

            options = onnxruntime.SessionOptions()
            options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
            options.enable_cpu_mem_arena = False  # the arena keeps the largest batch's 2 GB held between calls
            session = onnxruntime.InferenceSession(str(self.path), options, providers=["CPUExecutionProvider"])
            return lambda x: session.run(["np", "hv"], {"image": x})
        import openvino

        compiled = openvino.Core().compile_model(str(self.path), "CPU", {
            "INFERENCE_NUM_THREADS": threads, "PERFORMANCE_HINT": "LATENCY", "INFERENCE_PRECISION_HINT": "f32"})
        outputs = [compiled.output(name) for name in ("np", "hv")]

        def run(x):
            result = compiled.create_infer_request().infer({0: x})
            return [result[o] for o in outputs]

        return run

    def prepare(self, threads: int):
        """The engine's runner for ``threads`` CPU threads, made now unless it already is."""
        with self._lock:
            if self._runner is None or threads != self._threads:
                self._runner, self._threads = self._make(threads), threads
            return self._runner

    def __call__(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        import torch

        runner = self.prepare(torch.get_num_threads())
        np_logits, hv = runner(np.ascontiguousarray(x.detach().float().cpu().numpy()))
        return {"np": torch.from_numpy(np.asarray(np_logits)), "hv": torch.from_numpy(np.asarray(hv))}


def engine_network(checkpoint: Checkpoint, precision: str, engine: str) -> EngineNetwork:
    """``checkpoint``'s network at ``precision`` (fp32 or int8) on ``engine``, exported on first use."""
    require_engine(engine)
    return EngineNetwork(graph_path(checkpoint, precision), engine)
