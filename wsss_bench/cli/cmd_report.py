"""``wsss report``: a self-contained HTML report of a run or bench folder."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import click


@click.command("report")
@click.argument("folder", type=click.Path(path_type=Path))
@click.option("--out", type=click.Path(path_type=Path),
              help="HTML file to write (default: FOLDER/report.html).")
@click.option("--split", default=None,
              help="Evaluation split of the example images (default: val, else the first).")
@click.option("--examples", default=4, show_default=True, type=click.IntRange(0, 50),
              help="How many best, worst and random example images.")
@click.option("--seed", default=0, show_default=True, type=int,
              help="Seed of the random examples and gallery images.")
def report_command(folder: Path, out: Optional[Path], split: Optional[str], examples: int,
                   seed: int) -> None:
    """Write one self-contained HTML page (embedded images, no scripts, no network) for a run
    or a bench folder; plots are also saved under FOLDER/plots/."""
    # Imported here so that `wsss --help` stays fast (matplotlib, torch load lazily).
    from ..orchestration.report import build_report

    path = build_report(folder, out, split=split, examples=examples, seed=seed)
    click.echo(f"report: {path} ({path.stat().st_size / 1024:.0f} KB)")


def register(cli: click.Group) -> None:
    """Add the command to the group."""
    cli.add_command(report_command)
