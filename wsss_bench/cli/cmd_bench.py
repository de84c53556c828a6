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
@click.option("--preset", help="Quick look: run every cell under this preset (e.g. smoke).")
@click.option("--seeds", help="Quick look: these seeds instead of the bench's, e.g. 0,1.")
@click.option("--set", "sets", multiple=True, metavar="KEY=VALUE",
              help="Quick look: a config value over the bench's base (not a matrix axis); repeatable.")
@click.option("--force", is_flag=True, help="Reuse an --out made with other quick-look overrides.")
@click.option("--launcher", help="What starts the cells: local (default), submitit (SLURM), ray, "
                                 "or a plugin's (`wsss list launchers`); overrides the file's launcher.name.")
@click.option("--launcher-opt", "launcher_opts", multiple=True, metavar="KEY=VALUE",
              help="A launcher option (value parsed as YAML), e.g. partition=gpu; repeatable.")
def bench_command(bench_file: Path, out: Optional[Path], dry_run: bool, cache_dir: Optional[Path],
                  tables_only: bool, jobs: int, preset: Optional[str], seeds: Optional[str],
                  sets: tuple[str, ...], force: bool, launcher: Optional[str],
                  launcher_opts: tuple[str, ...]) -> None:
    """Run every cell of a bench matrix (skipping finished ones) and aggregate over seeds.

    --preset, --seeds and --set give a quick look at a bench: its own default folder
    (runs/bench-<name>-<hash of the overrides>) and tables marked "quick look".

    --launcher submits each cell as a SLURM job (submitit) or a Ray task instead of a local
    process; the bench folder and its store must then be on a file system every node sees.
    Run the same command again to resume: finished cells are skipped, cells still running
    under an earlier bench process are waited for, not submitted twice.
    """
    from ..orchestration.bench import apply_overrides, checked_launcher, expand, load_bench, run_bench
    from ..errors import ConfigError

    seed_list = None
    if seeds is not None:
        try:
            seed_list = [int(s) for s in seeds.split(",") if s.strip()]
        except ValueError:
            raise ConfigError(f"--seeds {seeds!r}: expected integers separated by commas, e.g. 0,1") from None
        if not seed_list:
            raise ConfigError("--seeds: give at least one seed")
    if dry_run:
        # Each cell gets every check its run makes before writing anything.
        spec = apply_overrides(load_bench(bench_file), preset, seed_list, sets)
        checked_launcher(spec, launcher, launcher_opts)
        cells = expand(spec, strict=False)
        for cell in cells:
            click.echo(cell.slug if cell.error is None else f"{cell.slug}: invalid: {cell.error}")
        invalid = [c for c in cells if c.error is not None]
        if invalid:
            raise ConfigError(f"{len(invalid)} of {len(cells)} bench cells would be rejected "
                              f"(first: {invalid[0].slug}: {invalid[0].error})")
        return
    summary = run_bench(bench_file, out, echo=lambda m: click.echo(m, err=True), store=cache_dir,
                        tables_only=tables_only, jobs=jobs, preset=preset, seeds=seed_list,
                        sets=sets, force=force, launcher=launcher, launcher_options=launcher_opts)
    click.echo(summary["markdown"])
    click.echo(f"bench folder: {summary['out']}")
    bad = [c for c in summary["cells"] if c["status"] in ("failed", "invalid")]
    if bad and not tables_only:
        listing = "; ".join(f"{c['slug']} ({c['status']}" + (f", job {c['job_id']}" if c.get("job_id") else "")
                            + (f", log {Path(summary['out']) / c['log']})" if c.get("log") else ")")
                            for c in bad[:5])
        more = f" and {len(bad) - 5} more" if len(bad) > 5 else ""
        raise ConfigError(f"{len(bad)} of {len(summary['cells'])} bench cells failed: {listing}{more}; "
                          "the tables hold the others (see 'Failed and missing cells' in bench.md)")


def register(cli: click.Group) -> None:
    """Add the command to the group."""
    cli.add_command(bench_command)
