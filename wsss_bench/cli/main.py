"""The ``wsss`` command group; each command lives in its own module."""
from __future__ import annotations

import click

from typing import Any, Optional

from .. import __version__
from .common import WsssGroup, setup_logging


class PluginCommandsGroup(WsssGroup):
    """The ``wsss`` group: plugin commands are added when a command is looked up or listed.

    Built-in commands are always there.  Then, in this order and only as far as needed:
    the torch-free modules of the ``wsss_bench.commands`` entry-point group (enough for
    ``wsss --help`` and every built-in plugin command), then every plugin's
    ``register_commands`` hook, which loads the plugins (and torch with them): when a command
    name is not found otherwise, or when listing commands while a third-party plugin could add
    some.  So ``wsss --help`` and shell completion import no torch on a plain install.
    """

    _declared: Optional[set[int]] = None
    _full_state: Any = None

    def _declare(self) -> set[int]:
        if self._declared is None:
            from ..plugins import add_declared_commands

            setup_logging()  # before any plugin loads: its warnings print as one line
            self._declared = add_declared_commands(self)
        return self._declared

    def _load_all(self) -> None:
        from ..plugins import add_plugin_commands, get_state

        skip = self._declare()
        state = get_state()
        if state is not self._full_state:  # plugins (re)loaded since: ask them again
            self._full_state = state
            add_plugin_commands(self, skip)

    def list_commands(self, ctx: click.Context) -> list[str]:
        from ..plugins import undeclared_command_plugins_possible

        self._declare()
        if undeclared_command_plugins_possible():
            self._load_all()
        return super().list_commands(ctx)

    def get_command(self, ctx: click.Context, cmd_name: str) -> Optional[click.Command]:
        self._declare()
        command = super().get_command(ctx, cmd_name)
        if command is None:
            self._load_all()
            command = super().get_command(ctx, cmd_name)
        return command


@click.group(cls=PluginCommandsGroup, context_settings={"help_option_names": ["-h", "--help"]})
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
    from . import (cmd_bench, cmd_data, cmd_eval, cmd_export, cmd_import, cmd_plugins, cmd_refine,
                   cmd_report, cmd_run, cmd_segment, cmd_steps)

    for module in (cmd_run, cmd_eval, cmd_plugins, cmd_data, cmd_steps, cmd_import, cmd_bench,
                   cmd_export, cmd_refine, cmd_segment, cmd_report):
        module.register(cli)


_register_builtin_commands()


def main() -> None:
    """Console-script entry point."""
    cli(prog_name="wsss")


if __name__ == "__main__":
    main()
