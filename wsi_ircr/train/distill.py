"""Distillation: a smaller student trained to match a teacher's NP and HV maps (the CPU model).

    python -m wsi_ircr.train.distill --config configs/train/distill.yaml --out runs/distill/fast [--resume] [--set KEY=VALUE]

The teacher (by default the bundled model) runs once over every training tile, whole, at
the model's mpp (``teacher_maps.npz`` in the run folder, reused on resume): the nucleus
probability and HV maps are the targets. Crops are cut from tiles and their maps together
(scale jitter, flips and rotations; the HV channels are turned with the pixels); the student
sees a photometrically jittered view, the targets stay the teacher's maps of the clean tile.
Loss per crop: soft cross-entropy + soft Dice against the teacher's probability, HV MSE + MSGE
against its HV maps (gradient term weighted by the teacher's probability); crops of labelled
tiles add ``sup_weight`` x the supervised loss. The EMA of the student's weights is validated
and shipped. Labelled sources of ``data.extra`` feed their images only (their labels are not
read for the loss); ``data.unlabelled_slides`` feed tissue tiles.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from wsi_ircr.config import to_dict
from wsi_ircr.errors import UserError
from wsi_ircr.train.config import BUNDLED_INIT, TUNE_MARKER_RADII, DataConfig, init_checkpoint_path
from wsi_ircr.train.data import TileSet

MAPS_FILE = "teacher_maps.npz"
_SMOOTH = 1e-3


@dataclass(frozen=True)
class DistillConfig:
    """One distillation run (``configs/train/distill.yaml``).

    data: the tiles (``train.config.DataConfig``): labelled ``images``/``labels`` (their
        ``val`` stems select the checkpoint and tune post-processing, never trained on),
        ``extra`` sources (images only) and ``unlabelled_slides``.
    teacher: checkpoint to match (a path, or ``bundled``); the student keeps its mpp.
    arch: the student's architecture (``model.net.BUILDERS``).
    labelled_share: fraction of each batch's crops cut from the labelled tiles (the rest from
        the other tiles, in proportion to area).
    sup_weight: weight of the supervised loss on the labelled crops (0: distillation only).
    strength: photometric jitter of the student's view (``augment.strong_view``; 0 = none).
    scale_jitter: crops zoomed by a factor in [1 - s, 1 + s].
    teacher_tta: the teacher's maps averaged over this many flips / transposes.
    init: start the student (and its EMA) from this checkpoint's weights (a path; null: random),
        e.g. a second, gentler schedule after a first run.
    """

    data: DataConfig = field(default_factory=DataConfig)
    teacher: str = BUNDLED_INIT
    arch: str = "lite-m-half"
    steps: int = 4000
    batch_size: int = 8
    labelled_share: float = 0.5
    crop_px: int = 192
    lr: float = 0.002
    weight_decay: float = 1e-4
    sup_weight: float = 0.5
    strength: float = 0.5
    scale_jitter: float = 0.15
    teacher_tta: int = 1
    init: str | None = None
    ema_alpha: float = 0.99
    val_every: int = 500
    checkpoint_every: int = 250
    log_every: int = 50
    tune_postprocess: bool = True
    seed: int = 0
    threads: int = 1

    def __post_init__(self):
        if self.steps < 1 or self.batch_size < 1 or self.val_every < 1 or self.log_every < 1 or self.checkpoint_every < 0:
            raise ValueError("steps, batch_size, val_every and log_every must be >= 1, checkpoint_every >= 0")
        if not 0.0 <= self.labelled_share <= 1.0 or self.sup_weight < 0 or self.strength < 0:
            raise ValueError("labelled_share must be in [0, 1], sup_weight and strength >= 0")
        if self.crop_px < 32 or self.crop_px % 16:
            raise ValueError(f"crop_px must be a multiple of 16 >= 32, got {self.crop_px}")
        if not 0 <= self.scale_jitter < 0.5 or not 0 < self.ema_alpha < 1:
            raise ValueError("scale_jitter must be in [0, 0.5), ema_alpha in (0, 1)")


def turn_hv(hv: np.ndarray, flip: bool, k: int) -> np.ndarray:
    """HV maps float (2, H, W) (x offset, y offset) of an image flipped left-right (``flip``),
    then rotated ``k`` quarter turns as ``np.rot90`` (counter-clockwise): pixels moved and
    offsets turned with them, so that ``hv_targets`` of the moved labels is the result."""
    h, v = hv[0], hv[1]
    if flip:
        h, v = -h[:, ::-1], v[:, ::-1]
    for _ in range(k % 4):
        h, v = np.rot90(v), -np.rot90(h)
    return np.ascontiguousarray(np.stack([h, v]))


class MapCropSampler:
    """Crops of tiles with their teacher maps (and labels, where the tiles have them).

    Windows lie inside the tile (tiles must be at least (crop_px + 2 margin) / (1 - scale_jitter)
    px); a window of (crop_px + 2 margin) / z px is resized to crop_px + 2 margin, flipped and
    rotated, and its centre crop_px kept (the margin gives HV targets of cut nuclei their
    whole shape).
    """

    def __init__(self, tiles: TileSet, maps: list[np.ndarray], crop_px: int, rng: np.random.Generator,
                 scale_jitter: float = 0.0, margin_px: int = 32):
        self.tiles, self.maps, self.crop_px, self.rng, self.margin_px = tiles, maps, crop_px, rng, margin_px
        self.zoom = (1 - scale_jitter, 1 + scale_jitter)
        need = int(np.ceil((crop_px + 2 * margin_px) / self.zoom[0]))
        small = [s for s, im in zip(tiles.stems, tiles.images) if min(im.shape[:2]) < need]
        if small:
            raise UserError(f"tile {small[0]!r} is smaller than {need} px, the largest window of crop_px={crop_px}; "
                            f"lower crop_px or scale_jitter, or leave the tile out")
        areas = np.array([im.shape[0] * im.shape[1] for im in tiles.images], np.float64)
        self.tile_p = areas / areas.sum()

    def sample(self, n: int) -> dict[str, np.ndarray]:
        """``{"image": uint8 (n, C, C, 3), "maps": float32 (n, 3, C, C) (probability, x, y offsets)}``
        plus ``"labels"`` int32 (n, C, C) and ``"hv"`` float32 (n, 2, C, C) for labelled tiles."""
        from wsi_ircr.model.resample import resize_image, resize_labels
        from wsi_ircr.train.targets import hv_targets

        size, m, c = self.crop_px + 2 * self.margin_px, self.margin_px, self.crop_px
        out: dict[str, list] = {"image": [], "maps": [], "labels": [], "hv": []}
        for _ in range(n):
            i = int(self.rng.choice(len(self.tiles), p=self.tile_p))
            image, maps = self.tiles.images[i], self.maps[i]
            src = round(size / self.rng.uniform(*self.zoom))
            r0 = int(self.rng.integers(0, image.shape[0] - src + 1))
            c0 = int(self.rng.integers(0, image.shape[1] - src + 1))
            flip, k = bool(self.rng.integers(2)), int(self.rng.integers(4))
            crop = resize_image(image[r0:r0 + src, c0:c0 + src], (size, size))
            window = torch.from_numpy(maps[:, r0:r0 + src, c0:c0 + src].astype(np.float32))[None]
            window = F.interpolate(window, size=(size, size), mode="bilinear", align_corners=False)[0].numpy()
            crop = np.rot90(crop[:, ::-1] if flip else crop, k)
            prob = np.rot90(window[0, :, ::-1] if flip else window[0], k)
            hv = turn_hv(window[1:], flip, k)
            out["image"].append(crop[m:m + c, m:m + c])
            out["maps"].append(np.concatenate([prob[None], hv])[:, m:m + c, m:m + c])
            if self.tiles.labels is not None:
                lab = resize_labels(self.tiles.labels[i][r0:r0 + src, c0:c0 + src], (size, size))
                lab = np.rot90(lab[:, ::-1] if flip else lab, k)
                out["labels"].append(lab[m:m + c, m:m + c])
                out["hv"].append(hv_targets(np.ascontiguousarray(lab))[:, m:m + c, m:m + c])
        return {k: np.ascontiguousarray(np.stack(v)) for k, v in out.items() if v}


def distill_loss(out: dict[str, torch.Tensor], maps: torch.Tensor) -> torch.Tensor:
    """Student output ``{"np": (N, 2, H, W) logits, "hv": (N, 2, H, W)}`` against the teacher's
    ``maps`` float (N, 3, H, W) (nucleus probability, x and y offsets): soft cross-entropy + soft
    Dice on the probability, HV MSE + MSGE with the gradient term weighted by that probability."""
    from wsi_ircr.train.losses import hv_loss

    p_t = maps[:, 0]
    log_p = F.log_softmax(out["np"].float(), dim=1)
    ce = -(p_t * log_p[:, 1] + (1.0 - p_t) * log_p[:, 0]).mean()
    p_s = log_p[:, 1].exp()
    dice = 1.0 - (2.0 * (p_s * p_t).sum() + _SMOOTH) / (p_s.sum() + p_t.sum() + _SMOOTH)
    return ce + dice + hv_loss(out["hv"].float(), maps[:, 1:], p_t)


def teacher_maps(teacher, tiles: TileSet, tta: int, path: Path, say) -> list[np.ndarray]:
    """float16 (3, H, W) per tile: the teacher's nucleus probability and HV maps of the whole
    tile (``Predictor.predict_image_maps``); cached in ``path``, keyed by teacher hash and stems."""
    from wsi_ircr.io.atomic import atomic_path
    from wsi_ircr.model.inference import Predictor

    key = json.dumps({"teacher": teacher.model_hash, "tta": tta, "stems": tiles.stems})
    if path.exists():
        with np.load(path) as cached:
            if str(cached["key"]) == key:
                return [cached[f"m{i}"] for i in range(len(tiles))]
    predictor = Predictor(teacher, device="cpu", tta=tta, precision="fp32", engine="torch")
    maps, t0 = [], time.time()
    with torch.inference_mode():
        for image in tiles.images:
            prob, hv = predictor.predict_image_maps(image)
            maps.append(np.concatenate([prob[None], hv]).astype(np.float16))
    say(f"teacher maps of {len(tiles)} tiles ({sum(m[0].size for m in maps) / 1e6:.1f} Mpx) in {time.time() - t0:.0f} s")
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.savez(f, key=np.array(key), **{f"m{i}": m for i, m in enumerate(maps)})
    return maps


def load_tiles(cfg: DistillConfig, base_dir: Path, out_dir: Path, mpp: float):
    """(labelled TileSet, other TileSet, validation TileSet) at ``mpp`` (validation at ``data.mpp``)."""
    from wsi_ircr.train.data import load_source, load_train_data
    from wsi_ircr.train.slides import load_slide_tiles

    d = cfg.data
    data = load_train_data(dataclasses.replace(d, extra=()), base_dir, mpp)
    other = data.unlabelled
    for source in d.extra:
        tiles = load_source(source, base_dir, mpp)
        other.stems += tiles.stems
        other.images += tiles.images
    if d.unlabelled_slides:
        paths = [p if Path(p).is_absolute() else base_dir / p for p in d.unlabelled_slides]
        tiles = load_slide_tiles(paths, out_dir / "slides", mpp, slide_mpp=d.slide_mpp, tile_px=d.slide_tile_px,
                                 max_tiles=d.slide_tiles, seed=d.label_seed)
        other.stems += tiles.stems
        other.images += tiles.images
    return data.labelled, other, data.val


def validate(net: torch.nn.Module, val: TileSet, teacher, data_mpp: float) -> dict[str, float]:
    """Mean instance metrics of ``net`` (with the teacher's mpp and post-processing) on ``val``."""
    from wsi_ircr.metrics import mean_scores, score_instances
    from wsi_ircr.model.inference import Predictor

    net.eval()
    predictor = Predictor.from_network(net, teacher.mpp, teacher.postprocess, torch.device("cpu"))
    with torch.inference_mode():
        return mean_scores([score_instances(lab, predictor.segment_image(im, data_mpp)) for im, lab in zip(val.images, val.labels)])


class Distiller:
    """Student, its EMA, optimiser and samplers of one run; ``state`` / ``load_state`` for resume."""

    def __init__(self, cfg: DistillConfig, labelled, other, maps: list[np.ndarray], start: dict | None = None):
        from wsi_ircr.model.net import build_model
        from wsi_ircr.train.loop import lr_factor

        self.cfg = cfg
        torch.manual_seed(cfg.seed)
        self.rng = np.random.default_rng(cfg.seed)
        self.gen = torch.Generator().manual_seed(cfg.seed)
        self.student = build_model(cfg.arch)
        if start is not None:
            self.student.load_state_dict(start)
        self.student = self.student.to(memory_format=torch.channels_last)
        self.ema = copy.deepcopy(self.student)
        for p in self.ema.parameters():
            p.requires_grad_(False)
        self.opt = torch.optim.AdamW(self.student.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, lambda step: lr_factor(step, cfg.steps))
        n = len(labelled)
        self.n_labelled = round(cfg.batch_size * cfg.labelled_share) if n and len(other) else (cfg.batch_size if n else 0)
        self.labelled = MapCropSampler(labelled, maps[:n], cfg.crop_px, self.rng, cfg.scale_jitter) if n else None
        self.other = MapCropSampler(other, maps[n:], cfg.crop_px, self.rng, cfg.scale_jitter) if len(other) else None
        self.step, self.history, self.best = 0, [], {"aji": -1.0, "step": 0}

    def state(self) -> dict:
        return {"step": self.step, "optimizer": self.opt.state_dict(), "scheduler": self.sched.state_dict(),
                "student": self.student.state_dict(), "history": self.history, "best": self.best,
                "rng": json.dumps(self.rng.bit_generator.state), "torch_rng": torch.get_rng_state(), "gen": self.gen.get_state()}

    def load_state(self, s: dict, ema_state: dict) -> None:
        self.student.load_state_dict(s["student"])
        self.ema.load_state_dict(ema_state)
        self.opt.load_state_dict(s["optimizer"])
        self.sched.load_state_dict(s["scheduler"])
        self.step, self.history, self.best = s["step"], s["history"], s["best"]
        self.rng.bit_generator.state = json.loads(s["rng"])
        torch.set_rng_state(s["torch_rng"])
        self.gen.set_state(s["gen"])

    def train_step(self) -> dict[str, float]:
        from wsi_ircr.train.augment import strong_view
        from wsi_ircr.train.loop import _to_tensor, ema_update, optimiser_step
        from wsi_ircr.train.losses import instance_loss

        cfg = self.cfg
        self.student.train()
        parts = []
        if self.n_labelled:
            parts.append(self.labelled.sample(self.n_labelled))
        if cfg.batch_size - self.n_labelled:
            parts.append(self.other.sample(cfg.batch_size - self.n_labelled))
        x = _to_tensor(np.concatenate([p["image"] for p in parts]), torch.device("cpu"))
        if cfg.strength > 0:
            x = strong_view(x, self.gen, cfg.strength)
        maps = torch.from_numpy(np.concatenate([p["maps"] for p in parts]))
        out = self.student(x)
        loss = distill_loss(out, maps)
        record = {"distill": float(loss.detach())}
        if self.n_labelled and cfg.sup_weight > 0:
            lab = parts[0]
            n = self.n_labelled
            sup = instance_loss({k: v[:n] for k, v in out.items()}, torch.from_numpy((lab["labels"] > 0).astype(np.int64)),
                                torch.from_numpy(lab["hv"]))
            record["sup"] = float(sup.detach())
            loss = loss + cfg.sup_weight * sup
        optimiser_step(self.opt, self.sched, self.student, loss)
        ema_update(self.ema, self.student, cfg.ema_alpha)
        self.step += 1
        record["loss"] = float(loss.detach())
        return record


def _checkpoint(distiller: Distiller, teacher, meta: dict, with_state: bool, postprocess=None):
    from wsi_ircr.model.checkpoint import Checkpoint

    return Checkpoint(arch=distiller.cfg.arch, model_state=distiller.ema.state_dict(), mpp=teacher.mpp,
                      postprocess=postprocess or teacher.postprocess, priors=teacher.priors, meta=meta,
                      train_state=distiller.state() if with_state else None)


def distill(cfg: DistillConfig, out_dir: Path, *, base_dir: Path = Path("."), resume: bool = False, say=print) -> dict:
    """Run ``cfg`` into ``out_dir``: last.pt (resumable, every ``checkpoint_every`` steps and at
    each validation), best.pt (best validation AJI of the EMA), model.pt (best.pt with the
    post-processing tuned on the validation tiles when asked), metrics.json."""
    import yaml

    from wsi_ircr.config import from_dict
    from wsi_ircr.io.atomic import atomic_open
    from wsi_ircr.model.checkpoint import BUNDLED_NAME, load_checkpoint, portable_meta, portable_name, save_checkpoint
    from wsi_ircr.model.net import build_model
    from wsi_ircr.versions import versions

    last = out_dir / "last.pt"
    if resume and not last.exists():
        raise UserError(f"{out_dir}: nothing to resume (no last.pt); start without --resume")
    torch.set_num_threads(cfg.threads)
    build_model(cfg.arch)  # an unknown architecture fails before the data is read
    teacher_path = init_checkpoint_path(cfg.teacher, base_dir)
    teacher = load_checkpoint(teacher_path)
    labelled, other, val = load_tiles(cfg, base_dir, out_dir, teacher.mpp)
    if not len(labelled) + len(other):
        raise UserError("distillation: no training tiles; set data.images/data.labels, data.extra or data.unlabelled_slides")
    out_dir.mkdir(parents=True, exist_ok=True)
    say(f"data: {len(labelled)} labelled, {len(other)} other, {len(val)} validation tiles")
    maps = teacher_maps(teacher, TileSet(labelled.stems + other.stems, labelled.images + other.images), cfg.teacher_tta,
                        out_dir / MAPS_FILE, say)
    start = None
    if cfg.init:
        start = load_checkpoint(init_checkpoint_path(cfg.init, base_dir))
        if start.arch != cfg.arch:
            raise UserError(f"{cfg.init}: a {start.arch} checkpoint cannot start a {cfg.arch} student; set arch={start.arch}")
    distiller = Distiller(cfg, labelled, other, maps, start.model_state if start is not None else None)
    meta = {"config": portable_meta(to_dict(cfg)), "versions": versions(),
            "data": {"labelled": labelled.stems, "other": other.stems, "val": val.stems},
            "teacher": {"name": f"{BUNDLED_INIT}:{BUNDLED_NAME}" if teacher_path is None else portable_name(teacher_path),
                        "hash": teacher.model_hash, "arch": teacher.arch}}
    if start is not None:
        meta["init"] = {"name": portable_name(start.path), "hash": start.model_hash}
    if resume:
        ckpt = load_checkpoint(last)
        saved = ckpt.meta.get("config")
        if not isinstance(saved, dict) or to_dict(from_dict(DistillConfig, saved)) != to_dict(cfg):
            raise UserError(f"{last}: was run with a different config; resume with the same config and overrides, or use a new --out")
        distiller.load_state(ckpt.train_state, ckpt.model_state)
        say(f"resuming from step {distiller.step}")
    with atomic_open(out_dir / "config.yaml") as f:
        yaml.safe_dump(to_dict(cfg), f, sort_keys=False)
    t0, start, running = time.time(), distiller.step, {}
    while distiller.step < cfg.steps:
        for k, v in distiller.train_step().items():
            running[k] = running.get(k, 0.0) + v
        step = distiller.step
        if step % cfg.log_every == 0 or step == cfg.steps:
            n = cfg.log_every if step % cfg.log_every == 0 else step % cfg.log_every
            rate = (step - start) / max(time.time() - t0, 1e-9)
            terms = " ".join(f"{k}={v / n:.4f}" for k, v in running.items())
            say(f"step {step}/{cfg.steps} {terms} {rate:.2f} it/s eta {(cfg.steps - step) / max(rate, 1e-9) / 60:.1f} min")
            running = {}
        if step % cfg.val_every == 0 or step == cfg.steps:
            metrics = validate(distiller.ema, val, teacher, cfg.data.mpp) if len(val) else {}
            entry = {"step": step, **{k: float(v) for k, v in metrics.items()}}
            distiller.history.append(entry)
            if metrics:
                say(f"val step {step}: AJI {metrics['aji']:.4f} Dice {metrics['dice']:.4f} PQ {metrics['pq']:.4f}")
            if not metrics or metrics["aji"] > distiller.best["aji"]:
                distiller.best = {"aji": float(metrics.get("aji", -1.0)), "step": step, "val": entry}
                save_checkpoint(out_dir / "best.pt", _checkpoint(distiller, teacher, {**meta, "metrics": {"val": entry}}, False))
            save_checkpoint(last, _checkpoint(distiller, teacher, {**meta, "config": to_dict(cfg)}, True))
        elif cfg.checkpoint_every and step % cfg.checkpoint_every == 0:
            save_checkpoint(last, _checkpoint(distiller, teacher, {**meta, "config": to_dict(cfg)}, True))
    seconds = time.time() - t0
    final = load_checkpoint(out_dir / "best.pt")
    final.meta["metrics"] = {"val": distiller.best.get("val"), "train_seconds": seconds, "history": distiller.history}
    if cfg.tune_postprocess and len(val):
        from wsi_ircr.model.inference import Predictor
        from wsi_ircr.train.tune import tune_postprocess

        predictor = Predictor.from_network(final.build(), final.mpp, final.postprocess, torch.device("cpu"))
        final.postprocess, tuned = tune_postprocess(predictor, val.images, val.labels, TUNE_MARKER_RADII, mpp=cfg.data.mpp)
        final.meta["metrics"]["val_aji_tuned_postprocess"] = tuned
        say(f"post-processing tuned on validation: AJI {tuned:.4f} with {final.postprocess}")
    save_checkpoint(out_dir / "model.pt", final)
    summary = {"best": distiller.best, "train_seconds": seconds, "steps": cfg.steps, "history": distiller.history,
               "val_aji_tuned_postprocess": final.meta["metrics"].get("val_aji_tuned_postprocess")}
    with atomic_open(out_dir / "metrics.json") as f:
        json.dump(summary, f, indent=1)
    return summary


def main(argv: list[str] | None = None) -> int:
    from wsi_ircr.config import load_config

    parser = argparse.ArgumentParser(prog="python -m wsi_ircr.train.distill", description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, required=True, help="YAML file (configs/train/distill.yaml)")
    parser.add_argument("--out", type=Path, required=True, help="run folder")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help="any config key")
    parser.add_argument("--resume", action="store_true", help="continue from OUT/last.pt")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(DistillConfig, args.config, args.overrides)
        distill(cfg, args.out, base_dir=args.config.resolve().parent, resume=args.resume,
                say=lambda line: print(line, file=sys.stderr, flush=True))
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
