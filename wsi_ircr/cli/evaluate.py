"""``wsi-ircr evaluate``: score a model on a folder of labelled tiles."""

from __future__ import annotations

from pathlib import Path

import click


@click.command()
@click.option("--images", "images_dir", required=True, type=click.Path(path_type=Path), help="Folder of RGB tiles (.png .tif .tiff .jpg .jpeg) at the model's mpp.")
@click.option("--labels", "labels_dir", required=True, type=click.Path(path_type=Path), help="Folder of instance label maps with the same stems (.png .tif .tiff .npy; 0 = background).")
@click.option("--model", "model_path", type=click.Path(path_type=Path), help="wsi-ircr checkpoint (.pt); default: the bundled model.")
@click.option("--save-predictions", "save_dir", type=click.Path(path_type=Path), help="Folder for the predicted instance maps (uint16 PNG, same stems).")
@click.option("--json", "json_path", type=click.Path(path_type=Path), help="Write the mean and per-image scores and the model's path and hash to this JSON file.")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True, help="Where to run the model (auto: CUDA if available).")
@click.option("--quiet", is_flag=True, help="No progress on stderr.")
def evaluate(images_dir, labels_dir, model_path, save_dir, json_path, device, quiet):
    """Segment labelled tiles and report AJI, Dice, PQ, DQ, SQ and object F1 (IoU > 0.5).

    Prints one row per image and the mean over images. Images are segmented as they
    are, so they must be at the model's resolution (0.25 um/px for the bundled model).

    \b
    Examples:
      wsi-ircr evaluate --images tiles/ --labels masks/
      wsi-ircr evaluate --images tiles/ --labels masks/ --model runs/ircr/model.pt --json scores.json
    """
    import json

    from wsi_ircr.errors import UserError
    from wsi_ircr.evaluate import evaluate_folder, format_table
    from wsi_ircr.io.atomic import atomic_open
    from wsi_ircr.io.images import pair_folders
    from wsi_ircr.model.checkpoint import load_checkpoint
    from wsi_ircr.model.inference import Predictor

    pairs = pair_folders(images_dir, labels_dir)
    if json_path is not None and json_path.is_dir():
        raise UserError(f"--json {json_path}: is a folder; pass a file name such as scores.json")
    checkpoint = load_checkpoint(model_path)
    predictor = Predictor(checkpoint, device=device)

    def report(line: str) -> None:
        click.echo(line, err=True)

    if not quiet:
        report(f"model {checkpoint.path} ({checkpoint.model_hash}, {checkpoint.mpp} um/px) on {predictor.device}; {len(pairs)} image(s)")
    result = evaluate_folder(predictor, pairs, save_dir=save_dir, progress=None if quiet else report)
    click.echo(format_table(result))
    if json_path is not None:
        with atomic_open(json_path, "w") as f:
            json.dump(result, f, indent=2)
            f.write("\n")
