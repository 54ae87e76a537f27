"""``wsi-ircr tile``: tissue mask and zarr tile store only."""

from __future__ import annotations

from pathlib import Path

import click

from wsi_ircr.cli.options import resolve_segment_config, slide_options


@click.command()
@click.argument("slides", nargs=-1, required=True, type=click.Path(path_type=Path))
@slide_options
@click.option("--model", help="Checkpoint whose input mpp sets the tile resolution; default: the bundled model.")
def tile(slides, out_root, config_path, overrides, mpp, core_px, halo_px, no_tissue_mask, overwrite, quiet, model):
    """Write OUT/<stem>/tissue.png and OUT/<stem>/tiles.zarr; a later
    ``wsi-ircr segment`` with the same options reuses the tile store."""
    from wsi_ircr.slide.pipeline import check_distinct_stems, dask_client, model_info, tile_slide

    config = resolve_segment_config(config_path, overrides, mpp=mpp, core_px=core_px, halo_px=halo_px, model=model,
                                    tissue_mask=False if no_tissue_mask else None)
    check_distinct_stems(slides)
    info = model_info(config)
    with dask_client(None, config) as client:
        for slide in slides:
            run = tile_slide(slide, out_root, config, client, info, overwrite=overwrite, progress=not quiet)
            click.echo(f"{slide}: {len(run.plan.tiles)} tiles of {run.plan.grid.tile_px} px -> {run.out_dir / 'tiles.zarr'}")
