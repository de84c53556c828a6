"""``wsss bench``: run a benchmark matrix and write its tables."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import click


@click.command("bench")
@click.argument("bench_file", type=click.Path(path_type=Path))
@click.option("--out", type=click.Path(path_type=Path), help="Bench folder (default runs/bench-<name>).")
@click.option("--dry-run", is_flag=True, help="List the cells and validate their configs only.")
@click.option("--cache-dir", type=click.Path(path_type=Path),
              help="Stage cache shared with other benches/runs (default OUT/store).")
@click.option("--tables-only", is_flag=True, help="Run nothing; aggregate the cells finished so far.")
@click.option("--jobs", "-j", type=click.IntRange(min=1), default=1, show_default=True,
              help="Cells run at once, each with CPU cores / JOBS threads; a seed's other "
                   "cells wait for its first one (it computes their shared stages).")
def bench_command(bench_file: Path, out: Optional[Path], dry_run: bool, cache_dir: Optional[Path],
                  tables_only: bool, jobs: int) -> None:
    """Run every cell of a bench matrix (skipping finished ones) and aggregate over seeds."""
    from ..bench import expand, load_bench, run_bench

    if dry_run:
        for cell in expand(load_bench(bench_file)):
            click.echo(cell.slug)
        return
    summary = run_bench(bench_file, out, echo=lambda m: click.echo(m, err=True), store=cache_dir,
                        tables_only=tables_only, jobs=jobs)
    click.echo(summary["markdown"])
    click.echo(f"bench folder: {summary['out']}")


def register(cli: click.Group) -> None:
    """Add the command to the group."""
    cli.add_command(bench_command)
