"""``wsss run``: train, infer CAMs, evaluate, print the table."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import click

from .options import config_options, resolve_config


@click.command("run")
@config_options
@click.option("--out", type=click.Path(path_type=Path), help="Run directory (default runs/<time>-<method>-<backbone>).")
@click.option("--resume", is_flag=True, help="Continue a run in an existing --out folder.")
@click.option("--dry-run", is_flag=True, help="Resolve and validate the config, print it, run nothing.")
@click.option("--cache-dir", type=click.Path(path_type=Path),
              help="Content-addressed stage cache shared between runs: unchanged stages are reused.")
@click.option("--force", "force", multiple=True, metavar="STAGE",
              help="Recompute a cached stage: train:round1, features, cams:round0:val, refine, segment, "
                   "or a prefix (repeatable).")
def run_command(out: Optional[Path], resume: bool, dry_run: bool, cache_dir: Optional[Path],
                force: tuple[str, ...], **flags: Any) -> None:
    """Run a CAM method end to end and print its mIoU table."""
    config = resolve_config(**flags)
    if dry_run:
        import yaml

        from ..orchestration.runner import preflight

        preflight(config)  # exactly the checks the run makes before it writes anything
        click.echo(yaml.safe_dump(config.to_dict(), sort_keys=False))
        return
    from ..orchestration.runner import run

    results = run(config, out, resume, store=cache_dir, force=force)
    from ..distributed import current

    if not current().is_main:  # under torchrun, rank 0 prints for the job
        return
    click.echo((Path(results["run_dir"]) / "results.md").read_text())
    click.echo(f"run directory: {results['run_dir']}")


def register(cli: click.Group) -> None:
    """Add the command to the group."""
    cli.add_command(run_command)
