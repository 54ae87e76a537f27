"""Which numeric precision, and which engine, runs the network.

Precisions: ``fp32`` (the reference), ``bf16`` (autocast, weights fp32), ``int8`` (static
post-training quantization). ``auto`` takes the fastest one whose accuracy is proven for that
model on that kind of device: a checkpoint records in ``meta["precision"]`` what its
validation showed, per device kind::

    {"cpu": {"int8": {"engine": "onnxruntime", "aji": 0.602, "fp32_aji": 0.603, "recipe": 2, ...}}}

A precision is proven when its validation AJI is within ``AJI_TOLERANCE`` of fp32's. bf16
where it is native needs no record (validated for every ``lite`` network,
benchmarks/precision.md) unless the checkpoint records it as worse; int8 needs a record
(``pipelines/validate_precision.py`` writes them).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from wsi_ircr.errors import UserError

if TYPE_CHECKING:
    import torch

    from wsi_ircr.model.checkpoint import Checkpoint

PRECISIONS = ("auto", "fp32", "bf16", "int8")
AJI_TOLERANCE = 0.005  # validation AJI a precision may lose against fp32 and still be chosen by auto
CPU_FAST_HINT = 'pip install "wsi-ircr[cpu-fast]"'


def native_bf16(device: torch.device) -> bool:
    """True where bf16 matrix arithmetic is native and fast: CUDA, or a CPU with AVX512-BF16 or
    AMX (about 2x fp32 for these networks on an AMD EPYC Zen 4, benchmarks/precision.md);
    elsewhere bf16 on the CPU is emulated and slower than fp32."""
    import torch

    if device.type == "cuda":
        return True
    if device.type != "cpu":
        return False
    cpu = torch.cpu
    return bool(getattr(cpu, "_is_avx512_bf16_supported", lambda: False)()
                or getattr(cpu, "_is_amx_tile_supported", lambda: False)())


def speed_order(device: torch.device) -> tuple[str, ...]:
    """Precisions from fastest to slowest on ``device`` (what ``auto`` tries, in order).

    bf16 first wherever it is native (on a bf16 CPU nothing may get slower than it was);
    int8 runs on the CPU only, through an engine of the ``cpu-fast`` extra."""
    if device.type == "cuda":
        return ("bf16", "fp32")
    if native_bf16(device):
        return ("bf16", "int8", "fp32")
    return ("int8", "fp32")


def proven(checkpoint: Checkpoint | None, device: torch.device) -> dict[str, dict] | None:
    """What the checkpoint records as validated on this kind of device (None: nothing recorded,
    or no checkpoint)."""
    record = ((checkpoint.meta if checkpoint is not None else None) or {}).get("precision")
    if not isinstance(record, dict) or not isinstance(record.get(device.type), dict):
        return None
    return record[device.type]


def is_proven(entry: object, tolerance: float = AJI_TOLERANCE) -> bool:
    """A precision record whose validation AJI is within ``tolerance`` of fp32's, made with the
    current int8 recipe (``engines.RECIPE``) where it records one."""
    if not isinstance(entry, dict):
        return False
    aji, ref = entry.get("aji"), entry.get("fp32_aji")
    if not isinstance(aji, (int, float)) or not isinstance(ref, (int, float)):
        return False
    if "recipe" in entry:
        from wsi_ircr.model.engines import RECIPE

        if entry["recipe"] != RECIPE:
            return False
    return aji >= ref - tolerance


def available(precision: str, device: torch.device) -> bool:
    """Whether ``precision`` can run on ``device`` with what is installed (bf16 counts only where native)."""
    if precision == "fp32":
        return True
    if precision == "bf16":
        return native_bf16(device)
    return device.type == "cpu" and int8_engine() is not None


def int8_engine() -> str | None:
    """The installed engine that runs int8 networks (None: the ``cpu-fast`` extra is missing)."""
    from wsi_ircr.model.engines import installed_engines

    engines = installed_engines()
    return engines[0] if engines else None


def resolve_precision(requested: str, device: torch.device, checkpoint: Checkpoint | None) -> str:
    """``fp32``, ``bf16`` or ``int8``: ``requested`` itself, or for ``auto`` the fastest precision
    (``speed_order``) that runs here and whose accuracy the checkpoint proves on this kind of device.

    An explicit request is honoured where it can run (bf16 on a CPU without native bf16 runs,
    emulated and slow); int8 off the CPU, or without its engine, is a ``UserError``."""
    if requested not in PRECISIONS:
        raise UserError(f"--precision {requested}: expected one of {', '.join(PRECISIONS)}")
    if requested == "int8":
        if device.type != "cpu":
            raise UserError(f"--precision int8 runs on the CPU only (here: {device.type}); use --precision auto, bf16 or fp32")
        if int8_engine() is None:
            raise UserError(f"--precision int8 needs an engine of the cpu-fast extra (ONNX Runtime or OpenVINO), "
                            f"not installed here: {CPU_FAST_HINT}")
    if requested != "auto":
        return requested
    record = proven(checkpoint, device) or {}
    for precision in speed_order(device):
        if precision == "fp32":
            return "fp32"
        if not available(precision, device):
            continue
        entry = record.get(precision)
        # bf16 where native is validated for every lite network (benchmarks/precision.md) unless
        # the checkpoint records otherwise; int8 only where the checkpoint proves it
        if is_proven(entry) or (precision == "bf16" and entry is None):
            return precision
    return "fp32"


def resolve_engine(precision: str, device: torch.device, requested: str = "auto", exportable: bool = True) -> str:
    """What runs ``precision`` on ``device``: ``torch``, or an engine of the ``cpu-fast`` extra
    (``engines.ENGINES``). ``auto``: on the CPU, fp32 and int8 run in the preferred installed
    engine (fp32 there matches torch to about 1e-5), everything else in torch. int8 needs an engine.

    ``exportable``: whether the network comes from a checkpoint file (engines run its export,
    cached by the file's hash); an in-memory one runs in torch under ``auto``, and an engine
    asked for it is a ``UserError``."""
    from wsi_ircr.model.engines import ENGINES, NOT_EXPORTABLE, require_engine

    if requested not in ("auto", "torch", *ENGINES):
        raise UserError(f"engine {requested!r}: expected one of auto, torch, {', '.join(ENGINES)}")
    engine_ok = device.type == "cpu" and precision in ("fp32", "int8")
    if not exportable and (requested not in ("auto", "torch") or precision == "int8"):
        raise UserError(NOT_EXPORTABLE)
    if requested == "auto":
        preferred = int8_engine() if engine_ok and exportable else None
        if preferred is not None:
            return preferred
        requested = "torch"
    if requested == "torch":
        if precision == "int8":
            raise UserError(f"--precision int8 runs in an engine of the cpu-fast extra, not in torch: {CPU_FAST_HINT}")
        return "torch"
    if not engine_ok:
        raise UserError(f"the {requested} engine runs fp32 and int8 on the CPU only, not {precision} on {device.type}")
    require_engine(requested)
    return requested
