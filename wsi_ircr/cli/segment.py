"""``wsi-ircr segment``: slides in, QuPath nuclei out; one slide or a cohort."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from wsi_ircr.cli.options import precision_option, resolve_segment_config, slide_options


@click.command()
@slide_options
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), help="Where the network runs.")
@click.option("--tta", type=click.Choice(["1", "2", "4", "8"]), help="Average the network over this many flips / transposes of each tile.")
@precision_option
@click.option("--workers", type=int, help="Local Dask worker processes (1 = threads in this process).")
@click.option("--scheduler", metavar="tcp://HOST:PORT", help="Run on an existing Dask cluster.")
@click.option("--cluster", metavar="NAME", default="local", show_default=True,
              help="Where workers start: local (this machine) or slurm (SLURM jobs through dask-jobqueue, "
                   "pip install \"wsi-ircr[cluster]\"); the backends of wsi_ircr.slide.cluster.BACKENDS.")
@click.option("--cluster-config", type=click.Path(path_type=Path),
              help="SLURM settings (default: configs/cluster/slurm.yaml).")
@click.option("--outputs", metavar="FORMATS",
              help="Nuclei files, comma-separated: geojson (QuPath), csv (nuclei.csv), parquet (GeoParquet "
                   "nuclei.parquet; pip install \"wsi-ircr[parquet]\"). Default: geojson,csv.")
@click.option("--cells", "cells_um", type=float, metavar="DISTANCE_UM",
              help="Write QuPath cells: each nucleus grown by up to DISTANCE_UM um without crossing its neighbours' "
                   "cells, with cell and cytoplasm measurements (default 0 = nuclei only).")
@click.option("--roi", type=click.Path(path_type=Path), metavar="GEOJSON",
              help="Segment only inside these regions: annotations exported from QuPath as GeoJSON (one slide).")
@click.option("--min-area-um2", type=float, help="Leave out nuclei smaller than this (um^2; default 0 = keep all).")
@click.option("--min-score", type=float, help="Leave out nuclei whose score (mean nucleus probability) is lower.")
@click.option("--scratch", "scratch_dir", metavar="DIR",
              help="Keep the tile stores on node-local disk DIR instead of OUT/<stem>/ (a cache, removed when the "
                   "slide ends); $VARS are expanded on each worker: quote them, e.g. --scratch '$TMPDIR'.")
def segment(slides, list_file, out_root, config_path, overrides, mpp, core_px, halo_px, no_tissue_mask, model,
            overwrite, quiet, device, tta, precision, workers, scheduler, cluster, cluster_config, outputs, cells_um,
            roi, min_area_um2, min_score, scratch_dir):
    """Segment every nucleus of SLIDES (files, or folders of slides OpenSlide reads) into
    OUT/<stem>/, as one task graph over all slides.

    \b
    Writes <stem>.geojson.gz (QuPath detections; drag it onto the slide in QuPath) and
    nuclei.csv (--outputs: also nuclei.parquet, GeoParquet), overlay.png, tissue.png, summary.json and tiles.zarr per slide, and
    OUT/cohort.csv (one row per slide ever run into OUT). A slide that fails is recorded
    and the others go on; exit status 0 when every slide is done, 1 when one failed. The
    same command again skips finished slides and resumes unfinished ones.

    \b
    Examples:
      wsi-ircr segment slide.svs -o out/
      wsi-ircr segment slides/ --list more.txt -o out/ --scheduler tcp://head:8786 --device cuda
      wsi-ircr segment slides/ -o out/ --cluster slurm --cluster-config my_slurm.yaml --scratch '$TMPDIR'
    """
    from wsi_ircr.errors import UserError
    from wsi_ircr.progress import CohortProgress, note
    from wsi_ircr.slide.cluster import backend_for, open_cluster
    from wsi_ircr.slide.cohort import segment_slides
    from wsi_ircr.slide.inputs import collect_slides
    from wsi_ircr.slide.memory import limit_malloc_arenas
    from wsi_ircr.slide.pipeline import check_settings, model_info

    limit_malloc_arenas()  # before any worker thread: this process hosts the local worker's threads

    config = resolve_segment_config(
        config_path, overrides, mpp=mpp, core_px=core_px, halo_px=halo_px, model=model, device=device, workers=workers,
        tissue_mask=False if no_tissue_mask else None, tta=None if tta is None else int(tta), precision=precision,
        outputs=None if outputs is None else tuple(filter(None, (o.strip() for o in outputs.split(",")))),
        min_area_um2=min_area_um2, min_score=min_score, roi=None if roi is None else str(roi),
        cells_um=cells_um, scratch_dir=scratch_dir,
    )
    paths = collect_slides(slides, list_file)
    if config.roi and len(paths) > 1:
        raise UserError(f"--roi {config.roi}: regions belong to one slide, but {len(paths)} slides were given; "
                        "run one command per slide")
    backend = backend_for(config, scheduler, cluster, cluster_config)
    info = model_info(config)
    check_settings(config, info)

    def echo(line: str, is_error: bool) -> None:
        if quiet and not is_error:
            return
        if sys.stderr.isatty():
            note(line)  # above the progress bars
        else:
            click.echo(line, err=True)

    with open_cluster(config, backend, info, preload=True) as (client, plan):
        with CohortProgress(len(paths), enabled=not quiet) as progress:
            report = segment_slides(paths, out_root, config, client, info, overwrite=overwrite, progress=progress,
                                    echo=echo, plan=plan)
    click.echo(report.line)
    if report.failed:
        sys.exit(1)
