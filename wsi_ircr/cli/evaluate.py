"""``wsi-ircr evaluate``: score a model on a folder of labelled tiles."""

from __future__ import annotations

from pathlib import Path

import click

from wsi_ircr.cli.options import MODEL_HELP, precision_option


@click.command()
@click.option("--images", "images_dir", required=True, type=click.Path(path_type=Path), help="Folder of RGB tiles (.png .tif .tiff .jpg .jpeg) at the model's mpp.")
@click.option("--labels", "labels_dir", required=True, type=click.Path(path_type=Path), help="Folder of instance label maps with the same stems (.png .tif .tiff .npy; 0 = background).")
@click.option("--model", "model_path", help=MODEL_HELP)
@click.option("--save-predictions", "save_dir", type=click.Path(path_type=Path), help="Folder for the predicted instance maps (uint16 PNG, same stems).")
@click.option("--json", "json_path", type=click.Path(path_type=Path), help="Write the mean and per-image scores and the model's path and hash to this JSON file.")
@click.option("--mpp", type=float, help="Resolution of the tiles in um/px (default: the model's). Tiles are resampled to the model's mpp and scored on their own grid.")
@click.option("--tta", type=click.Choice(["1", "2", "4", "8"]), default="1", show_default=True, help="Test-time augmentation: average the maps over this many flips / transposes (cost grows in proportion).")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True, help="Where to run the model (auto: CUDA if available).")
@precision_option
@click.option("--engine", type=click.Choice(["auto", "torch", "onnxruntime", "openvino"]), default="auto", show_default=True,
              help="What runs the network (onnxruntime / openvino: CPU, fp32 or int8, pip install \"wsi-ircr[cpu-fast]\"; auto: one of them where installed, else torch).")
@click.option("--quiet", is_flag=True, help="No progress on stderr.")
def evaluate(images_dir, labels_dir, model_path, save_dir, json_path, mpp, tta, device, precision, engine, quiet):
    """Segment labelled tiles and report AJI, Dice, PQ, DQ, SQ and object F1 (IoU > 0.5).

    Prints one row per image and the mean over images. Tiles at another resolution than
    the model's (``--mpp``, e.g. 0.5 for 20x tiles) are resampled to it, and predictions
    come back to the tiles' grid, so scores are always at the labels' resolution.

    \b
    Examples:
      wsi-ircr evaluate --images tiles/ --labels masks/
      wsi-ircr evaluate --images tiles/ --labels masks/ --model runs/ircr/model.pt --json scores.json
      wsi-ircr evaluate --images tiles_20x/ --labels masks_20x/ --mpp 0.5
    """
    import json

    from wsi_ircr.errors import UserError
    from wsi_ircr.evaluate import evaluate_folder, format_table
    from wsi_ircr.io.atomic import atomic_open
    from wsi_ircr.io.images import pair_folders
    from wsi_ircr.model.checkpoint import load_checkpoint
    from wsi_ircr.model.inference import Predictor

    if mpp is not None and not 0 < mpp <= 10:
        raise UserError(f"--mpp {mpp}: expected the tiles' resolution in um per pixel, above 0 and at most 10 (0.25 at 40x, 0.5 at 20x)")
    pairs = pair_folders(images_dir, labels_dir)
    if json_path is not None and json_path.is_dir():
        raise UserError(f"--json {json_path}: is a folder; pass a file name such as scores.json")
    checkpoint = load_checkpoint(model_path)
    predictor = Predictor(checkpoint, device=device, tta=int(tta), precision=precision or "auto", engine=engine)

    def report(line: str) -> None:
        click.echo(line, err=True)

    if not quiet:
        tiles = f"tiles at {mpp} um/px" if mpp is not None else "tiles at the model's mpp"
        report(f"model {checkpoint.path} ({checkpoint.model_hash}, {checkpoint.mpp} um/px) on {predictor.device} ({predictor.precision}, {predictor.engine}); {len(pairs)} image(s), {tiles}")
    result = evaluate_folder(predictor, pairs, save_dir=save_dir, progress=None if quiet else report, mpp=mpp)
    result["tta"] = int(tta)
    result["precision"], result["engine"] = predictor.precision, predictor.engine
    click.echo(format_table(result))
    if json_path is not None:
        with atomic_open(json_path, "w") as f:
            json.dump(result, f, indent=2)
            f.write("\n")
