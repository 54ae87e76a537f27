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
def check(config_path: Path | None, overrides: tuple[str, ...]) -> None:
    """Print the resolved SLURM config, the workers it gives, what sinfo says of its partition
    and the job script of one worker job. Nothing is submitted.

    \b
    Examples:
      wsi-ircr cluster check --cluster-config my_slurm.yaml
      wsi-ircr cluster check --cluster-config gpu.yaml --set maximum_jobs=8
    """
    import dataclasses

    import yaml

    from wsi_ircr.slide.cluster import load_slurm_config, slurm_job_script, slurm_partition_report

    slurm = load_slurm_config(config_path, overrides)
    click.echo("# SLURM config (resolved)")
    click.echo(yaml.safe_dump({k: list(v) if isinstance(v, tuple) else v
                               for k, v in dataclasses.asdict(slurm).items()}, sort_keys=False).rstrip())
    click.echo(f"\n# plan: {slurm.minimum_jobs} to {slurm.maximum_jobs} jobs as tiles wait, each {slurm.worker_processes} worker "
               f"process(es) of {slurm.threads_per_process} threads"
               + (f", one GPU each ({slurm.gpus} per job)" if slurm.gpus else "") + f"; walltime {slurm.walltime}")
    for line in slurm_partition_report(slurm):
        click.echo(f"# {line}")
    click.echo("\n# job script of one worker job (the scheduler's address is filled in at run time)")
    click.echo(slurm_job_script(slurm).rstrip())
