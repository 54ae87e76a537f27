"""``wsi-ircr cluster check``: what ``--cluster slurm`` would submit, without submitting."""

from __future__ import annotations

from pathlib import Path

import click


@click.group()
def cluster() -> None:
    """Inspect the cluster backends (SLURM)."""


@cluster.command()
@click.option("--cluster-config", "config_path", type=click.Path(path_type=Path),
              help="The SLURM config (default: the packaged configs/cluster/slurm.yaml).")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help="Override a key of the SLURM config.")
@click.option("--config", "segment_config", type=click.Path(path_type=Path),
              help="The segment config the run will use (its scratch_dir).")
@click.option("--scratch", "scratch_dir", metavar="DIR", help="As segment --scratch: tile stores on node-local disk.")
def check(config_path: Path | None, overrides: tuple[str, ...], segment_config: Path | None,
          scratch_dir: str | None) -> None:
    """Print the resolved SLURM config, the workers it gives, where the tile stores go, what
    sinfo says of its partition and the job script of one worker job. Nothing is submitted.

    \b
    Examples:
      wsi-ircr cluster check --cluster-config my_slurm.yaml --scratch '$TMPDIR'
      wsi-ircr cluster check --cluster-config gpu.yaml --set maximum_jobs=8
    """
    import dataclasses

    import yaml

    from wsi_ircr.cli.options import resolve_segment_config
    from wsi_ircr.slide.cluster import load_slurm_config, slurm_job_script, slurm_partition_report
    from wsi_ircr.slide.scratch import describe_store

    slurm = load_slurm_config(config_path, overrides)
    config = resolve_segment_config(segment_config, (), scratch_dir=scratch_dir)
    click.echo("# SLURM config (resolved)")
    click.echo(yaml.safe_dump({k: list(v) if isinstance(v, tuple) else v
                               for k, v in dataclasses.asdict(slurm).items()}, sort_keys=False).rstrip())
    click.echo(f"\n# plan: {slurm.minimum_jobs} to {slurm.maximum_jobs} jobs as tiles wait, each {slurm.worker_processes} worker "
               f"process(es) of {slurm.threads_per_process} threads"
               + (f", one GPU each ({slurm.gpus} per job)" if slurm.gpus else "") + f"; walltime {slurm.walltime}")
    click.echo(f"# tile stores: {describe_store(config.scratch_dir)}")
    for line in slurm_partition_report(slurm):
        click.echo(f"# {line}")
    click.echo("\n# job script of one worker job (the scheduler's address is filled in at run time)")
    click.echo(slurm_job_script(slurm).rstrip())
