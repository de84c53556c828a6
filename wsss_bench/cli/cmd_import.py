"""``wsss import``: convert CAM files of IRN, PSA, SC-CAM or plain arrays to our ``.npz`` format."""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import click

from ..importers import FORMATS


@click.command("import")
@click.option("--format", "fmt", required=True, type=click.Choice(FORMATS),
              help="Input format: irn (dict keys/cam/high_res), psa / sccam (dict {class: map}), "
                   "npy-dir (plain [C, H, W] arrays).")
@click.argument("in_dir", type=click.Path(path_type=Path, file_okay=False))
@click.option("--out", "out_dir", required=True, type=click.Path(path_type=Path, file_okay=False),
              help="Output folder for <id>.npz files (created).")
@click.option("--trust-pickle", is_flag=True, default=False,
              help="Allow loading pickled inputs (irn, psa, sccam). Pickles can run code: only "
                   "for files you trust.")
@click.option("--overwrite", is_flag=True, default=False, help="Replace existing <id>.npz outputs.")
@click.option("--num-classes", default=20, show_default=True, type=click.IntRange(1, 254),
              help="Number of foreground classes; class ids must be below it.")
@click.option("--no-normalize", "no_normalize", is_flag=True, default=False,
              help="Refuse maps outside [0, 1] instead of dividing them by their max.")
@click.option("--size-from", type=click.Path(path_type=Path, file_okay=False),
              help="VOC root: check map sizes against JPEGImages/<id>.jpg and upsample IRN "
                   "stride-4 'cam' maps when 'high_res' is missing.")
@click.option("--has-background", is_flag=True, default=False,
              help="npy-dir: channel 0 is background (dropped).")
@click.option("--labels", type=click.Path(path_type=Path),
              help="npy-dir: cls_labels.json or a VOC root; keep the labelled classes (default: "
                   "classes whose map is not all zero).")
@click.option("--skip-invalid", is_flag=True, default=False,
              help="Skip malformed inputs (listed in the summary) instead of stopping.")
@click.option("--quiet", is_flag=True, default=False, help="No progress bar.")
def import_command(fmt: str, in_dir: Path, out_dir: Path, trust_pickle: bool, overwrite: bool,
                   num_classes: int, no_normalize: bool, size_from: Optional[Path],
                   has_background: bool, labels: Optional[Path], skip_invalid: bool,
                   quiet: bool) -> None:
    """Convert a folder of foreign CAM files IN_DIR/<id>.npy into OUT/<id>.npz.

    \b
    Nothing is written unless every input converts (see --skip-invalid).
    Examples:
      wsss import --format irn result/cam --out cams/irn --trust-pickle
      wsss import --format sccam save/output_CAM_npy/cls_20 --out cams/sccam --trust-pickle
      wsss import --format npy-dir my_cams --out cams/mine --has-background --labels VOC_ROOT
    """
    from ..importers import import_cams

    summary = import_cams(
        fmt, in_dir, out_dir, trust_pickle, overwrite=overwrite, num_classes=num_classes,
        normalize=not no_normalize, size_from=size_from, has_background=has_background,
        labels=labels, skip_invalid=skip_invalid, progress=not quiet and sys.stderr.isatty(),
        warn=lambda message: click.echo(f"warning: {message}", err=True))
    for line in summary.lines():
        click.echo(line)


def register(cli: click.Group) -> None:
    """Add the command to the group."""
    cli.add_command(import_command)
