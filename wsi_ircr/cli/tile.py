"""``wsi-ircr tile``: tissue mask and zarr tile store only."""

from __future__ import annotations

import click

from wsi_ircr.cli.options import resolve_segment_config, slide_options


@click.command()
@slide_options
def tile(slides, list_file, out_root, config_path, overrides, mpp, core_px, halo_px, no_tissue_mask, model, overwrite,
         quiet):
    """Write OUT/<stem>/tissue.png and OUT/<stem>/tiles.zarr for SLIDES (files or folders);
    a later ``wsi-ircr segment`` with the same options reuses the tile store."""
    from wsi_ircr.slide.cluster import local_client
    from wsi_ircr.slide.inputs import collect_slides
    from wsi_ircr.slide.pipeline import model_info, tile_slide

    config = resolve_segment_config(config_path, overrides, mpp=mpp, core_px=core_px, halo_px=halo_px, model=model,
                                    tissue_mask=False if no_tissue_mask else None)
    paths = collect_slides(slides, list_file)
    info = model_info(config)
    with local_client(config) as client:
        for slide in paths:
            folder, plan = tile_slide(slide, out_root, config, client, info, overwrite=overwrite)
            click.echo(f"{slide}: {len(plan.tiles)} tiles of {plan.grid.tile_px} px -> {folder.store_path}")
