"""Pack the MoNuSeg tiles for a GPU machine, where ../shared does not travel.

    python -m benchmarks.experiments.gpu_pack        # writes scratch/gpu-data/{images,labels} (PNG, about 40 MB)

The device tool carries ``scratch/gpu-data`` (git-ignored: MoNuSeg is CC BY-NC-SA and is never
committed) beside the working tree; ``benchmarks/experiments/gpu_train.sh`` trains from it.
"""

from __future__ import annotations


from benchmarks.common import MONUSEG as DATA
from benchmarks.common import REPO

OUT = REPO / "scratch" / "gpu-data"


def main() -> None:
    from PIL import Image

    from wsi_ircr.io.images import pair_folders, read_image, read_label, write_label_png

    for sub in ("images", "labels"):
        (OUT / sub).mkdir(parents=True, exist_ok=True)
    pairs = pair_folders(DATA / "images", DATA / "labels")
    for stem, image_path, label_path in pairs:
        Image.fromarray(read_image(image_path)).save(OUT / "images" / f"{stem}.png", optimize=True)
        write_label_png(OUT / "labels" / f"{stem}.png", read_label(label_path))
    size = sum(p.stat().st_size for p in OUT.rglob("*.png")) / 2**20
    print(f"{len(pairs)} tiles in {OUT} ({size:.1f} MiB)")


if __name__ == "__main__":
    main()
