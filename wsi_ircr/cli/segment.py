"""``wsi-ircr segment``: slides in, QuPath nuclei out."""

from __future__ import annotations

from pathlib import Path

import click

from wsi_ircr.cli.options import resolve_segment_config, slide_options


@click.command()
@click.argument("slides", nargs=-1, required=True, type=click.Path(path_type=Path))
@slide_options
@click.option("--model", help="wsi-ircr checkpoint (.pt); default: the bundled model.")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), help="Where the network runs.")
@click.option("--scheduler", metavar="tcp://HOST:PORT", help="Run on an existing Dask cluster instead of this machine.")
@click.option("--workers", type=int, help="Local Dask worker processes (1 = threads in this process).")
def segment(slides, out_root, config_path, overrides, mpp, core_px, halo_px, no_tissue_mask, overwrite, quiet, model,
            device, scheduler, workers):
    """Segment every nucleus of SLIDES (any format OpenSlide reads) into OUT/<stem>/.

    \b
    Writes <stem>.geojson.gz (QuPath detections; drag it onto the slide in QuPath),
    nuclei.csv, overlay.png, tissue.png, summary.json and tiles.zarr. An interrupted run
    resumes when the same command is run again.
    """
    from wsi_ircr.slide.pipeline import check_distinct_stems, dask_client, model_info, segment_slide

    config = resolve_segment_config(
        config_path, overrides, mpp=mpp, core_px=core_px, halo_px=halo_px, model=model, device=device, workers=workers,
        tissue_mask=False if no_tissue_mask else None,
    )
    check_distinct_stems(slides)
    if scheduler is None:  # a remote cluster's workers may have the GPU this machine lacks
        from wsi_ircr.model.inference import resolve_device

        resolve_device(config.device)
    info = model_info(config)
    with dask_client(scheduler, config) as client:
        for slide in slides:
            summary = segment_slide(slide, out_root, config, client, info, overwrite=overwrite, progress=not quiet)
            click.echo(f"{slide}: {summary['nuclei']} nuclei ({summary['nuclei_per_mm2']:.0f}/mm^2 of "
                       f"{summary['tissue_area_mm2']:.2f} mm^2 tissue) in {summary['seconds']['total']:.1f} s -> {summary['out_dir']}/")
