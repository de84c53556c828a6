"""ResNet-38's command, ``wsss convert-weights``, declared torch-free.

This module is in the ``wsss_bench.commands`` entry-point group: the host imports it to list and
find commands (``wsss --help``, shell completion) without loading the backbone plugin, which
imports torch; the command's body imports what it needs when it runs.
"""
from __future__ import annotations

from pathlib import Path

import click

from wsss_bench.hookspecs import hookimpl


@click.command("convert-weights")
@click.argument("src", metavar="IN.params", type=click.Path(dir_okay=False, path_type=Path))
@click.argument("dst", metavar="OUT.pth", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--width", type=float, default=1.0, show_default=True,
              help="Check against ResNet38d at this width (1 for the ImageNet file).")
def convert_weights_command(src: Path, dst: Path, width: float) -> None:
    """Convert ademxapp's MXNet ResNet-38 weights (IN.params) to a PyTorch state dict (OUT.pth).

    Every backbone tensor must be present with the expected shape; the ImageNet classifier is
    dropped.  The output loads with ``ResNet38d.load_pretrained`` or ``load_state_dict``.
    """
    from wsss_bench import io
    from wsss_bench.errors import WeightsError

    from .backbone_resnet38d import _listing, convert_params_file

    if not width > 0:
        raise WeightsError(f"--width must be > 0, got {width}")
    state, skipped = convert_params_file(src, width=width)
    io.write_torch(dst, state)  # write-then-rename: never a truncated OUT.pth
    values = sum(t.numel() for t in state.values())
    click.echo(f"wrote {dst}: {len(state)} tensors ({values / 1e6:.2f} M values)")
    if skipped:
        click.echo(f"dropped {len(skipped)} non-backbone keys: {_listing(skipped)}")


@hookimpl
def register_commands(cli: click.Group) -> None:
    """Add ``wsss convert-weights IN.params OUT.pth``."""
    cli.add_command(convert_weights_command)
