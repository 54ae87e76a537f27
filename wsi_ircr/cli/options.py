"""Option factories shared by the slide commands, and config resolution from them."""

from __future__ import annotations

from pathlib import Path

import click


def slide_options(func):
    """Options common to ``segment`` and ``tile``: config, output, resolution, tiling."""
    options = [
        click.option("-o", "--out", "out_root", type=click.Path(path_type=Path), default=Path("out"), show_default=True,
                     help="Output root; results go to OUT/<slide stem>/."),
        click.option("--config", "config_path", type=click.Path(path_type=Path),
                     help="YAML config (see configs/segment/default.yaml)."),
        click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help="Any config key, e.g. --set batch_tiles=4."),
        click.option("--mpp", type=float, help="Level-0 microns per pixel; overrides (or replaces missing) slide metadata."),
        click.option("--core-px", type=int, help="Tile core size in model pixels (multiple of 16)."),
        click.option("--halo", "halo_px", type=int, help="Tile halo in model pixels; must exceed the largest nucleus."),
        click.option("--no-tissue-mask", is_flag=True, help="Process every tile, not only tissue."),
        click.option("--overwrite", is_flag=True, help="Replace an existing run folder."),
        click.option("--quiet", is_flag=True, help="No progress on stderr."),
    ]
    for option in reversed(options):
        func = option(func)
    return func


def resolve_segment_config(config_path, overrides, **cli_values):
    """SegmentConfig from the YAML file, then ``--set`` items, then the explicit options."""
    from wsi_ircr.config import apply_overrides, from_dict, read_yaml
    from wsi_ircr.slide.config import SegmentConfig

    data = read_yaml(config_path) if config_path else {}
    data = apply_overrides(data, list(overrides))
    for key, value in cli_values.items():
        if value is not None:
            data[key] = value
    return from_dict(SegmentConfig, data, str(config_path or "segment config"))
