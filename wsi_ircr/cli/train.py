"""``wsi-ircr train``: supervised or semi-supervised IRCR-Net training."""

from __future__ import annotations

from pathlib import Path

import click


@click.command()
@click.option("--config", "config_path", type=click.Path(path_type=Path), help="YAML file (see configs/train/).")
@click.option("--out", "out_dir", required=True, type=click.Path(path_type=Path), help="Run folder: checkpoints, config, metrics.")
@click.option("--images", help="Folder of labelled RGB tiles (overrides data.images).")
@click.option("--labels", help="Folder of instance label maps, same stems (overrides data.labels).")
@click.option("--labels-kind", type=click.Choice(["instances", "binary"]),
              help="binary: --labels are nucleus masks (NP branch only; validation on connected components, best step by Dice).")
@click.option("--unlabelled", help="Folder of unlabelled RGB tiles (overrides data.unlabelled).")
@click.option("--init", "init", metavar="MODEL",
              help="Start student and teacher from this checkpoint ('bundled': the packaged model); it sets arch, mpp, post-processing.")
@click.option("--unlabelled-slides", "unlabelled_slides", multiple=True, metavar="PATH",
              help="Whole slide (or folder of slides) whose tissue feeds unlabelled crops; repeat for more.")
@click.option("--mpp", type=float, help="Level-0 microns per pixel of the --unlabelled-slides (overrides or replaces metadata).")
@click.option("--labelled-fraction", type=float, help="Fraction of the labelled pool that keeps its labels; the rest is unlabelled.")
@click.option("--seed", type=int, help="Random seed (weights, crops, augmentation).")
@click.option("--steps", type=int, help="Number of optimisation steps.")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), help="Where to train (auto: CUDA if available).")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help="Any config key, e.g. --set miac_weight=0 --set data.val=[a,b].")
@click.option("--scheduler", metavar="tcp://HOST:PORT",
              help="Run the training as one task on this Dask cluster's GPU worker (any worker with --device cpu).")
@click.option("--resume", is_flag=True, help="Continue the run in --out from its last.pt.")
@click.option("--overwrite", is_flag=True, help="Start over in an --out folder that already holds a run.")
@click.option("--quiet", is_flag=True, help="No progress on stderr.")
def train(config_path, out_dir, images, labels, labels_kind, unlabelled, init, unlabelled_slides, mpp, labelled_fraction, seed, steps, device,
          overrides, scheduler, resume, overwrite, quiet):
    """Train a model; writes OUT/model.pt (best on validation), best.pt, last.pt and metrics.json.

    \b
    Examples:
      wsi-ircr train --config configs/train/ircr.yaml --out runs/ircr
      wsi-ircr train --config configs/train/ircr.yaml --out runs/ircr --resume
      wsi-ircr train --images tiles/ --labels masks/ --unlabelled more_tiles/ --out runs/mine
      wsi-ircr train --config configs/adapt/mean_teacher.yaml --init runs/mine/model.pt --unlabelled tiles/ --out runs/tuned
      wsi-ircr train --config configs/train/mean_teacher.yaml --images tiles/ --labels masks/ --unlabelled-slides slides/ --out runs/adapted
      wsi-ircr train --config configs/train/ircr.yaml --out /shared/runs/ircr --scheduler tcp://head:8786
    """
    from wsi_ircr.config import resolve_config
    from wsi_ircr.errors import UserError
    from wsi_ircr.train.config import TrainConfig, complete_from_init
    from wsi_ircr.train.loop import train as run_training

    base_dir = config_path.resolve().parent if config_path else Path.cwd()
    explicit = {
        "data.images": images and str(Path(images).resolve()),
        "data.labels": labels and str(Path(labels).resolve()),
        "data.labels_kind": labels_kind,
        "data.unlabelled": unlabelled and str(Path(unlabelled).resolve()),
        "init": init and init_value(init),
        "data.unlabelled_slides": [str(Path(p).absolute()) for p in unlabelled_slides] if unlabelled_slides else None,
        "data.slide_mpp": mpp,
        "data.labelled_fraction": labelled_fraction,
        "seed": seed,
        "steps": steps,
        "device": device,
    }
    cfg = resolve_config(TrainConfig, config_path, overrides, explicit, complete=lambda data: complete_from_init(data, base_dir))
    if mpp is not None and not cfg.data.unlabelled_slides:
        raise UserError(f"--mpp {mpp:g} is the resolution of --unlabelled-slides, and none are given; add them or drop --mpp "
                        "(the network's resolution is --set mpp=...)")
    prepare_out_dir(out_dir, resume, overwrite)
    if scheduler:
        from wsi_ircr.train.remote import train_on_cluster

        summary = train_on_cluster(scheduler, cfg, out_dir, base_dir, resume=resume,
                                   echo=lambda line: quiet or click.echo(line, err=True))
    else:
        summary = run_training(cfg, out_dir, base_dir=base_dir, resume=resume, progress=not quiet)
    val = validated(summary["best"], "no validation tiles: last step")
    click.echo(f"model: {out_dir / 'model.pt'} (step {summary['best']['step']}, {val}, {summary['train_seconds'] / 60:.1f} min)")


def validated(best: dict, without: str) -> str:
    """The kept step's validation scores for the closing line (``without``: no validation tiles)."""
    if best["aji"] < 0:
        return without
    return f"val AJI {best['aji']:.4f}" + (f" Dice {best['dice']:.4f}" if "dice" in best else "")


def init_value(init: str) -> str:
    """``--init``/``--model`` as a config value: ``bundled`` and bundled models' names as they
    are, a path made absolute."""
    from wsi_ircr.model.checkpoint import BUNDLED_MODELS
    from wsi_ircr.train.config import BUNDLED_INIT

    return init if init == BUNDLED_INIT or init in BUNDLED_MODELS else str(Path(init).resolve())


def prepare_out_dir(out_dir: Path, resume: bool, overwrite: bool) -> None:
    """Refuse an --out that is a file or holds a run (unless --resume / --overwrite); with
    --overwrite remove only the run's own files (--out may hold other things)."""
    from wsi_ircr.errors import UserError
    from wsi_ircr.train.loop import RUN_FILES

    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"{out_dir}: exists and is not a folder; pass another --out")
    if (out_dir / "last.pt").exists() and not resume:
        if not overwrite:
            raise UserError(f"{out_dir}: already holds a training run; pass --resume to continue it or --overwrite to start over")
        for name in RUN_FILES:
            (out_dir / name).unlink(missing_ok=True)
