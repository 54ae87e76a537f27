"""``wsi-ircr adapt``: fine-tune a model (the bundled one by default) on your own cohort."""

from __future__ import annotations

from pathlib import Path

import click

METHODS = ("ircr", "mt_piac", "mean_teacher", "supervised")
LABELS_KINDS = ("instances", "binary")


@click.command()
@click.option("--out", "out_dir", required=True, type=click.Path(path_type=Path), help="Run folder: model.pt, last.pt, metrics.json.")
@click.option("--unlabelled-slides", "unlabelled_slides", multiple=True, metavar="PATH",
              help="Whole slide (or folder of slides) whose tissue feeds unlabelled crops; repeat for more.")
@click.option("--slide-mpp", type=float, help="Level-0 um/px of the --unlabelled-slides (overrides or replaces their metadata).")
@click.option("--unlabelled", "unlabelled_dir", type=click.Path(path_type=Path), help="Folder of unlabelled RGB tiles (needs --mpp).")
@click.option("--images", "images_dir", type=click.Path(path_type=Path), help="Folder of labelled RGB tiles, if you have a few (needs --labels, --mpp).")
@click.option("--labels", "labels_dir", type=click.Path(path_type=Path),
              help="Folder of their label maps, same stems: instance maps, or nucleus masks with --labels-kind binary.")
@click.option("--labels-kind", type=click.Choice(LABELS_KINDS),
              help="instances (default) or binary: masks train only the nucleus-probability branch, validation tiles "
                   "are scored on their connected components (touching nuclei merge) and the kept step is chosen by Dice.")
@click.option("--mpp", type=float, help="um/px of the --unlabelled and --images tiles (0.25 at 40x, 0.5 at 20x).")
@click.option("--model", "model", metavar="MODEL", default="bundled", show_default=True,
              help="Checkpoint to start from; it sets the architecture, mpp and post-processing.")
@click.option("--method", type=click.Choice(METHODS),
              help="ircr (Mean Teacher + MIAC + PIAC), mt_piac (Mean Teacher + PIAC, IRCR without MIAC: two thirds "
                   "of its cost), mean_teacher, or supervised (the labelled tiles only); "
                   "default: ircr (what won on validation, benchmarks/adapt.md), or mean_teacher when --model carries "
                   "no morphology priors for PIAC and no labelled instance tiles are given.")
@click.option("--steps", type=int, help="Optimisation steps (default: the method's config, sized for ~30 min on 2 CPU cores).")
@click.option("--seed", type=int, help="Random seed (crops, augmentation, which slide tiles).")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), help="Where to train (auto: CUDA if available).")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help="Any training config key, e.g. --set lr=0.0002.")
@click.option("--resume", is_flag=True, help="Continue the run in --out from its last.pt.")
@click.option("--overwrite", is_flag=True, help="Start over in an --out folder that already holds a run.")
@click.option("--quiet", is_flag=True, help="No progress on stderr.")
def adapt(out_dir, unlabelled_slides, slide_mpp, unlabelled_dir, images_dir, labels_dir, labels_kind, mpp, model, method, steps, seed,
          device, overrides, resume, overwrite, quiet):
    """Adapt a model to your slides: student and teacher start from --model and learn from
    unlabelled tissue of your cohort (and a few labelled tiles, if you have them).

    Writes OUT/model.pt for 'segment --model' and 'evaluate --model'; its metadata records the
    starting model's hash, the data, the steps and the method. Without labelled validation tiles
    the teacher (EMA of the weights) at the last step is kept.

    \b
    Examples:
      wsi-ircr adapt --unlabelled-slides cohort/ --out runs/adapted
      wsi-ircr adapt --unlabelled tiles/ --mpp 0.25 --out runs/adapted
      wsi-ircr adapt --unlabelled tiles/ --images few/ --labels few_masks/ --mpp 0.5 --method ircr --out runs/adapted
      wsi-ircr segment cohort/slide1.svs --model runs/adapted/model.pt --out results/
    """
    from wsi_ircr.cli.train import init_value, prepare_out_dir, validated
    from wsi_ircr.config import resolve_config
    from wsi_ircr.errors import UserError
    from wsi_ircr.train.config import TrainConfig, adapt_config_path, complete_from_init
    from wsi_ircr.train.loop import train as run_training

    if method is None:
        method, why = default_method(model, images_dir is not None and labels_kind != "binary")
        if why:
            click.echo(why, err=True)
    check_inputs(unlabelled_slides, unlabelled_dir, images_dir, labels_dir, mpp, method, labels_kind)
    base_dir = Path.cwd()
    explicit = {
        "init": init_value(model),
        "data.images": images_dir and str(images_dir.resolve()),
        "data.labels": labels_dir and str(labels_dir.resolve()),
        "data.labels_kind": labels_kind,
        "data.unlabelled": unlabelled_dir and str(unlabelled_dir.resolve()),
        "data.unlabelled_slides": [str(Path(p).absolute()) for p in unlabelled_slides] if unlabelled_slides else None,
        "data.slide_mpp": slide_mpp,
        "data.mpp": mpp,
        "steps": steps,
        "seed": seed,
        "device": device,
    }
    cfg = resolve_config(TrainConfig, adapt_config_path(method), overrides, explicit,
                         complete=lambda data: complete_from_init(data, base_dir))
    if method != "supervised" and not cfg.semi_supervised:
        raise UserError(f"--method {method}: the --set overrides switch every unsupervised term off; use --method supervised")
    prepare_out_dir(out_dir, resume, overwrite)
    summary = run_training(cfg, out_dir, base_dir=base_dir, resume=resume, progress=not quiet)
    val = validated(summary["best"], "no validation tiles: the last step")
    click.echo(f"model: {out_dir / 'model.pt'} ({method} from {model}, step {summary['best']['step']}, {val}, "
               f"{summary['train_seconds'] / 60:.1f} min)")


def default_method(model: str, instance_labels: bool) -> tuple[str, str | None]:
    """The method that won on the study's validation tiles, IRCR, when PIAC has morphology priors
    (from ``instance_labels`` tiles or the ``model`` checkpoint); else Mean Teacher, with the
    one-line reason to show."""
    from wsi_ircr.model.checkpoint import load_checkpoint
    from wsi_ircr.train.config import init_checkpoint_path

    if instance_labels or load_checkpoint(init_checkpoint_path(model, Path.cwd())).priors is not None:
        return "ircr", None
    return "mean_teacher", (f"--model {model} carries no morphology priors for PIAC and no labelled instance tiles are given: "
                            "adapting with --method mean_teacher")


def check_inputs(unlabelled_slides, unlabelled_dir, images_dir, labels_dir, mpp, method, labels_kind=None) -> None:
    """One-line UserErrors for missing or inconsistent inputs, before anything is written."""
    from wsi_ircr.errors import UserError

    if method == "supervised":
        if images_dir is None:
            raise UserError("--method supervised needs labelled tiles: pass --images DIR --labels DIR --mpp X")
    elif not unlabelled_slides and unlabelled_dir is None:
        raise UserError("no unlabelled input: pass --unlabelled-slides PATH (slides or folders of slides) "
                        "or --unlabelled DIR --mpp X (a folder of RGB tiles)")
    if (images_dir is None) != (labels_dir is None):
        raise UserError("--images and --labels go together: pass both folders (tiles and their instance maps) or neither")
    if labels_kind is not None and labels_dir is None:
        raise UserError(f"--labels-kind {labels_kind} describes --labels, and none are given; pass --images DIR --labels DIR or drop it")
    for option, folder in (("--unlabelled", unlabelled_dir), ("--images", images_dir), ("--labels", labels_dir)):
        if folder is not None and not folder.is_dir():
            raise UserError(f"{option} {folder}: not a folder; pass a folder of tiles")
    tiles = unlabelled_dir is not None or images_dir is not None
    if tiles and mpp is None:
        raise UserError("--mpp is required with --unlabelled/--images: the tiles' um/px (0.25 at 40x, 0.5 at 20x), "
                        "so they are resampled to the model's resolution")
    if mpp is not None and not tiles:
        raise UserError(f"--mpp {mpp:g} is the resolution of --unlabelled/--images tiles, and none are given; "
                        "for slides without mpp metadata use --slide-mpp")
    if mpp is not None and not 0 < mpp <= 10:
        raise UserError(f"--mpp {mpp:g}: expected the tiles' um/px, above 0 and at most 10 (0.25 at 40x, 0.5 at 20x)")
