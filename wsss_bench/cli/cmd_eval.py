"""``wsss eval``: score a folder of CAM files."""
from __future__ import annotations

import time
from pathlib import Path
from typing import Optional

import click

from .. import io
from ..errors import ConfigError
from ..evaluation import DEFAULT_THRESHOLD
from ..evaluation.tables import results_markdown


@click.command("eval")
@click.option("--cams", "cam_dir", type=click.Path(path_type=Path), help="Folder of <id>.npz CAM files.")
@click.option("--masks", "mask_dir", type=click.Path(path_type=Path),
              help="Or a folder of <id>.png label maps (ours, PSA's --out_rw, IRN's sem_seg).")
@click.option("--ignore-policy", type=click.Choice(["background", "ignore"]), default="background",
              show_default=True, help="With --masks: unsure (255) pixels count as background, or are left out.")
@click.option("--data-root", required=True, type=click.Path(path_type=Path), help="VOC-layout root with masks.")
@click.option("--split", default="train", show_default=True, help="Split list to score.")
@click.option("--threshold", default=DEFAULT_THRESHOLD, show_default=True, type=click.FloatRange(0, 1), help="Constant background score.")
@click.option("--labels", "labels_file", type=click.Path(path_type=Path), help="Image-level labels JSON (else from masks).")
@click.option("--max-images", type=click.IntRange(min=1),
              help="Score only the split's first N images (as a run with dataset.max_images=N).")
@click.option("--device", default="auto", show_default=True)
@click.option("--out", type=click.Path(path_type=Path), help="Write results.json and results.md here.")
def eval_command(cam_dir: Optional[Path], mask_dir: Optional[Path], ignore_policy: str, data_root: Path,
                 split: str, threshold: float, labels_file: Optional[Path], max_images: Optional[int],
                 device: str, out: Optional[Path]) -> None:
    """Score CAM files, or label-map PNGs, against ground-truth masks (mIoU, per-class IoU)."""
    from ..data.voc import open_split
    from ..device import resolve_device
    from ..evaluation.evaluate import evaluate_cams, result_row
    from ..evaluation.masks import evaluate_masks

    if (cam_dir is None) == (mask_dir is None):
        raise ConfigError("give one of --cams DIR (CAM files) or --masks DIR (label-map PNGs)")
    start = time.perf_counter()
    dataset = open_split(data_root, split, labels_file).subset(max_images)
    dev = resolve_device(device)
    if mask_dir is not None:
        result = evaluate_masks(mask_dir, dataset, ignore_policy, dev)
        row = result_row(result, "eval", "masks", mask_dir)
    else:
        result = evaluate_cams(cam_dir, dataset, threshold, dev)
        row = result_row(result, "eval", "parent", cam_dir)
    fixed = mask_dir is None
    results = {"method": "eval", "backbone": "-", "dataset": str(data_root), "seed": None,
               "device": str(dev), "threshold_policy": "fixed" if fixed else None,
               "threshold": threshold if fixed else None,
               "eval_splits": [split], "miou": {split: result.miou}, "rows": [row], "final": [row],
               "wall_time_s": round(time.perf_counter() - start, 2)}
    text = results_markdown(results)
    if out is not None:
        io.write_json(out / "results.json", results)
        io.write_text(out / "results.md", text)
    click.echo(text)


def register(cli: click.Group) -> None:
    """Add the command to the group."""
    cli.add_command(eval_command)
