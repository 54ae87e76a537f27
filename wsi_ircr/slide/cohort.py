"""One slide or a cohort, as one task graph: tiles of every slide share the cluster.

The driver plans the next slide in a background thread while the cluster works, keeps at most
``tasks_in_flight`` tile tasks submitted (memory stays flat however large the cohort),
exports a finished slide in a background thread while other slides' tiles run, and
records every slide in ``OUT/cohort.csv`` (rewritten atomically as slides finish, rows of
earlier runs kept). A slide that fails is recorded and the others go on. A rerun skips
finished slides and resumes unfinished ones at tile level.
"""

from __future__ import annotations

import csv
import queue
import time
import uuid
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from wsi_ircr.errors import UserError
from wsi_ircr.io.atomic import atomic_open
from wsi_ircr.slide.config import SegmentConfig
from wsi_ircr.slide.pipeline import (ModelInfo, SlidePlan, TileResults, driver_rss_mb, finish_slide, forward_boxes,
                                     plan_slide, start_overlay)
from wsi_ircr.slide.plan import ExecutionPlan
from wsi_ircr.slide.run_folder import RunFolder, run_key, run_stem

TABLE = "cohort.csv"
PLAN_AHEAD = 1  # slides planned in the background while the current ones' tiles run
# slide_seconds_concurrent: the slide from its planning to its summary, while other slides of the
# command ran too (they overlap: do not add them up); run_wall_seconds: the command's wall clock
# from its start to this slide's end (the last row of a run: the whole run).
COLUMNS = ("slide", "status", "nuclei", "tissue_mm2", "nuclei_per_mm2", "slide_seconds_concurrent", "run_wall_seconds",
           "unreadable_regions", "unreadable_mm2", "roi", "error")
RENAMED = {"seconds": "slide_seconds_concurrent"}  # columns of earlier versions


class CohortTable:
    """``OUT/cohort.csv``: one row per slide ever run into OUT (keyed by its run folder).

    Each update re-reads the file under a lock (``OUT/.cohort.lock``) and replaces it
    atomically, so commands running at once into one OUT keep each other's rows.
    """

    def __init__(self, out_root: str | Path):
        self.path = Path(out_root) / TABLE
        self._lock_path = Path(out_root) / ".cohort.lock"
        self.rows = self._read()

    def _read(self) -> dict[str, dict]:
        rows: dict[str, dict] = {}
        if not self.path.exists():
            return rows
        try:
            with open(self.path, newline="") as f:
                reader = csv.DictReader(f)
                if not {"slide", "status"} <= set(reader.fieldnames or ()):
                    raise ValueError("no slide and status columns")
                for row in reader:  # tables of earlier versions may lack columns or name them otherwise
                    row = {RENAMED.get(k, k): v for k, v in row.items()}
                    rows[run_stem(row["slide"])] = {k: row.get(k) or "" for k in COLUMNS}
        except (OSError, ValueError, UnicodeDecodeError, csv.Error) as e:
            raise UserError(f"{self.path}: not a cohort table of wsi-ircr ({e}); move it away or choose "
                            "another -o") from None
        return rows

    def record(self, row: dict) -> None:
        """Add or replace the row of ``row["slide"]`` and rewrite the file atomically."""
        import fcntl

        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self._lock_path, "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            self.rows = self._read()
            self.rows[run_stem(row["slide"])] = {k: row.get(k, "") for k in COLUMNS}
            with atomic_open(self.path, "w", newline="") as f:
                writer = csv.DictWriter(f, fieldnames=COLUMNS)
                writer.writeheader()
                writer.writerows(self.rows.values())


def _done_row(summary: dict) -> dict:
    unreadable = summary.get("unreadable", {"regions": 0, "area_mm2": 0.0})  # summaries of earlier versions lack it
    return {"slide": summary["slide"], "status": "done", "nuclei": summary["nuclei"],
            "tissue_mm2": f"{summary['tissue_area_mm2']:.4f}", "nuclei_per_mm2": f"{summary['nuclei_per_mm2']:.1f}",
            "slide_seconds_concurrent": summary["seconds"]["total"], "unreadable_regions": unreadable["regions"],
            "unreadable_mm2": f"{unreadable['area_mm2']:.4f}", "roi": roi_text(summary.get("regions")), "error": ""}


def roi_text(regions: list[dict] | None) -> str:
    """cohort.csv's ``roi``: "name: N nuclei in A mm^2 (D/mm^2)" per ``--roi`` region, "; "-separated."""
    return "; ".join(f"{r['name']}: {r['nuclei']} nuclei in {r['area_mm2']:.4f} mm^2 ({r['nuclei_per_mm2']:.1f}/mm^2)"
                     for r in regions or [])


WORKERS_DIED = ("the Dask workers running its tiles kept dying (killed by the system or by their job's limits: "
                "out of memory, time limit); see the workers' logs (SLURM: the jobs' .err files in the SLURM config's "
                "log_directory), then give each worker more memory or lower batch_tiles")


def error_text(slide: Path, error: BaseException) -> str:
    """One line naming the slide: a UserError's message, what to do when its workers kept
    dying (Dask's KilledWorker), or the exception's type and message."""
    if type(error).__name__ == "KilledWorker":
        return f"{slide}: {WORKERS_DIED}"
    text = str(error) if isinstance(error, UserError) else f"{type(error).__name__}: {error}"
    text = " ".join(text.split())
    return text if str(slide) in text or slide.name in text else f"{slide}: {text}"


@dataclass
class CohortReport:
    """What a command did: slides done now, skipped as already done, failed (with the error),
    and the summary of every done or skipped slide."""

    done: list[Path] = field(default_factory=list)
    skipped: list[Path] = field(default_factory=list)
    failed: dict[Path, str] = field(default_factory=dict)
    summaries: dict[Path, dict] = field(default_factory=dict)
    table: Path | None = None

    @property
    def line(self) -> str:
        """The one-line summary printed at the end of a command."""
        n = len(self.done) + len(self.skipped) + len(self.failed)
        parts = [f"{len(self.done) + len(self.skipped)} of {n} slides done"]
        if self.skipped:
            parts.append(f"{len(self.skipped)} already finished")
        if self.failed:
            parts.append(f"{len(self.failed)} failed")
        return ", ".join(parts) + f"; see {self.table}"


@dataclass(eq=False)
class SlideRun:
    """A slide between planning and its summary."""

    slide: Path
    folder: RunFolder
    reader: object
    plan: SlidePlan
    job: object
    resumed: bool
    stored: int
    batches: deque
    results: TileResults
    seconds: dict
    t_start: float
    rss_mb: float
    boxes: list  # per tile of the store: the box of its window the network runs on (``crop``)
    overlay: tuple  # pipeline.start_overlay's (canvas, on_tile), made while planning
    in_flight: int = 0
    t_tiles: float | None = None


@dataclass(eq=False)
class _Planned:
    """A slide after planning: an active ``run``, ``skipped`` (its folder and summary: done
    before), or the ``error`` it failed with."""

    slide: Path
    t_start: float
    run: SlideRun | None = None
    skipped: tuple[RunFolder, dict] | None = None
    error: BaseException | None = None


def _batches(items: list[int], size: int) -> deque:
    return deque(items[i:i + size] for i in range(0, len(items), size))


class _Cohort:
    """The driver loop of ``segment_slides`` (one instance per call)."""

    def __init__(self, slides, out_root, config: SegmentConfig, client, model: ModelInfo, overwrite: bool,
                 progress, echo: Callable[[str, bool], None], plan: ExecutionPlan):
        self.slides = deque(Path(s) for s in slides)
        self.out_root = Path(out_root).absolute()
        if self.out_root.exists() and not self.out_root.is_dir():
            raise UserError(f"-o {out_root}: exists and is not a folder; choose another -o")
        self.config, self.client, self.model, self.overwrite = config, client, model, overwrite
        self.progress, self.echo = progress, echo
        self.table = CohortTable(self.out_root)
        self.t_command = time.perf_counter()
        self.report = CohortReport(table=self.table.path)
        self.execution = plan
        if config.scratch_dir and plan.backend == "local":  # the workers are this machine: check it now
            from wsi_ircr.slide.scratch import expand_scratch

            expand_scratch(config.scratch_dir)
        self.events: queue.Queue = queue.Queue()
        self.active: list[SlideRun] = []
        self.planning: deque = deque()  # futures of _Planned, in slide order
        self.futures: dict = {}
        self.exports = 0
        self.token = uuid.uuid4().hex[:8]

    # -- slides -------------------------------------------------------------------------

    def _wall(self) -> float:
        """Seconds since this command started its slides."""
        return round(time.perf_counter() - self.t_command, 3)

    def _fail(self, slide: Path, error: BaseException, t_start: float) -> None:
        """Record ``slide`` as failed (its row, one error line); the others go on."""
        text = error_text(slide, error)
        self.report.failed[slide] = text
        self.table.record({"slide": str(slide), "status": "failed", "run_wall_seconds": self._wall(),
                           "slide_seconds_concurrent": round(time.perf_counter() - t_start, 3),
                           "error": text})
        self.echo(f"error: {text}", True)
        self.progress.slide_done()

    def _plan(self, slide: Path) -> _Planned:
        """Open and plan ``slide`` and prepare its run folder (in the planner thread: touches
        only this slide's files); what to do with it is decided by ``_admit``."""
        from wsi_ircr.slide.crop import box_area
        from wsi_ircr.slide.reader import open_slide
        from wsi_ircr.slide.scratch import prepare_store
        from wsi_ircr.slide.tasks import SlideJob, load_result, result_path

        t_start = time.perf_counter()
        reader = None
        try:
            folder = RunFolder.for_slide(self.out_root, slide)
            reader = open_slide(slide, mpp=self.config.mpp)
            key = run_key(slide.name, reader.fingerprint(), self.model.hash, self.config)
            if not self.overwrite and folder.finished(key):
                reader.close()
                return _Planned(slide, t_start, skipped=(folder, folder.summary()))
            plan = plan_slide(reader, self.config, self.model.mpp)
            seconds = {"plan_tissue": time.perf_counter() - t_start}
            resumed = folder.prepare(key, self.overwrite)
            folder.work_dir.mkdir(parents=True, exist_ok=True)
            store_path, store_spec, stored = prepare_store(folder, plan, slide.name, self.config.scratch_dir,
                                                           self.overwrite)
            results = TileResults({}, {}, {})
            pending = []
            for i, tile in enumerate(plan.tiles):  # the store's tiles, in its order
                if result_path(folder.work_dir, tile).exists():
                    saved = load_result(folder.work_dir, tile)
                    results.counts[tile], results.dropped[tile] = saved.count, saved.dropped
                    results.unreadable.update(saved.unreadable_xywh)
                else:
                    pending.append(i)
            results.reused = len(plan.tiles) - len(pending)
            boxes = forward_boxes(plan, plan.tiles, self.config.skip_glass)
            pending.sort(key=lambda i: -box_area(boxes[i]))  # the largest first: the last tasks are the shortest
            job = SlideJob(str(slide), self.config.mpp, plan.fingerprint, store_path, str(folder.work_dir),
                           self.model.path, self.model.hash, self.execution, self.config.cells_um, store_spec)
            t = time.perf_counter()
            overlay = start_overlay(reader, plan)  # here, not after the last tile: the export is the run's tail
            seconds["overlay"] = time.perf_counter() - t
        except Exception as e:  # noqa: BLE001 - any slide may fail alone
            if reader is not None:
                reader.close()
            return _Planned(slide, t_start, error=e)
        run = SlideRun(slide, folder, reader, plan, job, resumed, stored, _batches(pending, self.execution.task_tiles),
                       results, seconds, t_start, driver_rss_mb(), boxes, overlay)
        return _Planned(slide, t_start, run=run)

    def _admit(self, planned: _Planned) -> None:
        """Record a planned slide: failed, skipped (already finished) or active (its tiles queued)."""
        slide = planned.slide
        if planned.error is not None:
            self._fail(slide, planned.error, planned.t_start)
        elif planned.skipped is not None:
            folder, summary = planned.skipped
            self.report.skipped.append(slide)
            self.report.summaries[slide] = summary
            earlier = self.table.rows.get(run_stem(slide), {}).get("run_wall_seconds", "")
            self.table.record(_done_row(summary) | {"slide": str(slide), "run_wall_seconds": earlier})
            self.echo(f"{slide}: already done ({summary.get('nuclei')} nuclei) -> {folder.path}/", False)
            self.progress.slide_done()
        else:
            run = planned.run
            self.progress.add_tiles(len(run.plan.tiles), run.slide.name)
            self.progress.tiles_done(run.results.reused, reused=True)
            self.active.append(run)
            self._maybe_export(run)

    def _next_planned(self) -> _Planned | None:
        """The next slide's plan (waiting for it if needed), with the following slides'
        plans started so they are ready when this one's tiles are all submitted."""
        if not self.planning and self.slides:
            self.planning.append(self.planner.submit(self._plan, self.slides.popleft()))
        if not self.planning:
            return None
        future = self.planning.popleft()
        while len(self.planning) < PLAN_AHEAD and self.slides:
            self.planning.append(self.planner.submit(self._plan, self.slides.popleft()))
        return future.result()

    def _maybe_export(self, run: SlideRun) -> None:
        """Once every tile of ``run`` is segmented, export it in a background thread."""
        if run.batches or run.in_flight:
            return
        self.active.remove(run)
        run.seconds["tiles_wall"] = time.perf_counter() - (run.t_tiles or time.perf_counter())
        self.exports += 1
        future = self.pool.submit(finish_slide, run.reader, run.plan, run.folder, self.model, self.config,
                                  self.execution, run.results, run.seconds, run.resumed, run.stored, run.t_start, run.rss_mb,
                                  run.overlay)
        future.add_done_callback(lambda f, run=run: self.events.put(("export", run, f)))

    def _drop_scratch(self, run: SlideRun) -> None:
        """Remove every worker's node-local copy of the slide's tile store (``scratch_dir``),
        its spec first: a task of the slide still running creates no new copy."""
        if run.job.store_spec:
            from wsi_ircr.slide.scratch import remove_scratch_store

            Path(run.job.store_spec).unlink(missing_ok=True)
            try:
                self.client.run(remove_scratch_store, run.job.store_path, on_error="ignore")
            except Exception as e:  # noqa: BLE001 - a cache left behind fails no slide
                self.echo(f"warning: {run.slide}: its tile stores on scratch were not all removed "
                          f"({' '.join(str(e).split())})", True)

    def _exported(self, run: SlideRun, future) -> None:
        self.exports -= 1
        run.reader.close()
        self._drop_scratch(run)
        try:
            summary = future.result()
        except Exception as e:  # noqa: BLE001
            self._fail(run.slide, e, run.t_start)
            return
        self.report.done.append(run.slide)
        self.report.summaries[run.slide] = summary
        self.table.record(_done_row(summary) | {"run_wall_seconds": self._wall()})
        self.echo(f"{run.slide}: {summary['nuclei']} nuclei ({summary['nuclei_per_mm2']:.0f}/mm^2 of "
                  f"{summary['tissue_area_mm2']:.2f} mm^2 tissue) in {summary['seconds']['total']:.1f} s "
                  f"-> {run.folder.path}/", False)
        if summary["nuclei_dropped_at_halo"]:
            self.echo(f"warning: {run.slide}: {summary['nuclei_dropped_at_halo']} nuclei larger than the halo were "
                      f"dropped (halo {run.plan.grid.halo_px} px); raise --halo above the largest nucleus", True)
        unreadable = summary["unreadable"]
        if unreadable["regions"]:
            self.echo(f"warning: {run.slide}: {unreadable['regions']} broken tiles could not be read "
                      f"({unreadable['area_mm2']:.4f} mm^2, {100 * unreadable['tissue_fraction']:.2f} % of the tissue); "
                      "segmented around them, their boxes are in summary.json (unreadable)", True)
        self.progress.slide_done()

    # -- tile tasks ---------------------------------------------------------------------

    def _submit(self, run: SlideRun) -> None:
        from wsi_ircr.slide.tasks import segment_batch

        batch = run.batches.popleft()
        future = self.client.submit(segment_batch, run.job, batch, [run.boxes[i] for i in batch], key=f"segment-{self.token}-{run.folder.stem}-{batch[0]}",
                                    resources=self.execution.task_resources, pure=False)
        self.futures[future] = (run, batch)
        run.in_flight += 1
        run.t_tiles = run.t_tiles or time.perf_counter()
        future.add_done_callback(lambda f: self.events.put(("task", None, f)))

    def _finished_task(self, future) -> None:
        if future not in self.futures:
            return  # a task of a slide that already failed
        run, batch = self.futures.pop(future)
        run.in_flight -= 1
        if future.status == "finished":
            run.results.add(future.result())
            self.progress.tiles_done(len(batch))
            self._maybe_export(run)
            return
        try:
            error = future.exception()
        except Exception as e:  # noqa: BLE001 - e.g. the future was cancelled
            error = e
        self._abandon(run)
        self._drop_scratch(run)
        self._fail(run.slide, error, run.t_start)

    def _abandon(self, run: SlideRun) -> None:
        """Cancel the slide's other tasks; its run folder stays unfinished (a rerun resumes it)."""
        mine = [f for f, (r, _) in self.futures.items() if r is run]
        for f in mine:
            del self.futures[f]
        if mine:
            self.client.cancel(mine)
        run.batches.clear()
        run.reader.close()
        if run in self.active:
            self.active.remove(run)

    # -- loop ---------------------------------------------------------------------------

    def _feed(self) -> None:
        limit = self.execution.tasks_in_flight
        while len(self.futures) < limit:
            run = next((r for r in self.active if r.batches), None)
            if run is not None:
                self._submit(run)
                continue
            planned = self._next_planned()
            if planned is None:
                return
            self._admit(planned)

    def run(self) -> CohortReport:
        with ThreadPoolExecutor(max_workers=2, thread_name_prefix="export") as self.pool, \
                ThreadPoolExecutor(max_workers=1, thread_name_prefix="plan") as self.planner:
            try:
                while True:
                    self._feed()
                    if not (self.futures or self.exports or self.slides or self.planning or self.active):
                        break
                    kind, run, future = self.events.get()
                    if kind == "task":
                        self._finished_task(future)
                    else:
                        self._exported(run, future)
            except BaseException:
                self.client.cancel(list(self.futures))
                for future in self.planning:
                    future.cancel()
                for run in self.active:
                    run.reader.close()
                raise
        return self.report


def segment_slides(slides, out_root: str | Path, config: SegmentConfig, client, model: ModelInfo, *,
                   overwrite: bool = False, progress=None, echo: Callable[[str, bool], None] | None = None,
                   plan: ExecutionPlan | None = None) -> CohortReport:
    """Segment ``slides`` into ``out_root/<stem>/`` on the cluster of ``client``.

    Args:
        slides: slide paths (their stems must be distinct: see ``inputs.collect_slides``).
        config / model: the resolved config and ``pipeline.model_info(config)``.
        overwrite: redo finished and mismatching runs (a matching tile store is reused).
        progress: a ``wsi_ircr.progress.CohortProgress`` (None: silent).
        echo: ``echo(line, is_error)`` receives one line per slide as it ends.
        plan: the execution plan ``cluster.open_cluster`` resolved for ``client`` (None:
            resolved here from the workers ``client`` has now).

    Returns:
        The report; every slide also has its row in ``out_root/cohort.csv``.
    """
    from wsi_ircr.progress import CohortProgress
    from wsi_ircr.slide.cluster import client_size
    from wsi_ircr.slide.plan import resolve_plan

    plan = plan or resolve_plan(config, client_size(client, "client"), model)
    return _Cohort(slides, out_root, config, client, model, overwrite, progress or CohortProgress(0, enabled=False),
                   echo or (lambda line, is_error: None), plan).run()
