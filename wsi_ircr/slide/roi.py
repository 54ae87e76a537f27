"""Regions of interest from QuPath: ``--roi annotations.geojson`` restricts a slide's work to them.

The file is what QuPath exports for selected annotations (*File > Export objects as
GeoJSON*): a FeatureCollection, a list of Features or one Feature, each a Polygon or
MultiPolygon in level-0 (x, y) pixels (the coordinates wsi-ircr writes). Tiles are planned
on the regions instead of the tissue mask, and a nucleus belongs to a region when its
centroid lies inside it; ``summary.json`` reports area, nuclei and density per region.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import shapely
from shapely.geometry import MultiPolygon, Polygon, shape

from wsi_ircr.errors import UserError

EDGE_TOLERANCE_PX = 1.0  # a region may overrun the slide's edge by this much (QuPath's rounding)


@dataclass
class Regions:
    """Named regions in level-0 (x, y) pixels, and the nuclei counted in each so far."""

    names: list[str]
    polygons: list[Polygon | MultiPolygon]
    counts: np.ndarray = field(default=None)

    def __post_init__(self):
        self.counts = np.zeros(len(self.names), np.int64)
        self._union = shapely.union_all(self.polygons)
        shapely.prepare(self._union)
        for p in self.polygons:
            shapely.prepare(p)

    def inside(self, centroids_xy: np.ndarray) -> np.ndarray:
        """bool (n,): the centroids (float (n, 2) level-0 x, y) inside any region."""
        return shapely.contains_xy(self._union, centroids_xy[:, 0], centroids_xy[:, 1])

    def count(self, centroids_xy: np.ndarray) -> None:
        """Add the nuclei at ``centroids_xy`` to the counts of the regions holding them."""
        for i, polygon in enumerate(self.polygons):
            self.counts[i] += int(shapely.contains_xy(polygon, centroids_xy[:, 0], centroids_xy[:, 1]).sum())

    def mask(self, shape_rc: tuple[int, int], mask_mpp: float, slide_mpp: float) -> np.ndarray:
        """bool (H, W) at ``mask_mpp``: the pixels a region touches."""
        from PIL import Image, ImageDraw

        scale = slide_mpp / mask_mpp
        image = Image.new("1", (shape_rc[1], shape_rc[0]), 0)
        draw = ImageDraw.Draw(image)
        for polygon in self.polygons:
            for part in shapely.get_parts(polygon):
                draw.polygon([tuple(p) for p in np.asarray(part.exterior.coords) * scale], fill=1, outline=1)
                for hole in part.interiors:
                    draw.polygon([tuple(p) for p in np.asarray(hole.coords) * scale], fill=0)
        return np.asarray(image, dtype=bool)

    def report(self, slide_mpp: float) -> list[dict]:
        """``summary.json``'s ``regions``: name, area (mm^2), nuclei, nuclei per mm^2."""
        out = []
        for name, polygon, n in zip(self.names, self.polygons, self.counts):
            area = polygon.area * (slide_mpp / 1000.0) ** 2
            out.append({"name": name, "area_mm2": area, "nuclei": int(n), "nuclei_per_mm2": n / area if area else 0.0})
        return out


def _features(data, path: Path) -> list[dict]:
    if isinstance(data, dict) and data.get("type") == "FeatureCollection":
        return list(data.get("features") or [])
    if isinstance(data, dict) and data.get("type") == "Feature":
        return [data]
    if isinstance(data, list) and all(isinstance(f, dict) for f in data):
        return data
    raise UserError(f"--roi {path}: not a GeoJSON Feature, list of Features or FeatureCollection; export the "
                    "annotations from QuPath with File > Export objects as GeoJSON")


def _name(feature: dict, index: int) -> str:
    properties = feature.get("properties") or {}
    classification = properties.get("classification") or {}
    return str(properties.get("name") or classification.get("name") or f"region {index + 1}")


def load_regions(path: str | Path, dimensions_xy: tuple[int, int]) -> Regions:
    """The polygon regions of a QuPath GeoJSON export, checked against the slide's level-0
    size; a file that is not GeoJSON, a region that is not a polygon, is empty or lies
    outside the slide is a one-line UserError."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise UserError(f"--roi {path}: file not found; pass the GeoJSON QuPath exported for the annotations") from None
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise UserError(f"--roi {path}: not a readable GeoJSON file ({type(e).__name__}); export the annotations from "
                        "QuPath with File > Export objects as GeoJSON") from None
    features = _features(data, path)
    if not features:
        raise UserError(f"--roi {path}: holds no regions; select the annotations in QuPath before exporting them")
    width, height = dimensions_xy
    names, polygons = [], []
    for i, feature in enumerate(features):
        name = _name(feature, i)
        geometry = feature.get("geometry") or {}
        if geometry.get("type") not in ("Polygon", "MultiPolygon"):
            raise UserError(f"--roi {path}: region {name!r} is a {geometry.get('type') or 'feature without geometry'}, "
                            "not a polygon; export area annotations (rectangles, ellipses, polygons, brush) only")
        try:
            polygon = shapely.make_valid(shape(geometry))
        except (ValueError, TypeError, AttributeError, shapely.errors.GEOSException) as e:
            raise UserError(f"--roi {path}: region {name!r} has a broken geometry ({e}); draw it again in QuPath") from None
        polygon = shapely.union_all([p for p in shapely.get_parts(polygon) if isinstance(p, Polygon)])
        if polygon.is_empty or polygon.area <= 0:
            raise UserError(f"--roi {path}: region {name!r} has no area; export area annotations only")
        x0, y0, x1, y1 = polygon.bounds
        tol = EDGE_TOLERANCE_PX
        if x0 < -tol or y0 < -tol or x1 > width + tol or y1 > height + tol:
            raise UserError(f"--roi {path}: region {name!r} (x {x0:.0f}..{x1:.0f}, y {y0:.0f}..{y1:.0f}) lies outside "
                            f"the slide (0..{width} x 0..{height} level-0 px); export annotations of this slide, in "
                            "level-0 pixels")
        names.append(name)
        polygons.append(polygon)
    return Regions(names, polygons)
