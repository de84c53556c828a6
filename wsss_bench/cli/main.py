"""The ``wsss`` command group; each command lives in its own module."""
from __future__ import annotations

import click

from .. import __version__
from ..plugins import add_plugin_commands
from .common import WsssGroup, setup_logging


@click.group(cls=WsssGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="wsss-bench")
def cli() -> None:
    """wsss-bench: class activation maps, sub-category exploration and mIoU benchmarks.

    \b
    Quick start (embedded synthetic dataset, CPU):
      wsss run --method subcat --preset smoke
      wsss run --method cam
      wsss eval --cams RUN/cams/round0/train --data-root ROOT --split train
    """
    setup_logging()


def _register_builtin_commands() -> None:
    from . import (cmd_bench, cmd_data, cmd_eval, cmd_export, cmd_import, cmd_plugins, cmd_report,
                   cmd_run, cmd_steps)

    for module in (cmd_run, cmd_eval, cmd_plugins, cmd_data, cmd_steps, cmd_import, cmd_bench,
                   cmd_export, cmd_report):
        module.register(cli)


_register_builtin_commands()
add_plugin_commands(cli)


def main() -> None:
    """Console-script entry point."""
    cli(prog_name="wsss")


if __name__ == "__main__":
    main()
