"""``wsi-ircr info``: a slide's pyramid, resolution and metadata."""

from __future__ import annotations

from pathlib import Path

import click


def _format_text(d: dict) -> str:
    w, h = d["dimensions_xy"]
    size = f"{w} x {h} px"
    if d["size_mm_xy"] is not None:
        size += f" ({d['size_mm_xy'][0]:.2f} x {d['size_mm_xy'][1]:.2f} mm)"
    if d["mpp"] is None:
        detail = d["mpp_source"].removeprefix("none").removeprefix(": ") or "no metadata"
        mpp = f"unknown ({detail}); pass --mpp"
    else:
        mpp = f"{d['mpp']:.4g} um/px ({d['mpp_source']})"
    objective = "unknown" if d["objective_power"] is None else f"{d['objective_power']:g}x"
    lines = [
        f"slide:       {d['path']}",
        f"vendor:      {d['vendor'] or 'unknown'}",
        f"size:        {size}",
        *([f"bounds:      level-0 (0, 0) is OpenSlide's {tuple(d['bounds_offset_xy'])} (as in QuPath)"]
          if any(d["bounds_offset_xy"]) else []),
        f"mpp:         {mpp}",
        f"objective:   {objective}",
        "levels:",
    ]
    for lv in d["levels"]:
        lw, lh = lv["dimensions_xy"]
        lmpp = "" if lv["mpp"] is None else f"  mpp {lv['mpp']:.4g}"
        lines.append(f"  {lv['level']}: {lw} x {lh}  downsample {lv['downsample']:.4g}{lmpp}")
    lines.append(f"associated:  {', '.join(d['associated_images']) or 'none'}")
    lines.append(f"fingerprint: {d['fingerprint']}")
    return "\n".join(lines)


@click.command()
@click.argument("slide", type=click.Path(path_type=Path))
@click.option("--mpp", type=float, help="Level-0 microns per pixel, overriding the slide's metadata.")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
def info(slide: Path, mpp: float | None, as_json: bool) -> None:
    """Show SLIDE's vendor, pyramid levels (size, downsample, mpp), mpp and where it came
    from, objective power, associated images and content fingerprint.

    \b
    Examples:
      wsi-ircr info slide.svs
      wsi-ircr info slide.tiff --mpp 0.25 --json
    """
    import json

    from wsi_ircr.slide.reader import describe_slide, open_slide

    with open_slide(slide, mpp=mpp) as reader:
        summary = describe_slide(reader)
    click.echo(json.dumps(summary, indent=2) if as_json else _format_text(summary))
