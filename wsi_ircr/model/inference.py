"""Batched NP/HV inference and segmentation of tiles and whole images."""

from __future__ import annotations

import numpy as np
import torch
from torch.nn import functional as F

from wsi_ircr.errors import UserError
from wsi_ircr.model.checkpoint import Checkpoint
from wsi_ircr.model.postprocess import PostProcessConfig, instances_from_maps
from wsi_ircr.model.precision import native_bf16, resolve_engine, resolve_precision  # noqa: F401 - native_bf16 re-exported

_ALIGN = 16


def resolve_device(device: str) -> torch.device:
    """``auto`` picks CUDA when available; ``cuda`` without a GPU is a ``UserError``."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {device}: no CUDA GPU is visible to torch; use --device cpu or auto")
    if device != "cpu" and not device.startswith("cuda"):
        raise UserError(f"--device {device}: expected auto, cpu or cuda")
    return torch.device(device)


def output_maps(out: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """The network's output dict -> nucleus probability (N, H, W) and HV (N, 2, H, W), float32."""
    return torch.softmax(out["np"].float(), dim=1)[:, 1], out["hv"].float()


def predict_maps_tensor(net: torch.nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Run ``net`` on float (N, 3, H, W) in [0, 1]; pad to a multiple of 16 by reflection.

    Returns nucleus probability (N, H, W) and HV (N, 2, H, W), float32.
    """
    h, w = x.shape[-2:]
    ph, pw = (-h) % _ALIGN, (-w) % _ALIGN
    if ph or pw:
        mode = "reflect" if ph < h and pw < w else "replicate"
        x = F.pad(x, (0, pw, 0, ph), mode=mode)
    prob, hv = output_maps(net(x))
    return prob[:, :h, :w], hv[:, :, :h, :w]


TTA_VIEWS = (1, 2, 4, 8)  # test-time augmentation: how many of the 8 flips / transposes of the square


def _view(x: torch.Tensor, k: int) -> torch.Tensor:
    """The ``k``-th of the 8 symmetries of the square applied to (N, C, H, W): bits 1 = flip W, 2 = flip H, 4 = transpose."""
    if k & 4:
        x = x.transpose(-1, -2)
    dims = [d for bit, d in ((1, -1), (2, -2)) if k & bit]
    return x.flip(dims) if dims else x


def _unview(prob: torch.Tensor, hv: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Undo ``_view(., k)`` on probability (N, H', W') and HV (N, 2, H', W'): pixels move back and
    the (x, y) offsets turn with them (a flip of W negates h, of H negates v, a transpose swaps them)."""
    dims = [d for bit, d in ((1, -1), (2, -2)) if k & bit]
    if dims:
        prob, hv = prob.flip(dims), hv.flip(dims)
        sign = torch.tensor([-1.0 if k & 1 else 1.0, -1.0 if k & 2 else 1.0], dtype=hv.dtype, device=hv.device)
        hv = hv * sign[None, :, None, None]
    if k & 4:
        prob, hv = prob.transpose(-1, -2), hv.transpose(-1, -2).flip(1)
    return prob, hv


POSTPROCESS_BACKENDS = ("auto", "skimage", "torch")


def choose_backend(device: torch.device, backend: str = "auto") -> str:
    """The post-processing to run: ``auto`` = torch on CUDA (batched on the GPU), scikit-image
    on the CPU (measured 50-100x faster there than the torch path: benchmarks/postprocess.md)."""
    if backend not in POSTPROCESS_BACKENDS:
        raise UserError(f"postprocess backend {backend!r}: expected one of {', '.join(POSTPROCESS_BACKENDS)}")
    if backend == "auto":
        return "torch" if device.type == "cuda" else "skimage"
    return backend


class Predictor:
    """A checkpoint's network on a device, with its post-processing.

    ``predict_maps`` / ``segment_tiles`` take uint8 (N, H, W, 3) RGB at ``self.mpp``;
    ``segment_image`` takes an image at any mpp. ``tta``: average the maps over this many
    of the 8 flips / transposes (1 = none; cost grows in proportion). ``postprocess_backend``:
    see ``choose_backend`` (used by ``predict_batch``). ``precision``: ``fp32``, ``bf16``
    (autocast), ``int8`` or ``auto`` (``precision.resolve_precision``); ``engine``: ``torch``,
    ``onnxruntime``, ``openvino`` or ``auto`` (``precision.resolve_engine``; torch for a
    checkpoint not loaded from a file); ``self.precision`` and ``self.engine`` say what runs.
    """

    def __init__(self, checkpoint: Checkpoint, device: str = "auto", batch_size: int = 8, tta: int = 1,
                 postprocess_backend: str = "auto", precision: str = "auto", engine: str = "auto"):
        if tta not in TTA_VIEWS:
            raise UserError(f"--tta {tta}: expected one of {', '.join(map(str, TTA_VIEWS))} (views averaged)")
        self.checkpoint = checkpoint
        self.device = resolve_device(device)
        self.batch_size = batch_size
        self.tta = tta
        self.mpp = checkpoint.mpp
        self.postprocess = checkpoint.postprocess
        self.model_hash = checkpoint.model_hash
        self.postprocess_backend = choose_backend(self.device, postprocess_backend)
        self.precision = resolve_precision(precision, self.device, checkpoint)
        self.engine = resolve_engine(self.precision, self.device, engine, exportable=bool(checkpoint.model_hash))
        if self.engine == "torch":
            self.net = checkpoint.build().to(self.device).to(memory_format=torch.channels_last)
        else:
            from wsi_ircr.model.engines import engine_network

            self.net = engine_network(checkpoint, self.precision, self.engine)

    @classmethod
    def from_network(cls, net: torch.nn.Module, mpp: float, postprocess: PostProcessConfig, device: torch.device) -> Predictor:
        """A predictor around a live network (e.g. during training), used as it is: no copy, no mode change."""
        from wsi_ircr.model.checkpoint import Checkpoint

        self = cls.__new__(cls)
        self.checkpoint = Checkpoint(arch="", model_state={}, mpp=mpp, postprocess=postprocess)
        self.device, self.batch_size, self.tta = device, 1, 1
        self.mpp, self.postprocess, self.model_hash, self.net = mpp, postprocess, "", net
        self.postprocess_backend, self.precision, self.engine = "skimage", "fp32", "torch"
        return self

    @property
    def bf16(self) -> bool:
        """Whether the network runs under bf16 autocast."""
        return self.precision == "bf16"

    def _maps(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Maps of float (N, 3, H, W), averaged over ``self.tta`` views."""
        if self.tta == 1:
            return predict_maps_tensor(self.net, x)
        prob_sum = hv_sum = None
        for k in range(self.tta):
            prob, hv = _unview(*predict_maps_tensor(self.net, _view(x, k).contiguous(memory_format=torch.channels_last)), k)
            prob_sum = prob if prob_sum is None else prob_sum + prob
            hv_sum = hv if hv_sum is None else hv_sum + hv
        return prob_sum / self.tta, hv_sum / self.tta

    def _device_maps(self, tiles: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """uint8 (n, H, W, 3) -> probability (n, H, W), HV (n, 2, H, W), float32 on ``self.device``
        (the network in bf16 autocast when ``self.bf16``)."""
        batch = torch.from_numpy(np.ascontiguousarray(tiles))
        x = batch.to(self.device).permute(0, 3, 1, 2).float().div_(255.0)
        if self.engine == "torch":
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16):
            prob, hv = self._maps(x)
        return prob.float(), hv.float()

    @torch.inference_mode()
    def predict_maps(self, tiles: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """uint8 (N, H, W, 3) -> probability float32 (N, H, W), HV float32 (N, 2, H, W)."""
        probs, hvs = [], []
        for start in range(0, len(tiles), self.batch_size):
            prob, hv = self._device_maps(tiles[start : start + self.batch_size])
            probs.append(prob.cpu().numpy())
            hvs.append(hv.cpu().numpy())
        return np.concatenate(probs), np.concatenate(hvs)

    @torch.inference_mode()
    def predict_batch(self, tiles: np.ndarray) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
        """One forward batch of uint8 (N, H, W, 3), post-processed on the device when the backend is torch.

        Returns:
            probability float32 (N, H, W); then HV float32 (N, 2, H, W) and None with the
            scikit-image backend (``instances`` runs later, on the CPU), or None and the
            int32 (N, H, W) instance maps of the torch backend.
        """
        prob, hv = self._device_maps(tiles)
        if self.postprocess_backend == "torch":
            from wsi_ircr.model.postprocess_torch import instances_from_maps_torch

            labels = instances_from_maps_torch(prob, hv, self.postprocess, mpp=self.mpp)
            return prob.cpu().numpy(), None, labels.cpu().numpy()
        return prob.cpu().numpy(), hv.cpu().numpy(), None

    def instances(self, prob: np.ndarray, hv: np.ndarray, mpp: float | None = None) -> np.ndarray:
        """This model's post-processing: probability (H, W) + HV (2, H, W) at ``mpp``
        (default: the model's) -> int32 (H, W)."""
        return instances_from_maps(prob, hv, self.postprocess, mpp=self.mpp if mpp is None else mpp)

    def segment_tiles(self, tiles: np.ndarray) -> list[np.ndarray]:
        """uint8 (N, H, W, 3) -> N int32 (H, W) instance maps."""
        probs, hvs = self.predict_maps(tiles)
        return [self.instances(p, h) for p, h in zip(probs, hvs)]

    def predict_image_maps(self, image: np.ndarray, window_px: int = 1024, overlap_px: int = 128) -> tuple[np.ndarray, np.ndarray]:
        """uint8 (H, W, 3) -> probability float32 (H, W), HV float32 (2, H, W).

        Images larger than ``window_px`` run as overlapping windows; each window keeps only
        its centre (``overlap_px`` of context dropped on inner sides).
        """
        h, w = image.shape[:2]
        if h <= window_px and w <= window_px:
            prob, hv = self.predict_maps(image[None])
            return prob[0], hv[0]
        if overlap_px < 0 or window_px <= 2 * overlap_px:
            raise ValueError(f"window_px ({window_px}) must exceed 2 * overlap_px ({overlap_px}) and overlap_px be >= 0")
        prob = np.zeros((h, w), np.float32)
        hv = np.zeros((2, h, w), np.float32)
        step = window_px - 2 * overlap_px
        for r0 in range(0, h, step):
            for c0 in range(0, w, step):
                rr0, cc0 = max(r0 - overlap_px, 0), max(c0 - overlap_px, 0)
                rr1, cc1 = min(r0 + step + overlap_px, h), min(c0 + step + overlap_px, w)
                p, v = self.predict_maps(image[rr0:rr1, cc0:cc1][None])
                r1, c1 = min(r0 + step, h), min(c0 + step, w)
                prob[r0:r1, c0:c1] = p[0, r0 - rr0 : r1 - rr0, c0 - cc0 : c1 - cc0]
                hv[:, r0:r1, c0:c1] = v[0, :, r0 - rr0 : r1 - rr0, c0 - cc0 : c1 - cc0]
        return prob, hv

    def maps_at(self, image: np.ndarray, mpp: float | None = None, window_px: int = 1024, overlap_px: int = 128) -> tuple[np.ndarray, np.ndarray]:
        """``predict_image_maps`` of uint8 (H, W, 3) at ``mpp`` um/px (default: the model's), on the image's grid.

        An image at another mpp is resampled to the model's, and the maps back (bilinear).
        """
        from wsi_ircr.model.resample import resize_image, resize_maps, same_mpp, scaled_shape

        if mpp is None or same_mpp(mpp, self.mpp):
            return self.predict_image_maps(image, window_px, overlap_px)
        shape = scaled_shape(image.shape[:2], mpp, self.mpp)
        if min(shape) < _ALIGN:
            raise UserError(f"a {image.shape[0]}x{image.shape[1]} px image at {mpp} um/px is {shape[0]}x{shape[1]} px at the "
                            f"model's {self.mpp} um/px, too small to segment; check the mpp")
        prob, hv = self.predict_image_maps(resize_image(image, shape), window_px, overlap_px)
        return resize_maps(prob, hv, image.shape[:2])

    def segment_image(self, image: np.ndarray, mpp: float | None = None, window_px: int = 1024, overlap_px: int = 128) -> np.ndarray:
        """uint8 (H, W, 3) at ``mpp`` um/px (default: the model's) -> int32 (H, W) on the same grid.

        Maps from ``maps_at`` (overlapping windows, resampled back when the mpp differs),
        then one post-processing on the image's own grid, so instances land where the labels are.
        """
        return self.instances(*self.maps_at(image, mpp, window_px, overlap_px), mpp)
