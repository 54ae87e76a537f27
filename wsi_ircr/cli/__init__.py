"""The ``wsi-ircr`` command: one click group, one module per command, lazy heavy imports."""

from __future__ import annotations

import importlib
import sys

import click

from wsi_ircr import __version__

# command name -> "module:function". Command modules import only click at top level;
# torch, dask, openslide and friends are imported inside the command function.
COMMANDS = {
    "segment": "wsi_ircr.cli.segment:segment",
    "info": "wsi_ircr.cli.info:info",
    "tile": "wsi_ircr.cli.tile:tile",
    "train": "wsi_ircr.cli.train:train",
    "adapt": "wsi_ircr.cli.adapt:adapt",
    "evaluate": "wsi_ircr.cli.evaluate:evaluate",
    "cluster": "wsi_ircr.cli.cluster:cluster",
}


class LazyGroup(click.Group):
    """A click group whose subcommands are imported on first use (``--help`` stays fast)."""

    def list_commands(self, ctx):
        return sorted(COMMANDS)

    def get_command(self, ctx, name):
        if name not in COMMANDS:
            return None
        module, attr = COMMANDS[name].split(":")
        return getattr(importlib.import_module(module), attr)


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="wsi-ircr")
@click.option("--debug", is_flag=True, help="Show full tracebacks on errors.")
@click.pass_context
def cli(ctx: click.Context, debug: bool) -> None:
    """Nuclei instance segmentation for whole-slide images (IRCR-Net), exported to QuPath."""
    ctx.ensure_object(dict)
    ctx.obj["debug"] = debug


def main(argv: list[str] | None = None) -> None:
    """Entry point: user errors become one line on stderr and exit status 2."""
    from wsi_ircr.errors import UserError

    args = sys.argv[1:] if argv is None else argv
    debug = "--debug" in args
    try:
        cli.main(args=args, prog_name="wsi-ircr", standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("error: interrupted", err=True)
        sys.exit(130)
    except click.ClickException as e:
        e.show()
        sys.exit(e.exit_code)
    except click.exceptions.Exit as e:
        sys.exit(e.exit_code)
    except UserError as e:
        if debug:
            raise
        click.echo(f"error: {e}", err=True)
        sys.exit(2)
    except KeyboardInterrupt:
        click.echo("error: interrupted", err=True)
        sys.exit(130)
