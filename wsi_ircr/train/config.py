"""Training configuration: one dataclass tree, loaded from ``configs/train/*.yaml``.

Supervised-only, Mean Teacher, +MIAC, +PIAC and full IRCR are the same code with
different weights: ``mt_weight`` (plain teacher-student consistency on every pixel),
``miac_weight`` (gamma2) and ``piac_weight`` (gamma1); with all three 0 the teacher is
still kept (EMA) but no unlabelled data is used. ``piac_mode`` picks what PIAC's instance
weights apply to: pseudo-labels from the teacher's kept instances trained with the supervised
loss (``pseudo_label``), or the squared teacher-student difference (``consistency``).
``tune_marker_radii`` are the marker radii tried when post-processing is tuned on ``data.val``.
``strong_strength`` scales the student's photometric view of unlabelled crops and
``labelled_strength`` the same augmentation of labelled crops (0 = none); ``scale_jitter`` s
zooms every crop by a factor in [1 - s, 1 + s] (0 = none, at most 0.4).
``miac_temperature`` < 1 sharpens the teacher's nucleus probability in the MIAC term.
MIAC variants (issue 9; the defaults are the method as first built):
``miac_np`` what MIAC compares on the NP branch: ``prob`` (softmax nucleus probability),
``logit`` (nucleus log-odds, whose gradient does not fade where the teacher is sure) or ``off``;
``miac_hv`` whether it compares the HV maps; ``miac_instance_norm`` every matched instance
weighs the same in the inside term (else every pixel does, so large nuclei dominate);
``miac_confidence`` c > 0 leaves out pixels where the teacher's confidence |2 p - 1| < c;
``miac_grad_ratio`` r > 0 replaces ``miac_weight`` (which then only switches MIAC on) by an
automatic weight that makes MIAC's gradient norm r times the supervised loss's, re-measured
every ``miac_scale_every`` steps (before the ramp-up, which still applies);
``miac_start_step`` MIAC's own ramp-up starts at max(``unsup_start_step``, this).
``mt_confidence`` c > 0 keeps only pixels where the teacher's confidence |2 p - 1| >= c in the
Mean Teacher term. ``anchor_weight`` a > 0 adds a * sum (theta - theta_0)^2 (L2-SP), a pull of the
student towards the ``init`` weights theta_0 against drift when adapting without labels.
``bn_recalibrate_crops`` n > 0: before each validation (and so in every saved model) the shipped
network's BatchNorm statistics are re-estimated as the plain average over n crops of the
unlabelled (else labelled) tiles, instead of the momentum average of the last few training
batches (strongly augmented, 4 crops each when adapting).
``bn_stats``: which of the student's forward passes update the BatchNorm running statistics that
the teacher copies and so validates and ships: ``all`` (labelled and unlabelled crops; the
unlabelled ones come last in a step, seen in the strong view) or ``labelled`` (only the labelled
crops, as in a supervised run; normalisation in training always uses the batch's own
statistics, so the weights train the same either way).
``ema_weights``: validate and ship the EMA of the weights (the teacher, kept in every run)
instead of the student; semi-supervised runs always ship the teacher.
``checkpoint_every`` n > 0 also saves last.pt every n steps between validations (0: only at
each validation, every ``val_every`` steps): a killed run loses at most the steps since then.
``bf16``: forward passes under bf16 autocast with fp32 weights and optimiser (null: where bf16
is native, CUDA or a CPU with AVX512-BF16 / AMX, about 2x fp32 there; benchmarks/precision.md).
``mpp`` is the network's operating resolution (null: the tiles' ``data.mpp``); the checkpoint
carries it, and post-processing thresholds are physical (um, um^2) so they hold at any mpp.
``init``: start student and teacher from this checkpoint (a path, or ``bundled`` for the model
shipped in the package) instead of random weights; it decides ``arch``, ``mpp`` and
``postprocess`` (a config that sets one of them differently is refused) and, when no labelled
instance tiles are given, gives PIAC its morphology priors (``complete_from_init``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from wsi_ircr.errors import UserError
from wsi_ircr.model.postprocess import PostProcessConfig

BUNDLED_INIT = "bundled"  # ``init`` value naming the model shipped in the package
ADAPT_CONFIGS = Path(__file__).resolve().parent.parent / "configs" / "adapt"  # <method>.yaml of ``wsi-ircr adapt``

TUNE_MARKER_RADII = (0.2, 0.3)  # marker radii tried by ``train.tune`` unless a config says otherwise (study.md: chosen on MoNuSeg validation tiles)


@dataclass(frozen=True)
class SourceConfig:
    """One more labelled source, with its own folders, resolution and kind of labels.

    images/labels: folders of RGB tiles and label maps with the same stems.
    kind: ``instances`` (instance maps: NP and HV are trained) or ``binary`` (nucleus masks,
        any non-zero value a nucleus: only the NP branch learns from them).
    ignore: optional folder of masks with the same stems; non-zero pixels were left
        unannotated and add nothing to the loss.
    mpp: resolution of the tiles (um/px); they are resampled to the model's.
    exclude: stems not trained on (e.g. that source's own validation tiles).
    """

    images: str = ""
    labels: str = ""
    kind: Literal["instances", "binary"] = "instances"
    ignore: str | None = None
    mpp: float = 0.25
    exclude: tuple[str, ...] = ()

    def __post_init__(self):
        if not self.images or not self.labels:
            raise ValueError("every extra source needs images and labels folders")
        if not 0 < self.mpp <= 10:
            raise ValueError(f"mpp must be in (0, 10], got {self.mpp}")


@dataclass(frozen=True)
class DataConfig:
    """Where the tiles are and which of them are labelled, validation or excluded.

    images/labels: folders of RGB tiles and instance maps with the same stems.
    labels_kind: ``instances`` (instance maps: NP and HV are trained) or ``binary`` (nucleus
        masks, any non-zero value a nucleus: only the NP branch learns from the labelled tiles,
        validation tiles are scored on their connected components, so touching nuclei merge,
        and the best validated step is chosen by Dice instead of AJI).
    unlabelled: optional folder of extra RGB tiles (no labels).
    include: if not empty, only these stems of ``images`` are used (e.g. a training pool).
    val: stems held out for checkpoint selection (never trained on).
    labelled: how many of the remaining stems keep their labels (``null`` = all, 0 = none:
        only with ``init``); the rest join the unlabelled pool. Chosen with ``label_seed``.
        Without ``images`` and ``labels`` there are no labelled or validation tiles at all.
    labelled_fraction: the same as a fraction of the pool (rounded, at least 1 tile);
        set at most one of ``labelled`` and ``labelled_fraction``.
    mpp: resolution of the tiles (microns per pixel); training tiles are resampled to the
        model's ``TrainConfig.mpp`` when it differs, validation tiles are scored at this one.
    extra: more labelled sources (``SourceConfig``), all of whose tiles are trained on
        (except their ``exclude``d stems); crops are drawn in proportion to tile area.
    unlabelled_slides: whole slides (files or folders of slides) whose tissue feeds unlabelled
        crops: read, tissue-masked and tiled as ``wsi-ircr segment`` does, at the model's mpp
        (``train.slides``); the tile stores go to ``<run folder>/slides/<stem>/tiles.zarr``.
    slide_mpp: level-0 microns per pixel of those slides, overriding (or replacing missing)
        metadata, as ``segment --mpp``; a slide with neither is refused.
    slide_tiles: at most this many tissue tiles per slide (drawn with ``label_seed``) are used.
    slide_tile_px: side of those tiles at the model's mpp (a multiple of 16, at least crop_px).
    """

    images: str = ""
    labels: str = ""
    labels_kind: Literal["instances", "binary"] = "instances"
    unlabelled: str | None = None
    include: tuple[str, ...] = ()
    val: tuple[str, ...] = ()
    labelled: int | None = None
    labelled_fraction: float | None = None
    label_seed: int = 0
    mpp: float = 0.25
    extra: tuple[SourceConfig, ...] = ()
    unlabelled_slides: tuple[str, ...] = ()
    slide_mpp: float | None = None
    slide_tiles: int = 64
    slide_tile_px: int = 512

    def __post_init__(self):
        if self.slide_mpp is not None and not 0 < self.slide_mpp <= 10:
            raise ValueError(f"slide_mpp must be in (0, 10] or null, got {self.slide_mpp}")
        if self.slide_tiles < 1 or self.slide_tile_px < 16 or self.slide_tile_px % 16:
            raise ValueError(f"slide_tiles must be >= 1 and slide_tile_px a multiple of 16 >= 16, got "
                             f"{self.slide_tiles} and {self.slide_tile_px}")
        if self.labelled is not None and self.labelled < 0:
            raise ValueError(f"labelled must be >= 0 or null, got {self.labelled}")
        if self.labelled_fraction is not None and not 0.0 < self.labelled_fraction <= 1.0:
            raise ValueError(f"labelled_fraction must be in (0, 1], got {self.labelled_fraction}")
        if self.labelled is not None and self.labelled_fraction is not None:
            raise ValueError("set only one of labelled and labelled_fraction")
        if self.mpp <= 0:
            raise ValueError(f"mpp must be > 0, got {self.mpp}")


@dataclass(frozen=True)
class TrainConfig:
    """All knobs of ``wsi-ircr train`` (see configs/train/*.yaml)."""

    data: DataConfig = field(default_factory=DataConfig)
    init: str | None = None
    mpp: float | None = None
    arch: str = "lite-s"
    steps: int = 2000
    batch_size: int = 8
    unlabelled_batch_size: int = 8
    crop_px: int = 192
    lr: float = 2e-3
    weight_decay: float = 1e-4
    seed: int = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    threads: int = 0
    bf16: bool | None = None
    ema_alpha: float = 0.95
    ema_weights: bool = False
    mt_weight: float = 0.0
    mt_confidence: float = 0.0
    anchor_weight: float = 0.0
    bn_recalibrate_crops: int = 0
    bn_stats: Literal["all", "labelled"] = "all"
    miac_weight: float = 0.0
    piac_weight: float = 0.0
    rampup_steps: int = 500
    unsup_start_step: int = 0
    miac_max_dist_px: float = 12.0
    miac_beta: float = 0.5
    miac_band_px: int = 2
    miac_temperature: float = 1.0
    miac_np: Literal["prob", "logit", "off"] = "prob"
    miac_hv: bool = True
    miac_instance_norm: bool = False
    miac_confidence: float = 0.0
    miac_grad_ratio: float = 0.0
    miac_scale_every: int = 25
    miac_start_step: int = 0
    piac_tau: float = 0.35
    piac_w_good: float = 2.0
    piac_mode: Literal["pseudo_label", "consistency"] = "pseudo_label"
    strong_strength: float = 1.0
    scale_jitter: float = 0.0
    labelled_strength: float = 1.0
    val_every: int = 250
    checkpoint_every: int = 0
    log_every: int = 25
    tune_postprocess: bool = True
    tune_marker_radii: tuple[float, ...] = TUNE_MARKER_RADII
    postprocess: PostProcessConfig = field(default_factory=PostProcessConfig)

    def __post_init__(self):
        for name in ("steps", "batch_size", "crop_px", "val_every", "log_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.crop_px % 16:
            raise ValueError(f"crop_px must be a multiple of 16, got {self.crop_px}")
        if not 0.0 <= self.ema_alpha < 1.0:
            raise ValueError(f"ema_alpha must be in [0, 1), got {self.ema_alpha}")
        if min(self.mt_weight, self.miac_weight, self.piac_weight) < 0:
            raise ValueError("mt_weight, miac_weight and piac_weight must be >= 0")
        if self.mpp is not None and not 0 < self.mpp <= 10:
            raise ValueError(f"mpp (the model's resolution, um/px) must be in (0, 10] or null, got {self.mpp}")
        if self.lr <= 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if not self.tune_marker_radii or min(self.tune_marker_radii) <= 0:
            raise ValueError(f"tune_marker_radii must be a non-empty list of values > 0, got {list(self.tune_marker_radii)}")
        if self.miac_temperature <= 0:
            raise ValueError(f"miac_temperature must be > 0, got {self.miac_temperature}")
        if self.miac_np == "off" and not self.miac_hv:
            raise ValueError("miac_np=off with miac_hv=false leaves MIAC nothing to compare; set miac_weight=0 instead")
        for name in ("miac_confidence", "mt_confidence"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {getattr(self, name)}")
        if self.anchor_weight < 0:
            raise ValueError(f"anchor_weight must be >= 0, got {self.anchor_weight}")
        if self.data.labels_kind == "binary" and self.tune_postprocess and self.data.val:
            raise ValueError("data.labels_kind=binary: tune_postprocess needs instance labels on the validation tiles; "
                             "set tune_postprocess=false")
        if self.miac_grad_ratio < 0 or self.miac_scale_every < 1 or self.miac_start_step < 0:
            raise ValueError("miac_grad_ratio and miac_start_step must be >= 0, miac_scale_every >= 1")
        if not 0 <= self.scale_jitter <= 0.4:
            raise ValueError(f"scale_jitter must be in [0, 0.4], got {self.scale_jitter}")
        if self.strong_strength < 0 or self.labelled_strength < 0:
            raise ValueError("strong_strength and labelled_strength must be >= 0")
        if min(self.unlabelled_batch_size, self.rampup_steps, self.threads, self.checkpoint_every, self.bn_recalibrate_crops) < 0:
            raise ValueError("unlabelled_batch_size, rampup_steps, threads, checkpoint_every and bn_recalibrate_crops must be >= 0")

    @property
    def model_mpp(self) -> float:
        """The network's operating resolution (um/px): ``mpp``, or the tiles' ``data.mpp`` when null."""
        return self.data.mpp if self.mpp is None else self.mpp

    @property
    def selection_metric(self) -> str:
        """The validation score that picks the kept step: Dice with binary labels, else AJI."""
        return "dice" if self.data.labels_kind == "binary" else "aji"

    @property
    def semi_supervised(self) -> bool:
        """True when any teacher-student term uses unlabelled data."""
        return self.unlabelled_batch_size > 0 and (self.mt_weight > 0 or self.miac_weight > 0 or self.piac_weight > 0)


def init_checkpoint_path(init: str, base_dir: Path) -> Path | None:
    """The file ``init`` names (a bundled model's name, as ``--model NAME``, or a path, relative
    ones against ``base_dir``); None for the default bundled model."""
    from wsi_ircr.model.checkpoint import BUNDLED_MODELS, bundled_model_path

    if init == BUNDLED_INIT:
        return None
    if init in BUNDLED_MODELS:
        return bundled_model_path(init)
    path = Path(init).expanduser()
    return path if path.is_absolute() else base_dir / path


def complete_from_init(data: dict, base_dir: Path) -> dict:
    """A merged config mapping with ``arch``, ``mpp`` and ``postprocess`` taken from its
    ``init`` checkpoint (unchanged without ``init``); a value the mapping sets differently is
    a ``UserError``. Used as ``resolve_config(..., complete=...)``."""
    from wsi_ircr.model.checkpoint import load_checkpoint

    init = data.get("init")
    if init is None:
        return data
    if not isinstance(init, str) or not init:
        raise UserError(f"init: expected a checkpoint path or {BUNDLED_INIT!r}, found {init!r}")
    ckpt = load_checkpoint(init_checkpoint_path(init, base_dir))
    out = dict(data)
    postprocess = dataclasses.asdict(ckpt.postprocess)
    given = {**{k: (k, v) for k, v in (("arch", ckpt.arch), ("mpp", ckpt.mpp))},
             **{f"postprocess.{k}": (k, v) for k, v in postprocess.items()}}
    mine = {**{k: out.get(k) for k in ("arch", "mpp")},
            **{f"postprocess.{k}": v for k, v in (out.get("postprocess") or {}).items()}}
    for key, value in mine.items():
        if value is not None and key in given and value != given[key][1]:
            raise UserError(f"init {init}: the checkpoint's {key} is {given[key][1]!r} but the config sets {value!r}; "
                            f"drop {key} from the config (the starting checkpoint decides it) or start from another model")
    out.update(arch=ckpt.arch, mpp=ckpt.mpp, postprocess={**(out.get("postprocess") or {}), **postprocess})
    return out


def adapt_config_path(method: str) -> Path:
    """The packaged config of ``wsi-ircr adapt --method METHOD`` (``configs/adapt/<method>.yaml``)."""
    return ADAPT_CONFIGS / f"{method}.yaml"
