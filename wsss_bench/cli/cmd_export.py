"""``wsss export-masks``: VOC-palette pseudo-label PNGs from CAM files.

The work is done by :mod:`wsss_bench.evaluation.pseudo_masks`, imported when the command runs
so that ``wsss --help`` does not pay for torch and torchmetrics.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import click

from ..errors import ConfigError
from ..evaluation import DEFAULT_THRESHOLD


@click.command("export-masks")
@click.option("--cams", "cam_dir", required=True, type=click.Path(path_type=Path),
              help="Folder of <id>.npz CAM files.")
@click.option("--data-root", required=True, type=click.Path(path_type=Path),
              help="VOC-layout root (split lists and images).")
@click.option("--split", default="train", show_default=True, help="Split list to export.")
@click.option("--out", "out_dir", required=True, type=click.Path(path_type=Path),
              help="Folder for the <id>.png pseudo-label masks.")
@click.option("--threshold", type=click.FloatRange(0, 1),
              help=f"Constant background score (default {DEFAULT_THRESHOLD}); not with --band.")
@click.option("--band", nargs=2, type=click.FloatRange(0, 1), metavar="LOW HIGH",
              help="Confidence band: best score <= LOW is background, > HIGH the class, "
                   "in between 255 (uncertain).")
@click.option("--labels", "labels_file", type=click.Path(path_type=Path),
              help="Image-level labels JSON (else cls_labels.json or the masks).")
@click.option("--device", default="auto", show_default=True)
def export_masks_command(cam_dir: Path, data_root: Path, split: str, out_dir: Path,
                         threshold: Optional[float], band: Optional[tuple[float, float]],
                         labels_file: Optional[Path], device: str) -> None:
    """Write VOC-palette pseudo-label PNGs from CAM files."""
    from ..data.voc import open_split
    from ..device import resolve_device
    from ..evaluation.pseudo_masks import export_masks

    # click gives an empty tuple for an absent nargs=2 option.
    band = tuple(band) if band else None  # type: ignore[assignment]
    if band is not None and threshold is not None:
        raise ConfigError("give either --threshold or --band, not both (the band replaces the "
                          "single threshold)")
    dataset = open_split(data_root, split, labels_file)
    count = export_masks(cam_dir, dataset, out_dir,
                         DEFAULT_THRESHOLD if threshold is None else threshold, band,
                         resolve_device(device))
    rule = (f"band ({band[0]}, {band[1]}] = 255" if band is not None
            else f"background threshold {DEFAULT_THRESHOLD if threshold is None else threshold}")
    click.echo(f"wrote {count} masks of split {split!r} to {out_dir} ({rule})")


def register(cli: click.Group) -> None:
    """Add the command to the group."""
    cli.add_command(export_masks_command)
