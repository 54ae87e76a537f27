"""The IRCR-Net training loop: supervised loss + Mean Teacher, MIAC and PIAC terms.

Per step: a labelled batch (supervised NP Dice+CE, HV MSE+MSGE) and, when any
unsupervised weight is > 0, an unlabelled batch whose crops are geometrically augmented
once, then seen weakly by the EMA teacher and strongly by the student.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import sys
import time
from collections.abc import Callable, Iterable
from contextlib import contextmanager, nullcontext
from pathlib import Path

import numpy as np
import torch

from wsi_ircr.config import to_dict
from wsi_ircr.errors import UserError
from wsi_ircr.model.checkpoint import Checkpoint, load_checkpoint, portable_meta, save_checkpoint
from wsi_ircr.model.inference import Predictor, native_bf16, output_maps, resolve_device
from wsi_ircr.model.net import build_model
from wsi_ircr.model.postprocess import instances_from_maps
from wsi_ircr.train.config import BUNDLED_INIT, TrainConfig, init_checkpoint_path
from wsi_ircr.train.data import CropSampler, TrainData, load_train_data
from wsi_ircr.versions import versions

log = logging.getLogger(__name__)

RUN_FILES = ("model.pt", "best.pt", "last.pt", "metrics.json", "config.yaml")  # what ``train`` writes in out_dir
SLIDE_STORES = "slides"  # out_dir/slides/<stem>/tiles.zarr: tile stores of data.unlabelled_slides (reused on resume)


def say_on_stderr(line: str) -> None:
    """The default destination of progress lines."""
    print(line, file=sys.stderr, flush=True)


class TrainingStopped(UserError):
    """The run was asked to stop before its last step (e.g. its cluster client went away)."""


def rampup(step: int, start: int, length: int) -> float:
    """Sigmoid ramp-up exp(-5 (1 - t)^2) from ``start`` over ``length`` steps (0 before)."""
    if step < start:
        return 0.0
    if length == 0:
        return 1.0
    t = min((step - start) / length, 1.0)
    return math.exp(-5.0 * (1.0 - t) ** 2)


def lr_factor(step: int, total: int) -> float:
    """Linear warm-up over the first 5 % of steps, then cosine decay to 2 % of the peak."""
    warm = max(1, total // 20)
    if step < warm:
        return (step + 1) / warm
    t = (step - warm) / max(total - warm, 1)
    return 0.02 + 0.98 * 0.5 * (1.0 + math.cos(math.pi * min(t, 1.0)))


@torch.no_grad()
def ema_update(teacher: torch.nn.Module, student: torch.nn.Module, alpha: float) -> None:
    """teacher = alpha * teacher + (1 - alpha) * student; buffers (BN statistics) copied."""
    for t, s in zip(teacher.parameters(), student.parameters()):
        t.mul_(alpha).add_(s.detach(), alpha=1.0 - alpha)
    for t, s in zip(teacher.buffers(), student.buffers()):
        t.copy_(s)


@torch.no_grad()
def optimiser_step(opt: torch.optim.Optimizer, sched, model: torch.nn.Module, loss: torch.Tensor,
                   max_grad_norm: float = 5.0) -> None:
    """One update of ``model`` from ``loss`` (gradient norm clipped); the schedule always advances,
    the weights only when ``loss`` has a gradient."""
    opt.zero_grad(set_to_none=True)
    if loss.requires_grad:
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
        opt.step()
    sched.step()


@contextmanager
def bn_momentum(net: torch.nn.Module, momentum: float | None):
    """Every BatchNorm of ``net`` updates its running statistics with ``momentum`` (0: not at all;
    None: the cumulative average) inside the block, and with its own momentum after."""
    norms = [m for m in net.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    momenta = [m.momentum for m in norms]
    for m in norms:
        m.momentum = momentum
    try:
        yield norms
    finally:
        for m, own in zip(norms, momenta):
            m.momentum = own


def recalibrate_bn(net: torch.nn.Module, batches: Iterable[torch.Tensor]) -> None:
    """Precise BatchNorm: every BatchNorm's running mean and variance of ``net`` become the
    plain average over ``batches`` (each float (N, 3, H, W)) seen in training mode, instead of
    the momentum average over the last training steps; ``net`` is left in eval mode."""
    with bn_momentum(net, None) as norms:
        for m in norms:
            m.reset_running_stats()
        net.train()
        for x in batches:
            net(x)
    net.eval()


def frozen_bn_stats(net: torch.nn.Module, frozen: bool = True):
    """While ``frozen``, forward passes of ``net`` in training mode leave its BatchNorm running
    statistics as they are (momentum 0); they still normalise with the batch's own statistics."""
    return bn_momentum(net, 0.0) if frozen else nullcontext()


def _to_tensor(images: np.ndarray, device: torch.device) -> torch.Tensor:
    """uint8 (N, H, W, 3) -> float (N, 3, H, W) in [0, 1], channels-last in memory (as the networks)."""
    x = torch.from_numpy(images).to(device).permute(0, 3, 1, 2).float().div_(255.0)
    return x.contiguous(memory_format=torch.channels_last)


def _instances(out: dict[str, torch.Tensor], cfg: TrainConfig) -> list[np.ndarray]:
    prob, hv = output_maps({k: v.detach() for k, v in out.items()})
    return [instances_from_maps(p, h, cfg.postprocess, mpp=cfg.model_mpp) for p, h in zip(prob.cpu().numpy(), hv.cpu().numpy())]


def validate(net: torch.nn.Module, val, cfg: TrainConfig, device: torch.device) -> dict[str, float]:
    """Mean instance metrics of ``net`` on the validation tiles, whole tiles scored on their own grid."""
    from wsi_ircr.metrics import mean_scores, score_instances

    net.eval()
    predictor = Predictor.from_network(net, cfg.model_mpp, cfg.postprocess, device)
    return mean_scores([score_instances(labels, predictor.segment_image(image, cfg.data.mpp))
                        for image, labels in zip(val.images, val.labels)])


class Trainer:
    """Owns the student, teacher, optimiser and data of one run in ``out_dir``."""

    def __init__(self, cfg: TrainConfig, out_dir: Path, data: TrainData, priors: dict | None, start: Checkpoint | None = None,
                 lineage: dict | None = None):
        """``start``: the checkpoint student and teacher start from (``cfg.init``; None: random
        weights); ``lineage``: what the run started from, saved in every checkpoint's meta."""
        self.cfg, self.out_dir, self.data, self.priors, self.lineage = cfg, out_dir, data, priors, lineage
        self.device = resolve_device(cfg.device)
        torch.manual_seed(cfg.seed)
        self.rng = np.random.default_rng(cfg.seed)
        self.gen = torch.Generator(device="cpu").manual_seed(cfg.seed)
        self.student = build_model(cfg.arch)
        if start is not None:
            self.student = start.build()
        self.student = self.student.to(self.device).to(memory_format=torch.channels_last)  # faster convolutions
        self.teacher = copy.deepcopy(self.student)
        for p in self.teacher.parameters():
            p.requires_grad_(False)
        self.opt = torch.optim.AdamW(self.student.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, lambda step: lr_factor(step, cfg.steps))
        self.labelled = CropSampler(data.labelled, cfg.crop_px, self.rng, scale_jitter=cfg.scale_jitter) if len(data.labelled) else None
        self.unlabelled = (CropSampler(data.unlabelled, cfg.crop_px, self.rng, scale_jitter=cfg.scale_jitter)
                           if len(data.unlabelled) and cfg.semi_supervised else None)
        self.step = 0
        self.miac_scale: float | None = None  # automatic MIAC weight (miac_grad_ratio), None until measured
        self.best = {"aji": -1.0, "step": 0}
        self.history: list[dict] = []
        self.seconds = 0.0  # training seconds of this run's earlier processes (a resumed run adds them up)
        self.since: float | None = None  # when this process started training
        self.amp = native_bf16(self.device) if cfg.bf16 is None else cfg.bf16
        self.anchors = [p.detach().clone() for p in self.student.parameters()] if cfg.anchor_weight > 0 else None  # L2-SP: the start
        self.say: Callable[[str], None] = say_on_stderr  # where progress lines go

    def state(self) -> dict:
        return {
            "step": self.step,
            "optimizer": self.opt.state_dict(),
            "scheduler": self.sched.state_dict(),
            "teacher": self.teacher.state_dict(),
            "best": self.best,
            "history": self.history,
            "rng": json.dumps(self.rng.bit_generator.state),
            "torch_rng": torch.get_rng_state(),
            "gen": self.gen.get_state(),
            "miac_scale": self.miac_scale,
            "seconds": self.elapsed(),
        }

    def load_state(self, ckpt: Checkpoint) -> None:
        s = ckpt.train_state
        self.student.load_state_dict(ckpt.model_state)
        self.teacher.load_state_dict(s["teacher"])
        self.opt.load_state_dict(s["optimizer"])
        self.sched.load_state_dict(s["scheduler"])
        self.step, self.best, self.history = s["step"], s["best"], s["history"]
        self.rng.bit_generator.state = json.loads(s["rng"])
        torch.set_rng_state(s["torch_rng"])
        self.gen.set_state(s["gen"])
        self.miac_scale = s.get("miac_scale")
        self.seconds = float(s.get("seconds", 0.0))

    def elapsed(self) -> float:
        """Training seconds of the run so far, earlier processes included."""
        return self.seconds + (time.time() - self.since if self.since is not None else 0.0)

    def checkpoint(self, net: torch.nn.Module, with_state: bool, metrics: dict | None = None) -> Checkpoint:
        return Checkpoint(
            arch=self.cfg.arch,
            model_state=net.state_dict(),
            mpp=self.cfg.model_mpp,
            postprocess=self.cfg.postprocess,
            priors=self.priors,
            meta={"config": to_dict(self.cfg), "data": self.data.describe(), "sources": self.data.sources, "metrics": metrics,
                  "versions": versions(), **({"lineage": self.lineage} if self.lineage else {})},
            train_state=self.state() if with_state else None,
        )

    def eval_net(self) -> torch.nn.Module:
        """The network to validate and ship: the teacher (EMA of the weights) when trained or asked for."""
        return self.teacher if self.cfg.semi_supervised or self.cfg.ema_weights else self.student

    def supervised_loss(self, batch: dict) -> torch.Tensor:
        from wsi_ircr.train.losses import instance_loss

        x = _to_tensor(batch["image"], self.device)
        if self.cfg.labelled_strength > 0:
            from wsi_ircr.train.augment import strong_view

            x = strong_view(x, self.gen, self.cfg.labelled_strength)
        target_np = torch.from_numpy((batch["labels"] > 0).astype(np.int64)).to(self.device)
        target_hv = torch.from_numpy(batch["hv"]).to(self.device)
        if "valid" not in batch:
            return instance_loss(self.student(x), target_np, target_hv)
        valid = torch.from_numpy(batch["valid"]).to(self.device)
        hv_valid = valid * torch.from_numpy(batch["hv_valid"]).to(self.device)[:, None, None]
        return instance_loss(self.student(x), target_np, target_hv, valid, hv_valid)

    def unsup_weights(self) -> dict[str, float]:
        """Weight x ramp-up of each unsupervised term that is switched on and has started at this
        step; with ``miac_grad_ratio`` MIAC's weight is the last measured automatic one (0 before)."""
        cfg = self.cfg
        ramp = rampup(self.step, cfg.unsup_start_step, cfg.rampup_steps)
        ramps = {"mt": ramp, "miac": rampup(self.step, max(cfg.unsup_start_step, cfg.miac_start_step), cfg.rampup_steps),
                 "piac": ramp}
        weights = {k: w * ramps[k] for k, w in (("mt", cfg.mt_weight), ("miac", cfg.miac_weight), ("piac", cfg.piac_weight))
                   if w > 0 and ramps[k] > 0}
        if "miac" in weights and cfg.miac_grad_ratio > 0:
            weights["miac"] = (self.miac_scale or 0.0) * ramps["miac"]
        return weights

    def unsupervised_loss(self, batch: dict, terms: set[str]) -> dict[str, torch.Tensor]:
        """The unweighted unsupervised ``terms`` (of mt, miac, piac) of one unlabelled batch."""
        from wsi_ircr.train.augment import strong_view, weak_view

        cfg = self.cfg
        x = _to_tensor(batch["image"], self.device)
        with torch.no_grad():
            t_out = self.teacher(weak_view(x, self.gen))
            t_out = {k: v.float() for k, v in t_out.items()}
        with frozen_bn_stats(self.student, cfg.bn_stats == "labelled"):
            s_out = self.student(strong_view(x, self.gen, cfg.strong_strength))
        s_out = {k: v.float() for k, v in s_out.items()}
        parts = {}
        if "mt" in terms:
            from wsi_ircr.train.losses import mean_teacher_loss

            parts["mt"] = mean_teacher_loss(s_out, t_out, cfg.mt_confidence)
        if "miac" in terms or "piac" in terms:
            t_inst = _instances(t_out, cfg)
        if "miac" in terms:
            from wsi_ircr.train.miac import instance_weights, match_instances, matched_masks, miac_loss

            s_inst = _instances(s_out, cfg)
            inside, band = [], []
            for t_lab, s_lab in zip(t_inst, s_inst):
                matches = match_instances(t_lab, s_lab, cfg.miac_max_dist_px)
                i, b = matched_masks(t_lab, s_lab, matches, cfg.miac_band_px)
                inside.append(instance_weights(t_lab, s_lab, matches) if cfg.miac_instance_norm else i)
                band.append(b)
            inside_t = torch.from_numpy(np.stack(inside)).to(self.device)
            band_t = torch.from_numpy(np.stack(band)).to(self.device)
            parts["miac"] = miac_loss(s_out, t_out, inside_t, band_t, cfg.miac_beta, cfg.miac_temperature,
                                      cfg.miac_np, cfg.miac_hv, cfg.miac_confidence)
        if "piac" in terms:
            from wsi_ircr.train.piac import MorphologyPriors, piac_loss, piac_targets, piac_weight_map

            priors = MorphologyPriors.from_dict(self.priors)
            weights = [piac_weight_map(lab, img, priors, cfg.piac_tau, cfg.piac_w_good)[0] for lab, img in zip(t_inst, batch["image"])]
            weight_t = torch.from_numpy(np.stack(weights)).to(self.device)
            if cfg.piac_mode == "pseudo_label":
                from wsi_ircr.train.losses import instance_loss

                targets = [piac_targets(lab, w) for lab, w in zip(t_inst, weights)]
                target_np = torch.from_numpy(np.stack([t[0] for t in targets]).astype(np.int64)).to(self.device)
                target_hv = torch.from_numpy(np.stack([t[1] for t in targets])).to(self.device)
                parts["piac"] = instance_loss(s_out, target_np, target_hv, weight_t)
            else:
                parts["piac"] = piac_loss(s_out, t_out, weight_t)
        return parts

    def measure_miac_scale(self, sup: torch.Tensor, miac: torch.Tensor) -> None:
        """Re-measure MIAC's automatic weight (``miac_grad_ratio``) on this step's graph when due."""
        from wsi_ircr.train.balance import matched_weight

        if self.miac_scale is not None and self.step % self.cfg.miac_scale_every:
            return
        scale = matched_weight(sup, miac, list(self.student.parameters()), self.cfg.miac_grad_ratio)
        if scale is not None:
            self.miac_scale = scale

    def train_step(self) -> dict[str, float]:
        cfg = self.cfg
        self.student.train()
        self.teacher.train()
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.amp):
            sup = (self.supervised_loss(self.labelled.sample(cfg.batch_size)) if self.labelled is not None
                   else torch.zeros((), device=self.device))
            record = {"sup": float(sup.detach())}
            weights = self.unsup_weights() if self.unlabelled is not None else {}
            terms = self.unsupervised_loss(self.unlabelled.sample(cfg.unlabelled_batch_size), set(weights)) if weights else {}
        record.update({k: float(v.detach()) for k, v in terms.items()})
        if "miac" in terms and cfg.miac_grad_ratio > 0:
            self.measure_miac_scale(sup, terms["miac"])
            weights = self.unsup_weights()
            record["miac_scale"] = self.miac_scale or 0.0
        loss = sup
        for name, term in terms.items():
            loss = loss + weights[name] * term
        if self.anchors is not None:
            from wsi_ircr.train.losses import anchor_l2

            anchor = anchor_l2(list(self.student.parameters()), self.anchors)
            record["anchor"] = float(anchor.detach())
            loss = loss + cfg.anchor_weight * anchor
        # loss has no gradient only without labelled tiles before the unsupervised terms start
        optimiser_step(self.opt, self.sched, self.student, loss)
        ema_update(self.teacher, self.student, cfg.ema_alpha)
        self.step += 1
        record["loss"] = float(loss.detach())
        return record

    def run(self, progress: bool = True, stop: Callable[[], bool] | None = None) -> dict:
        """Train to ``cfg.steps``; validate (and save best.pt, last.pt) every ``val_every`` steps and
        save last.pt every ``checkpoint_every``. ``stop``, asked after every step, ends the run
        early with last.pt at that step (``TrainingStopped``)."""
        cfg = self.cfg
        t0 = self.since = time.time()
        start = self.step
        running: dict[str, float] = {}
        while self.step < cfg.steps:
            rec = self.train_step()
            for k, v in rec.items():
                running[k] = running.get(k, 0.0) + v
            if self.step % cfg.log_every == 0 or self.step == cfg.steps:
                n = cfg.log_every if self.step % cfg.log_every == 0 else self.step % cfg.log_every
                means = {k: v / n for k, v in running.items()}
                running = {}
                rate = (self.step - start) / max(time.time() - t0, 1e-9)
                eta = (cfg.steps - self.step) / max(rate, 1e-9)
                if progress:
                    terms = " ".join(f"{k}={v:.4f}" for k, v in means.items())
                    self.say(f"step {self.step}/{cfg.steps} {terms} {rate:.2f} it/s eta {eta / 60:.1f} min")
            if self.step % cfg.val_every == 0 or self.step == cfg.steps:
                self.validate_and_save(progress)
            elif cfg.checkpoint_every and self.step % cfg.checkpoint_every == 0:
                self.save_last()
            if stop is not None and self.step < cfg.steps and stop():
                self.save_last()
                raise TrainingStopped(f"{self.out_dir}: stopped at step {self.step}; last.pt holds it, continue with --resume")
        return self.best

    def save_last(self, metrics: dict | None = None) -> None:
        """last.pt: the student and everything needed to continue from this step."""
        save_checkpoint(self.out_dir / "last.pt", self.checkpoint(self.student, with_state=True, metrics=metrics))

    def recalibrate(self, net: torch.nn.Module) -> None:
        """``bn_recalibrate_crops`` crops of the unlabelled tiles (else the labelled ones), drawn
        with their own seed (seed, step) so the training crops stay the same, re-estimate ``net``'s
        BatchNorm statistics (``recalibrate_bn``)."""
        cfg = self.cfg
        tiles = self.data.unlabelled if len(self.data.unlabelled) else self.data.labelled
        sampler = CropSampler(tiles, cfg.crop_px, np.random.default_rng([cfg.seed, self.step]))
        batch = max(cfg.unlabelled_batch_size, cfg.batch_size)
        sizes = [min(batch, cfg.bn_recalibrate_crops - i) for i in range(0, cfg.bn_recalibrate_crops, batch)]
        recalibrate_bn(net, (_to_tensor(sampler.sample(n)["image"], self.device) for n in sizes))

    def validate_and_save(self, progress: bool) -> None:
        net = self.eval_net()
        if self.cfg.bn_recalibrate_crops:
            self.recalibrate(net)
        metrics = validate(net, self.data.val, self.cfg, self.device) if len(self.data.val) else {}
        entry = {"step": self.step, **{k: float(v) for k, v in metrics.items()}}
        self.history.append(entry)
        if progress and metrics:
            self.say(f"val step {self.step}: AJI {metrics['aji']:.4f} Dice {metrics['dice']:.4f} PQ {metrics['pq']:.4f}")
        by = self.cfg.selection_metric
        improved = not metrics or metrics[by] > self.best.get(by, -1.0)
        if improved:
            self.best = {"aji": float(metrics.get("aji", -1.0)), by: float(metrics.get(by, -1.0)), "step": self.step, "val": entry}
            save_checkpoint(self.out_dir / "best.pt", self.checkpoint(net, with_state=False, metrics={"val": entry}))
        self.save_last({"val": entry})


def fit_priors(data: TrainData) -> dict:
    """PIAC morphology priors fitted on the labelled instance maps (binary-mask tiles left out;
    saved with the checkpoint)."""
    from wsi_ircr.train.piac import MorphologyPriors

    tiles = data.labelled
    keep = [i for i in range(len(tiles)) if not (tiles.binary and tiles.binary[i])]
    return MorphologyPriors.fit([tiles.labels[i] for i in keep], [tiles.images[i] for i in keep]).to_dict()


def start_priors(data: TrainData, start: Checkpoint | None, cfg: TrainConfig) -> dict | None:
    """PIAC's priors: fitted on the labelled instance tiles when there are any, else the
    starting checkpoint's (UserError when PIAC is on and neither has them)."""
    tiles = data.labelled
    if any(not (tiles.binary and tiles.binary[i]) for i in range(len(tiles))):
        return fit_priors(data)
    priors = start.priors if start is not None else None
    if priors is None and cfg.piac_weight > 0:
        where = f"{cfg.init}: this checkpoint carries" if start is not None else "there are"
        raise UserError(f"PIAC (piac_weight > 0) needs morphology priors: {where} none and no labelled instance tiles are given; "
                        "add labelled tiles (--images/--labels) or set piac_weight=0")
    return priors


def method_name(cfg: TrainConfig) -> str:
    """The method a config runs: supervised, mean_teacher, mt_piac, mt_miac, ircr (or the
    terms that are on, joined by +)."""
    if not cfg.semi_supervised:
        return "supervised"
    on = tuple(name for name, w in (("mt", cfg.mt_weight), ("miac", cfg.miac_weight), ("piac", cfg.piac_weight)) if w > 0)
    return {("mt",): "mean_teacher", ("mt", "piac"): "mt_piac", ("mt", "miac"): "mt_miac",
            ("mt", "miac", "piac"): "ircr"}.get(on, "+".join(on))


def inherited_provenance(meta: dict) -> dict:
    """A starting checkpoint's provenance an adapted model keeps: ``data`` (its data note's name,
    licence and citation), ``sources`` and ``lineage``, each only where the checkpoint has it."""
    note = {k: v for k, v in (meta.get("data") or {}).items() if k in ("name", "licence", "citation")}
    kept = {"data": note, "sources": meta.get("sources"), "lineage": meta.get("lineage")}
    return {k: v for k, v in kept.items() if v}


def run_lineage(cfg: TrainConfig, start: Checkpoint, data: TrainData, base_dir: Path) -> dict:
    """What an adapted model came from: the starting model (``bundled:<file>`` or a portable
    path, its hash, and what it was trained on: its data note with licence and citation, its
    ``sources`` and its own lineage, so licences travel down a chain of adaptations), the data
    (counts, slide names, mpp), the steps and the method."""
    from wsi_ircr.model.checkpoint import BUNDLED_NAME, portable_name

    name = f"{BUNDLED_INIT}:{BUNDLED_NAME}" if cfg.init == BUNDLED_INIT else portable_name(init_checkpoint_path(cfg.init, base_dir))
    slides = sorted({stem.split("@")[0] for stem in data.unlabelled.stems if "@" in stem})
    return {
        "init": {"name": name, "hash": start.model_hash, **inherited_provenance(start.meta)},
        "data": {"labelled_tiles": len(data.labelled), "unlabelled_tiles": len(data.unlabelled), "val_tiles": len(data.val),
                 "unlabelled_slides": slides, "tiles_mpp": cfg.data.mpp, "slide_mpp": cfg.data.slide_mpp},
        "steps": cfg.steps,
        "method": method_name(cfg),
    }


def add_slide_tiles(data: TrainData, cfg: TrainConfig, out_dir: Path, base_dir: Path) -> None:
    """Append the tissue tiles of ``cfg.data.unlabelled_slides`` to ``data.unlabelled`` (stores in
    ``out_dir/slides``) and the slides to ``data.sources``; UserError when no unsupervised term would use them."""
    from wsi_ircr.train.provenance import dataset_of
    from wsi_ircr.train.slides import load_slide_tiles

    d = cfg.data
    if not cfg.semi_supervised:
        raise UserError("--unlabelled-slides: no unsupervised term is on (mt_weight, miac_weight and piac_weight are 0), "
                        "so the slides would not be used; pass a semi-supervised config, e.g. configs/train/mean_teacher.yaml")
    if d.slide_tile_px < cfg.crop_px:
        raise UserError(f"data.slide_tile_px={d.slide_tile_px} is smaller than crop_px={cfg.crop_px}; raise it")
    paths = [Path(p) if Path(p).is_absolute() else base_dir / p for p in d.unlabelled_slides]
    tiles = load_slide_tiles(paths, out_dir / SLIDE_STORES, cfg.model_mpp, slide_mpp=d.slide_mpp,
                             tile_px=d.slide_tile_px, max_tiles=d.slide_tiles, seed=d.label_seed)
    data.unlabelled.stems += tiles.stems
    data.unlabelled.images += tiles.images
    for path in paths:  # slides are not hashed (gigabytes each): their names are in data.describe()
        name, licence = dataset_of((path if path.is_dir() else path.parent).resolve())
        data.sources.append({"role": "unlabelled", "dataset": name, "slides": path.name, "licence": licence})


def started_without_checkpoint(cfg: TrainConfig, out_dir: Path) -> bool:
    """True when ``out_dir`` holds a run of ``cfg`` that stopped before its first checkpoint
    (its config.yaml, no last.pt): resuming it means starting at step 0."""
    import yaml

    config = out_dir / "config.yaml"
    if (out_dir / "last.pt").exists() or not config.is_file():
        return False
    try:
        return same_config(yaml.safe_load(config.read_text()), cfg)
    except (OSError, yaml.YAMLError):
        return False


def same_config(saved: dict | None, cfg: TrainConfig) -> bool:
    """Whether a run's saved config (a dict) is ``cfg``; keys added to TrainConfig since the run
    was saved count as their defaults, so older runs still resume."""
    from wsi_ircr.config import from_dict

    if not isinstance(saved, dict):
        return False
    try:
        return to_dict(from_dict(TrainConfig, saved)) == to_dict(cfg)
    except UserError:
        return False


def train(cfg: TrainConfig, out_dir: Path, *, base_dir: Path = Path("."), resume: bool = False, progress: bool = True,
          stop: Callable[[], bool] | None = None, say: Callable[[str], None] = say_on_stderr) -> dict:
    """Train per ``cfg`` into ``out_dir`` (best.pt, last.pt, model.pt, config.yaml, metrics.json).

    ``resume``: continue from last.pt (a run of the same config that stopped before its first
    checkpoint starts over); ``stop``: see ``Trainer.run``; ``say``: where progress lines go.
    """
    import yaml

    from wsi_ircr.io.atomic import atomic_open

    last = out_dir / "last.pt"
    if resume and not last.exists():
        if not started_without_checkpoint(cfg, out_dir):
            raise UserError(f"{out_dir}: nothing to resume (no last.pt); start without --resume")
        if progress:
            say(f"{out_dir}: stopped before its first checkpoint; starting at step 0")
        resume = False
    resolve_device(cfg.device)  # fail before reading the data
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    start = load_checkpoint(init_checkpoint_path(cfg.init, base_dir)) if cfg.init else None
    data = load_train_data(cfg.data, base_dir, cfg.model_mpp)
    out_dir.mkdir(parents=True, exist_ok=True)  # after the tiles are read: bad tile folders leave nothing behind
    if cfg.data.unlabelled_slides:
        add_slide_tiles(data, cfg, out_dir, base_dir)
    if cfg.semi_supervised and not len(data.unlabelled):
        raise UserError("semi-supervised terms are on but there are no unlabelled tiles; set data.unlabelled or data.labelled below the pool size")
    if not len(data.labelled) and not (start is not None and cfg.semi_supervised):
        raise UserError("training data: no labelled tiles; set data.images and data.labels (e.g. --images DIR --labels DIR), "
                        "or start from a model (init) with a semi-supervised config and unlabelled tiles")
    if progress:
        say(f"data: {len(data.labelled)} labelled, {len(data.unlabelled)} unlabelled, {len(data.val)} validation tiles")
    if cfg.anchor_weight > 0 and start is None:
        raise UserError(f"anchor_weight={cfg.anchor_weight:g} pulls the weights towards the starting model, and there is none; "
                        "set init (train --init MODEL) or anchor_weight=0")
    priors = start_priors(data, start, cfg)
    lineage = run_lineage(cfg, start, data, base_dir) if start is not None else None
    trainer = Trainer(cfg, out_dir, data, priors, start, lineage)
    trainer.say = say
    if resume:
        ckpt = load_checkpoint(last)
        if not same_config(ckpt.meta.get("config"), cfg):
            raise UserError(f"{last}: was trained with a different config; resume with the same config and overrides, or use a new --out")
        trainer.load_state(ckpt)
        if progress:
            say(f"resuming from step {trainer.step}")
    with atomic_open(out_dir / "config.yaml") as f:
        yaml.safe_dump(to_dict(cfg), f, sort_keys=False)
    best = trainer.run(progress, stop)
    seconds = trainer.elapsed()
    final = load_checkpoint(out_dir / "best.pt")
    final.meta["metrics"] = {"val": best.get("val"), "train_seconds": seconds, "history": trainer.history}
    if cfg.tune_postprocess and len(data.val):
        from wsi_ircr.train.tune import tune_postprocess

        predictor = Predictor.from_network(final.build().to(trainer.device), cfg.model_mpp, cfg.postprocess, trainer.device)
        final.postprocess, tuned = tune_postprocess(predictor, data.val.images, data.val.labels, cfg.tune_marker_radii,
                                                    mpp=cfg.data.mpp)
        final.meta["metrics"]["val_aji_tuned_postprocess"] = tuned
        best["aji_tuned_postprocess"] = tuned
        if progress:
            say(f"post-processing tuned on validation: AJI {tuned:.4f} with {final.postprocess}")
    final.meta["config"] = portable_meta(final.meta["config"])  # model.pt is shipped: no absolute paths
    save_checkpoint(out_dir / "model.pt", final)
    summary = {"best": best, "train_seconds": seconds, "steps": cfg.steps, "device": str(trainer.device),
               "history": trainer.history, "data": data.describe()}
    with atomic_open(out_dir / "metrics.json") as f:
        json.dump(summary, f, indent=1)
    return summary
