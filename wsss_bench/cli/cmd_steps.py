"""Single pipeline steps reading and writing the artifacts ``wsss run`` uses.

``wsss train``, ``wsss extract-features`` and ``wsss cams`` are generic; method plugins add
their own steps (SC-CAM adds ``wsss cluster``).  Each works in a run directory (``--out``) that
may already hold other steps' outputs.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import click
import numpy as np

from ..errors import ConfigError, DataError
from .options import config_options, resolve_config


def _pairs(values: tuple[str, ...], what: str) -> dict[str, str]:
    out = {}
    for value in values:
        if "=" not in value:
            raise ConfigError(f"{what} {value!r}: expected HEAD=VALUE, e.g. sub=labels.npy")
        key, val = value.split("=", 1)
        out[key.strip()] = val.strip()
    return out


def _context(flags: dict[str, Any], out: Path, eval_splits: Optional[list[str]] = None,
             require_masks: bool = True, training: bool = True) -> Any:
    from ..orchestration.runner import make_context

    return make_context(resolve_config(**flags), out, resume=True, eval_splits=eval_splits,
                        require_masks=require_masks, training=training)


def load_targets(path: Path, rows: int) -> np.ndarray:
    """A multi-hot target matrix ``[N, K]`` saved with ``np.save`` (never pickled)."""
    try:
        array = np.load(path, allow_pickle=False)
    except FileNotFoundError:
        raise DataError(f"{path}: targets file not found") from None
    except (ValueError, OSError) as exc:
        raise DataError(f"{path}: not a plain .npy array ({exc})") from None
    if array.ndim != 2 or array.shape[0] != rows or not np.isfinite(array).all():
        raise DataError(f"{path}: expected finite targets of shape [{rows}, K], got {array.shape}")
    return array.astype(np.float32)


@click.command("train")
@config_options
@click.option("--out", required=True, type=click.Path(path_type=Path), help="Run directory.")
@click.option("--tag", default="round0", show_default=True, help="Checkpoint name: OUT/checkpoints/TAG.pth.")
@click.option("--targets", multiple=True, metavar="HEAD=FILE.npy", help="Extra head trained on multi-hot targets [N, K], e.g. sub=...")
@click.option("--loss-weight", multiple=True, metavar="HEAD=W", help="Loss weight of an extra head (default 1).")
@click.option("--init-weights", type=click.Path(path_type=Path), help="Backbone initialisation (.params or .pth).")
def train_command(out: Path, tag: str, targets: tuple[str, ...], loss_weight: tuple[str, ...],
                  init_weights: Optional[Path], **flags: Any) -> None:
    """Train a classifier on the training split (parent labels + optional extra heads)."""
    ctx = _context(flags, out, eval_splits=[])
    n = len(ctx.train_set.ids)
    extra = {head: load_targets(Path(path), n) for head, path in _pairs(targets, "--targets").items()}
    try:
        weights = {h: float(w) for h, w in _pairs(loss_weight, "--loss-weight").items()}
    except ValueError:
        raise ConfigError("--loss-weight needs numbers, e.g. sub=5") from None
    sub = extra.get("sub")
    unknown = set(extra) - {"sub"}
    if unknown:
        raise ConfigError(f"--targets: unknown head(s) {sorted(unknown)}; the classifier has 'sub'")
    model = ctx.new_classifier(sub_classes=sub.shape[1] if sub is not None else 0, init_weights=init_weights)
    path = ctx.train(model, tag, extra_targets=extra or None, loss_weights=weights or None)
    if ctx.job.is_main:
        click.echo(f"checkpoint: {path}")


@click.command("extract-features")
@config_options
@click.option("--out", required=True, type=click.Path(path_type=Path), help="Run directory.")
@click.option("--weights", required=True, type=click.Path(path_type=Path), help="Classifier checkpoint (ours, PSA or SC-CAM).")
@click.option("--tag", default="round0", show_default=True, help="Writes OUT/features/TAG.npy.")
def extract_features_command(out: Path, weights: Path, tag: str, **flags: Any) -> None:
    """Image-level features (GAP of the last feature map) of the training split."""
    ctx = _context(flags, out, eval_splits=[], training=False)
    model = ctx.load_classifier(weights)
    feats = ctx.features(model, tag)
    click.echo(f"features {feats.shape}: {ctx.run_dir / 'features' / (tag + '.npy')}")


@click.command("cams")
@config_options
@click.option("--out", required=True, type=click.Path(path_type=Path), help="Run directory.")
@click.option("--weights", required=True, type=click.Path(path_type=Path), help="Classifier checkpoint (ours, PSA res38_cls.pth, SC-CAM).")
@click.option("--head", type=click.Choice(["parent", "sub"]),
              help="Head the CAMs come from (default: the config's cams.head, parent).")
@click.option("--split", "splits", multiple=True, help="Splits to infer (default: the config's eval splits).")
@click.option("--tag", default="final", show_default=True, help="Writes OUT/cams/TAG/<split>/.")
@click.option("--no-eval", is_flag=True, help="Only write CAM files (the split may lack masks).")
def cams_command(out: Path, weights: Path, head: Optional[str], splits: tuple[str, ...], tag: str,
                 no_eval: bool, **flags: Any) -> None:
    """Multi-scale CAM inference from a checkpoint, writing the documented .npz files."""
    from ..engine.cams import infer_split
    from ..evaluation.tables import pct

    ctx = _context(flags, out, eval_splits=list(splits) or None, require_masks=not no_eval, training=False)
    model = ctx.load_classifier(weights)
    head = head or ctx.config.cams.head
    if head not in ("parent", "sub"):
        raise ConfigError(f"cams.head {head!r}: expected parent or sub")
    if head == "sub" and "sub" not in model.heads:
        raise ConfigError(f"{weights}: the checkpoint has no sub-category head")
    if no_eval:
        for split, dataset in ctx.eval_sets.items():
            folder = ctx.run_dir / "cams" / (tag if head == "parent" else f"{tag}-cam-{head}") / split
            infer_split(model, dataset, folder, ctx.config.cams.scales, ctx.config.cams.flip,
                        ctx.device, head, ctx.show_progress, precision=ctx.config.cams.precision,
                        rank=ctx.job.rank, world_size=ctx.job.world_size)
            ctx.job.barrier()
            if ctx.job.is_main:
                click.echo(f"{split}: {folder}")
        return
    for row in ctx.cams_and_scores(model, tag, head=head):
        if ctx.job.is_main:
            click.echo(f"{row['split']}: mIoU {pct(row['miou'])} % ({row['num_images']} images) -> {ctx.run_dir / row['cams']}")


def register(cli: click.Group) -> None:
    """Add the step commands to the group."""
    for command in (train_command, extract_features_command, cams_command):
        cli.add_command(command)
