"""Cohort run: segment many slides on one Dask cluster, resumable, one status row per slide.

Deployment recipe (not imported by ``wsi_ircr``). The cluster is either an existing
scheduler, a SLURM allocation made through dask-jobqueue, or a local cluster::

    # an existing cluster (dask scheduler + dask worker --nthreads 4 --resources GPU=4 on GPU nodes)
    python pipelines/cohort.py slides.txt -o cohort_out --scheduler tcp://head:8786 --device cuda

    # SLURM through dask-jobqueue (pip install "wsi-ircr[cluster]"): 8 GPU jobs
    python pipelines/cohort.py slides.txt -o cohort_out --slurm-jobs 8 --slurm-queue gpu \
        --slurm-cores 16 --slurm-memory 64GB --slurm-gpus 1 --device cuda

``slides.txt`` lists one slide path per line (or pass a folder: every file OpenSlide may
read in it). Rerunning the same command skips finished slides and resumes unfinished ones;
``cohort.csv`` in the output folder gets one row per slide (status, nuclei, seconds, error).
"""

from __future__ import annotations

import argparse
import csv
import logging
import sys
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

from wsi_ircr.config import apply_overrides, from_dict, read_yaml
from wsi_ircr.errors import UserError
from wsi_ircr.io.atomic import atomic_open
from wsi_ircr.slide.config import SegmentConfig
from wsi_ircr.slide.pipeline import SUMMARY_FILE, dask_client, model_info, run_stem, segment_slide

SLIDE_SUFFIXES = {".svs", ".tif", ".tiff", ".ndpi", ".vms", ".vmu", ".scn", ".mrxs", ".svslide", ".bif", ".dcm", ".czi"}


def list_slides(source: Path) -> list[Path]:
    """Slides from a folder (by suffix) or a text file of paths (blank lines and # ignored)."""
    if source.is_dir():
        return sorted(p for p in source.iterdir() if p.suffix.lower() in SLIDE_SUFFIXES)
    lines = source.read_text().splitlines()
    return [Path(line.strip()) for line in lines if line.strip() and not line.lstrip().startswith("#")]


@contextmanager
def slurm_client(args: argparse.Namespace):
    """A client of a dask-jobqueue SLURMCluster; GPU jobs declare ``resources={"GPU": 1}``."""
    from dask_jobqueue import SLURMCluster
    from distributed import Client

    extra = [f"--resources GPU={args.slurm_cores}"] if args.slurm_gpus else []
    directives = [f"--gres=gpu:{args.slurm_gpus}"] if args.slurm_gpus else []
    cluster = SLURMCluster(queue=args.slurm_queue, cores=args.slurm_cores, processes=1, memory=args.slurm_memory,
                           walltime=args.slurm_walltime, job_extra_directives=directives, worker_extra_args=extra)
    cluster.scale(jobs=args.slurm_jobs)
    try:
        with Client(cluster) as client:
            yield client
    finally:
        cluster.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("slides", type=Path, help="Folder of slides, or a text file with one slide path per line.")
    parser.add_argument("-o", "--out", type=Path, required=True)
    parser.add_argument("--config", type=Path, help="Segment config YAML (configs/segment/default.yaml).")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--scheduler", help="Address of an existing Dask scheduler.")
    parser.add_argument("--concurrent-slides", type=int, default=2, help="Slides in flight at once (overlaps I/O and export).")
    parser.add_argument("--slurm-jobs", type=int, default=0, help="Start this many SLURM worker jobs (dask-jobqueue).")
    parser.add_argument("--slurm-queue")
    parser.add_argument("--slurm-cores", type=int, default=8)
    parser.add_argument("--slurm-memory", default="32GB")
    parser.add_argument("--slurm-gpus", type=int, default=0)
    parser.add_argument("--slurm-walltime", default="04:00:00")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(message)s")
    try:
        data = apply_overrides(read_yaml(args.config) if args.config else {}, args.overrides)
        if args.device:
            data["device"] = args.device
        config = from_dict(SegmentConfig, data, str(args.config or "segment config"))
        slides = list_slides(args.slides)
        model = model_info(config)
    except (UserError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    todo = [s for s in slides if not (args.out / run_stem(s) / SUMMARY_FILE).exists()]
    print(f"{len(slides)} slides, {len(slides) - len(todo)} already finished", file=sys.stderr)
    cluster = slurm_client(args) if args.slurm_jobs else dask_client(args.scheduler, config)
    rows = []
    with cluster as client:

        def run(slide: Path) -> dict:
            try:
                summary = segment_slide(slide, args.out, config, client, model, progress=False)
                return {"slide": str(slide), "status": "done", "nuclei": summary["nuclei"],
                        "seconds": summary["seconds"]["total"], "error": ""}
            except UserError as e:
                return {"slide": str(slide), "status": "failed", "nuclei": "", "seconds": "", "error": str(e)}

        with ThreadPoolExecutor(max(1, args.concurrent_slides)) as pool:
            for row in pool.map(run, todo):
                rows.append(row)
                print(f"{row['slide']}: {row['status']} {row['nuclei']} {row['error']}", file=sys.stderr, flush=True)
    with atomic_open(args.out / "cohort.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["slide", "status", "nuclei", "seconds", "error"])
        writer.writeheader()
        writer.writerows(rows)
    return 1 if any(r["status"] == "failed" for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
