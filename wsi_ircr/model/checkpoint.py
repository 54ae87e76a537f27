"""Checkpoints that carry their own architecture, input mpp, post-processing and priors.

A checkpoint is a ``torch.save`` dict (loadable with ``weights_only=True``)::

    {"format": "wsi-ircr-checkpoint", "version": 1, "arch": "lite-s",
     "model": state_dict, "mpp": 0.25, "postprocess": {...}, "priors": {...} | None,
     "meta": {"config": ..., "data": ..., "metrics": ..., "versions": ...},
     "train_state": {...} | None,   # optimiser, teacher, step: only in resumable files
     "weights_dtype": "float16"}    # only in files whose weights are stored in half precision

Weights stored in float16 (``save_checkpoint(..., weights_dtype="float16")``, for bundled
files: half the size) are cast back to float32 on load; the file hash names the stored file.
"""

from __future__ import annotations

import dataclasses
import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from wsi_ircr.errors import UserError

if TYPE_CHECKING:
    from wsi_ircr.model.postprocess import PostProcessConfig

FORMAT = "wsi-ircr-checkpoint"
VERSION = 1
WEIGHTS_DIR = Path(__file__).resolve().parent.parent / "weights"  # the package's bundled models
BUNDLED_NAME = "ircr-monuseg-lite-m.pt"
BUNDLED_MODELS = {"lite-m": BUNDLED_NAME}  # ``--model NAME`` -> file in WEIGHTS_DIR; the first is the default
WEIGHTS_DTYPES = ("float32", "float16")  # how ``save_checkpoint`` may store the network's floating-point tensors


def bundled_model_path(name: str = "lite-m") -> Path:
    """Path of a model shipped inside the package (``BUNDLED_MODELS``; the default lite-m was
    trained on MoNuSeg, CC BY-NC-SA 4.0)."""
    return WEIGHTS_DIR / BUNDLED_MODELS[name]


def bundled_names_help() -> str:
    """The bundled models' names for option help, the default marked: 'lite-m (the default), fast'."""
    names = list(BUNDLED_MODELS)
    return ", ".join([f"{names[0]} (the default)", *names[1:]])


def model_path(model: str | Path | None) -> Path:
    """What ``--model`` names: None -> the default bundled model, a ``BUNDLED_MODELS`` name ->
    its file (a file of that name is reached as ``./NAME``), anything else a checkpoint path.
    A bare word that is neither a bundled name nor a file is a ``UserError`` listing the names."""
    if model is None:
        return bundled_model_path()
    if isinstance(model, str) and model in BUNDLED_MODELS:
        return bundled_model_path(model)
    path = Path(model)
    if not path.exists() and len(path.parts) == 1 and not path.suffix:
        raise UserError(f"--model {model}: no bundled model of that name and no such file; choose one of "
                        f"{', '.join(BUNDLED_MODELS)} or pass a checkpoint path (.pt)")
    return path


def portable_name(path: str | Path, root: str | Path | None = None) -> str:
    """``path`` relative to ``root`` (default: the working directory) when it lies under it,
    else its file name: provenance never records a machine's absolute paths."""
    path = Path(path)
    base = Path(root if root is not None else Path.cwd()).absolute()
    try:
        return Path(path).absolute().relative_to(base).as_posix()
    except ValueError:
        return path.name


def portable_meta(value: Any, root: str | Path | None = None) -> Any:
    """A copy of the JSON-like ``value`` with every absolute path string replaced by its
    ``portable_name`` (relative to ``root``, else the file name)."""
    if isinstance(value, dict):
        return {k: portable_meta(v, root) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(portable_meta(v, root) for v in value)
    if isinstance(value, str) and "\n" not in value and Path(value).is_absolute():
        return portable_name(value, root)
    return value


def file_hash(path: Path) -> str:
    """First 16 hex digits of the file's SHA-256."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:16]


@dataclass
class Checkpoint:
    """A loaded checkpoint; ``build()`` gives the network in eval mode on the CPU."""

    arch: str
    model_state: dict
    mpp: float
    postprocess: PostProcessConfig
    priors: dict | None = None
    meta: dict = field(default_factory=dict)
    train_state: dict | None = None
    path: Path | None = None
    model_hash: str = ""
    weights_dtype: str = "float32"  # how the file stored the weights (loaded as float32 either way)

    def build(self):
        from wsi_ircr.model.net import build_model

        net = build_model(self.arch)
        try:
            net.load_state_dict(self.model_state)
        except RuntimeError as e:
            first = str(e).strip().splitlines()[0]
            raise UserError(f"{self.path}: weights do not fit architecture {self.arch!r} ({first})") from None
        return net.eval()

    def describe(self) -> dict[str, Any]:
        """Short JSON-ready description for summaries and evaluation reports (``path``: ``portable_name``)."""
        return {
            "path": portable_name(self.path) if self.path else None,
            "hash": self.model_hash,
            "arch": self.arch,
            "mpp": self.mpp,
            "postprocess": dataclasses.asdict(self.postprocess),
            "weights_dtype": self.weights_dtype,
            "data": self.meta.get("data"),
            "metrics": self.meta.get("metrics"),
        }


def stored_weights(state: dict, weights_dtype: str) -> dict:
    """``state`` (name -> tensor) on the CPU with its floating-point tensors in ``weights_dtype``
    (``WEIGHTS_DTYPES``); integer tensors (BatchNorm's batch counts) unchanged. A weight that
    overflows float16 is a ValueError naming it."""
    import torch

    if weights_dtype not in WEIGHTS_DTYPES:
        raise ValueError(f"weights_dtype must be one of {', '.join(WEIGHTS_DTYPES)}, got {weights_dtype!r}")
    dtype = getattr(torch, weights_dtype)
    out = {}
    for name, value in state.items():
        value = value.detach().cpu()
        if value.is_floating_point():
            cast = value.to(dtype)
            if bool(torch.isfinite(value).all()) and not bool(torch.isfinite(cast).all()):
                raise ValueError(f"{name}: values beyond the range of {weights_dtype} (max |w| {value.abs().max().item():.3g})")
            value = cast
        out[name] = value
    return out


def save_checkpoint(path: str | Path, checkpoint: Checkpoint, *, weights_dtype: str | None = None) -> str:
    """Write ``checkpoint`` atomically to ``path``, its network's floating-point tensors stored in
    ``weights_dtype`` (None: as the checkpoint was loaded, ``checkpoint.weights_dtype``, so a
    rewritten file keeps its storage; ``float16``: half the file, for bundled models, not for
    resumable files, whose ``train_state`` stays as it is); return the file hash."""
    weights_dtype = weights_dtype or checkpoint.weights_dtype
    import torch

    from wsi_ircr.io.atomic import atomic_path

    payload = {
        "format": FORMAT,
        "version": VERSION,
        "arch": checkpoint.arch,
        "model": stored_weights(checkpoint.model_state, weights_dtype),
        "mpp": float(checkpoint.mpp),
        "postprocess": dataclasses.asdict(checkpoint.postprocess),
        "priors": checkpoint.priors,
        "meta": checkpoint.meta,
        "train_state": checkpoint.train_state,
    }
    if weights_dtype != "float32":
        payload["weights_dtype"] = weights_dtype
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)
    return file_hash(Path(path))


def _load_reason(e: Exception) -> str:
    """A short, printable reason for a failed ``torch.load``."""
    import pickle
    import re

    if isinstance(e, pickle.UnpicklingError):
        return "not a weights-only torch file"
    lines = str(e).strip().splitlines()
    text = re.sub(r"\x1b\[[0-9;]*m|[^\x20-\x7e]", "", lines[0]) if lines else ""
    return text[:120] or type(e).__name__


def load_checkpoint(path: str | Path | None = None) -> Checkpoint:
    """Load a checkpoint: a path, a bundled model's name (str, ``model_path``) or ``None`` for
    the default bundled model. Not-ours files are ``UserError``s."""
    import torch

    from wsi_ircr.config import from_dict
    from wsi_ircr.model.postprocess import PostProcessConfig, legacy_postprocess

    path = model_path(path)
    if not path.exists():
        raise UserError(f"{path}: model file not found; pass --model PATH to a wsi-ircr checkpoint (.pt)")
    if path.is_dir():
        raise UserError(f"{path}: is a directory; pass --model PATH to a wsi-ircr checkpoint file (.pt)")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # junk files raise anything: struct.error, IndexError, UnpicklingError, ...
        raise UserError(f"{path}: not a readable wsi-ircr checkpoint ({_load_reason(e)}); train one with 'wsi-ircr train'") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise UserError(f"{path}: not a wsi-ircr checkpoint (no '{FORMAT}' header); train one with 'wsi-ircr train'")
    if payload.get("version") != VERSION:
        raise UserError(f"{path}: checkpoint version {payload.get('version')} is not supported (expected {VERSION}); upgrade wsi-ircr")
    mpp = payload.get("mpp")
    if isinstance(mpp, bool) or not isinstance(mpp, (int, float)) or not 0 < mpp <= 10:
        raise UserError(f"{path}: the checkpoint records no valid mpp ({mpp!r}); a checkpoint must carry the um/px its "
                        f"network was trained at: retrain it with 'wsi-ircr train' (data.mpp / mpp)")
    try:
        arch, model_state, mpp = str(payload["arch"]), dict(payload["model"]), float(mpp)
        weights_dtype = str(payload.get("weights_dtype", "float32"))
        model_state = {k: v.float() if torch.is_tensor(v) and v.is_floating_point() else v for k, v in model_state.items()}
        postprocess = legacy_postprocess(dict(payload["postprocess"]), mpp)
    except (KeyError, TypeError, ValueError) as e:
        raise UserError(f"{path}: damaged wsi-ircr checkpoint (bad or missing field {e}); train or download it again") from None
    return Checkpoint(
        arch=arch,
        model_state=model_state,
        mpp=mpp,
        postprocess=from_dict(PostProcessConfig, postprocess, f"{path}: postprocess"),
        priors=payload.get("priors"),
        meta=payload.get("meta") or {},
        train_state=payload.get("train_state"),
        path=path,
        model_hash=file_hash(path),
        weights_dtype=weights_dtype,
    )
