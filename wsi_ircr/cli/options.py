"""Option factories shared by the slide commands, and their config resolution."""

from __future__ import annotations

import functools
from pathlib import Path

import click

from wsi_ircr.model.checkpoint import bundled_names_help

MODEL_HELP = f"A bundled model by name, {bundled_names_help()}, or a wsi-ircr checkpoint (.pt)."


def slide_options(func):
    """Options common to ``segment`` and ``tile``: inputs, output, config, resolution, tiling."""
    options = [
        click.argument("slides", nargs=-1, type=click.Path(path_type=Path)),
        click.option("--list", "list_file", type=click.Path(path_type=Path),
                     help="Text file with one slide path per line (relative paths: from the file's folder)."),
        click.option("-o", "--out", "out_root", type=click.Path(path_type=Path), default=Path("out"), show_default=True,
                     help="Output root; results go to OUT/<slide stem>/."),
        click.option("--config", "config_path", type=click.Path(path_type=Path),
                     help="YAML config (defaults: configs/segment/default.yaml)."),
        click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help="Any config key, e.g. --set batch_tiles=4."),
        click.option("--mpp", type=float, help="Level-0 microns per pixel; overrides (or replaces missing) slide metadata."),
        click.option("--core-px", type=int, help="Tile core size in model pixels (multiple of 16)."),
        click.option("--halo", "halo_px", type=int, help="Tile halo in model pixels; must exceed the largest nucleus."),
        click.option("--no-tissue-mask", is_flag=True, help="Process every tile, not only tissue."),
        click.option("--model", help=MODEL_HELP),
        click.option("--overwrite", is_flag=True,
                     help="Redo finished runs and replace mismatching ones (a matching tile store is reused)."),
        click.option("--quiet", is_flag=True, help="No progress on stderr (errors and warnings only)."),
    ]
    for option in reversed(options):
        func = option(func)
    return func


def precision_option(func):
    """``--precision auto|fp32|bf16|int8`` (None when not given), with ``--fp32`` / ``--bf16`` as
    short forms; two different choices are a ``UserError``."""
    from wsi_ircr.model.precision import PRECISIONS

    @functools.wraps(func)
    def wrapper(*args, precision, fp32, bf16, **kwargs):
        chosen = {p for p in (precision, "fp32" if fp32 else None, "bf16" if bf16 else None) if p}
        if len(chosen) > 1:
            from wsi_ircr.errors import UserError

            raise UserError(f"conflicting precisions ({', '.join(sorted(chosen))}): pass one of --precision, --fp32, --bf16")
        return func(*args, precision=chosen.pop() if chosen else None, **kwargs)

    options = [
        click.option("--precision", type=click.Choice(PRECISIONS),
                     help="The network's arithmetic (default auto: the fastest the model proves accurate here; without "
                          "a record, bf16 where native (CUDA, AVX512-BF16 / AMX CPUs), else fp32). "
                          "int8: CPU, pip install \"wsi-ircr[cpu-fast]\"."),
        click.option("--fp32", is_flag=True, help="Same as --precision fp32."),
        click.option("--bf16", is_flag=True, help="Same as --precision bf16."),
    ]
    for option in reversed(options):
        wrapper = option(wrapper)
    return wrapper


def resolve_segment_config(config_path, overrides, **explicit):
    """SegmentConfig: explicit options (None = not given) > ``--set`` > YAML > defaults."""
    from wsi_ircr.config import resolve_config
    from wsi_ircr.slide.config import SegmentConfig

    return resolve_config(SegmentConfig, config_path, overrides, explicit)
