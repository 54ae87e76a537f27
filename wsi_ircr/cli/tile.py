"""``wsi-ircr tile``: tissue mask and zarr tile store only."""

from __future__ import annotations

import sys

import click

from wsi_ircr.cli.options import resolve_segment_config, slide_options


@click.command()
@slide_options
@click.option("--scheduler", metavar="tcp://HOST:PORT", help="Read the tiles on an existing Dask cluster.")
def tile(slides, list_file, out_root, config_path, overrides, mpp, core_px, halo_px, no_tissue_mask, model, overwrite,
         quiet, scheduler):
    """Write OUT/<stem>/tissue.png and OUT/<stem>/tiles.zarr for SLIDES (files or folders);
    a later ``wsi-ircr segment`` with the same options reuses the tile store. A slide that
    fails is reported and the others go on (exit status 1)."""
    from wsi_ircr.slide.cluster import backend_for, open_cluster
    from wsi_ircr.slide.cohort import error_text
    from wsi_ircr.slide.inputs import collect_slides
    from wsi_ircr.slide.pipeline import check_settings, model_info, tile_slide

    config = resolve_segment_config(config_path, overrides, mpp=mpp, core_px=core_px, halo_px=halo_px, model=model,
                                    tissue_mask=False if no_tissue_mask else None)
    paths = collect_slides(slides, list_file)
    info = model_info(config)
    check_settings(config, info)
    failed = 0
    with open_cluster(config, backend_for(config, scheduler), info) as (client, _plan):
        for slide in paths:
            try:
                folder, plan = tile_slide(slide, out_root, config, client, info, overwrite=overwrite)
            except Exception as e:  # noqa: BLE001 - any slide may fail alone, as in segment
                failed += 1
                click.echo(f"error: {error_text(slide, e)}", err=True)
                continue
            if not quiet:
                click.echo(f"{slide}: {len(plan.tiles)} tiles of {plan.grid.tile_px} px -> {folder.store_path}", err=True)
    click.echo(f"{len(paths) - failed} of {len(paths)} slides tiled" + (f", {failed} failed" if failed else ""))
    if failed:
        sys.exit(1)
