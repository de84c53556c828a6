"""``wsss segment``: pseudo masks -> a DeepLab-v2 segmentation network -> scored label maps.

Trains :class:`~wsss_bench.engine.segmentation.DeepLabASPP` on the training split's pseudo
masks (``--masks``, from ``wsss refine`` or ``wsss export-masks``), unless ``--weights`` gives a
trained ``segment.pth``; then writes one VOC-palette ``<id>.png`` per image of every evaluation
split into ``OUT/pred/<split>/`` and scores it with the mask scorer (stage ``seg``; a split that
shares images with the training split is marked *seen*).  ``OUT/segment.pth`` holds the weights,
``OUT/segment.json`` the options, backbone, training report and scores.
"""
from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Any, Optional

import click

from .. import io
from ..errors import ConfigError

#: The resume file of an interrupted training (removed once ``segment.pth`` is written).
STATE_FILE = "segment.state.pth"


def segment_settings(backbone: Optional[str], sets: tuple[str, ...],
                     seed: Optional[int]) -> tuple[Optional[dict[str, Any]], dict[str, Any]]:
    """The backbone (``{"name", "options"}``, ``None`` when nothing names one) and the raw
    ``segment.options`` from ``--backbone``, ``--set segment.*`` and ``--seed``."""
    from ..config import deep_merge, parse_override

    layer: dict[str, Any] = {}
    for text in sets:
        override = parse_override(text)
        if set(override) != {"segment"}:
            raise ConfigError(f"--set {text!r}: wsss segment takes segment.options.KEY and "
                              "segment.backbone.name / segment.backbone.options.KEY only")
        layer = deep_merge(layer, override)
    section = layer.get("segment") or {}
    if not isinstance(section, dict) or set(section) - {"options", "backbone"}:
        raise ConfigError("--set segment.*: only segment.options.KEY and segment.backbone.* exist")
    chosen = section.get("backbone") or {}
    if not isinstance(chosen, dict) or set(chosen) - {"name", "options"}:
        raise ConfigError("--set segment.backbone.*: only segment.backbone.name and "
                          "segment.backbone.options.KEY exist")
    options = dict(section.get("options") or {})
    if seed is not None:
        options["seed"] = seed
    name = backbone or chosen.get("name")
    if name is None and "options" not in chosen:
        return None, options
    default = run_default_backbone()
    if name is None or name == default["name"]:
        # The run default's options, with the given ones on top (as `wsss run` merges them).
        spec = {"name": default["name"], "options": {**default["options"], **(chosen.get("options") or {})}}
    else:  # another backbone: the default's options were written for that one, not this
        spec = {"name": str(name), "options": dict(chosen.get("options") or {})}
    return spec, options


def run_default_backbone() -> dict[str, Any]:
    """The backbone ``wsss run`` uses by default (``configs/base.yaml``)."""
    from ..config import load_config

    return load_config().backbone.model_dump()


def _options(raw: dict[str, Any]) -> Any:
    from pydantic import ValidationError

    from ..engine.segmentation import SegmentOptions
    from ..registry import format_validation_error

    try:
        return SegmentOptions(**raw)
    except ValidationError as exc:
        raise ConfigError(f"invalid segment.options: {format_validation_error(exc, 'segment.options')}") from None
    except TypeError as exc:
        raise ConfigError(f"invalid segment.options: {exc}") from None


def _state_key(spec: dict[str, Any], options: Any, dataset: Any, mask_dir: Path) -> str:
    """What a resumable training depends on: backbone, options, images and the masks' bytes."""
    h = hashlib.sha256(json.dumps({"backbone": spec, "options": options.model_dump(mode="json"),
                                   "root": str(dataset.root), "ids": dataset.ids}, sort_keys=True).encode())
    for image_id in dataset.ids:
        h.update(io.file_sha256(Path(mask_dir) / f"{image_id}.png").encode())
    return h.hexdigest()


@click.command("segment")
@click.option("--masks", "mask_dir", type=click.Path(path_type=Path),
              help="Pseudo masks <id>.png of the training split (wsss refine / wsss export-masks).")
@click.option("--data-root", required=True, type=click.Path(path_type=Path),
              help="VOC-layout root (split lists, images, ground truth of the evaluation splits).")
@click.option("--train-split", default="train", show_default=True, help="Split the masks belong to.")
@click.option("--eval-split", "eval_splits", multiple=True,
              help="Split to predict and score (repeatable; default: val).")
@click.option("--out", "out_dir", required=True, type=click.Path(path_type=Path),
              help="Folder for segment.pth, segment.json and pred/<split>/.")
@click.option("--backbone", help="Backbone plugin (default: the run default, efficientnet_lite lite0 stride 16).")
@click.option("--set", "sets", multiple=True, metavar="KEY=VALUE",
              help="segment.options.KEY=VALUE, segment.backbone.name=NAME or "
                   "segment.backbone.options.KEY=VALUE (YAML values).")
@click.option("--weights", type=click.Path(path_type=Path),
              help="A trained segment.pth: skip training (and --masks), only predict and score.")
@click.option("--max-images", type=click.IntRange(min=1), help="Use only each split's first N images.")
@click.option("--labels", "labels_file", type=click.Path(path_type=Path), help="Image-level labels JSON.")
@click.option("--device", default="auto", show_default=True)
@click.option("--seed", type=click.IntRange(0, 2**32 - 1), help="Sets segment.options.seed (default 0).")
def segment_command(mask_dir: Optional[Path], data_root: Path, train_split: str, eval_splits: tuple[str, ...],
                    out_dir: Path, backbone: Optional[str], sets: tuple[str, ...], weights: Optional[Path],
                    max_images: Optional[int], labels_file: Optional[Path], device: str,
                    seed: Optional[int]) -> None:
    """Train DeepLab-v2 (ASPP head) on pseudo masks, predict and score the evaluation splits."""
    from ..data.voc import open_split
    from ..device import resolve_device
    from ..engine import segmentation as seg
    from ..errors import DataError
    from ..evaluation.masks import evaluate_masks
    from ..evaluation.tables import markdown_table, pct

    start = time.perf_counter()
    spec, raw_options = segment_settings(backbone, sets, seed)
    if weights is None and mask_dir is None:
        raise ConfigError("give --masks DIR (the training split's pseudo masks) or --weights FILE (a trained segment.pth)")
    if weights is not None and spec is not None:
        raise ConfigError("--weights: the backbone comes from the checkpoint; drop --backbone / "
                          "--set segment.backbone.*")
    dev = resolve_device(device)
    out_dir = Path(out_dir)
    model: Any
    report = None
    if weights is not None:
        model = seg.load_segmentation(weights)
        # The checkpoint's own options (inference settings included) under the given ones.
        options = _options({**(model.meta.get("options") or {}), **raw_options})
        spec = dict(model.backbone_spec or {})
        train_ids = set(model.meta.get("train_ids") or [])
        if not train_ids:  # a checkpoint of `wsss run`: its training split is --train-split
            try:
                train_ids = set(open_split(data_root, train_split, labels_file).subset(max_images).ids)
            except DataError:
                train_ids = set()
        weights_path = Path(weights)
    else:
        spec = spec or run_default_backbone()
        options = _options(raw_options)
    if options.crf:
        seg.crf_function()  # a missing CRF extra: one line now, not after the training
    split_names = list(dict.fromkeys(eval_splits or ("val",)))
    eval_sets = {}
    for split in split_names:
        eval_sets[split] = open_split(data_root, split, labels_file).subset(max_images)
        if eval_sets[split].mask_dir is None:
            raise DataError(f"{data_root}: split {split!r} has no ground-truth masks to score against")
    if weights is None:
        assert mask_dir is not None
        train_set = open_split(data_root, train_split, labels_file).subset(max_images)
        seg.check_pseudo_masks(mask_dir, train_set)  # before building anything: bad masks are one line
        model = seg.build_segmentation(spec["name"], spec["options"], train_set.num_classes, options)
        state_file = out_dir / STATE_FILE
        trained = seg.train_segmentation(model, train_set, mask_dir, options, dev, show_progress=True,
                                         state_file=state_file,
                                         state_key=_state_key(spec, options, train_set, mask_dir))
        report = trained.to_dict()
        weights_path = out_dir / "segment.pth"
        train_ids = set(train_set.ids)
        seg.save_segmentation(weights_path, model, {
            "backbone": spec, "options": options.model_dump(mode="json"), "train_split": train_split,
            "train_ids": train_set.ids, "masks": str(mask_dir), "train": report})
        state_file.unlink(missing_ok=True)
    first = next(iter(eval_sets.values()))
    if model.num_classes != first.num_classes:
        raise ConfigError(f"{weights_path}: the network predicts {model.num_classes} classes but "
                          f"{data_root} has {first.num_classes}")
    model.to(dev).eval()
    splits: dict[str, Any] = {}
    rows = []
    for split, dataset in eval_sets.items():
        pred_dir = out_dir / "pred" / split
        seg.predict_split(model, dataset, pred_dir, options, dev, show_progress=True)
        result = evaluate_masks(pred_dir, dataset, "background", dev, stage="seg")
        seen_images = len(train_ids & set(dataset.ids))
        protocol = {**result.protocol, "seen": seen_images > 0, "seen_images": seen_images,
                    "crf": "used" if options.crf else "absent", "segment_backbone": spec.get("name")}
        splits[split] = {"miou": result.miou, "num_images": result.num_images, "seen": seen_images > 0,
                         "predictions": str(pred_dir), "protocol": protocol, "per_class": result.per_class}
        stage = "seg (seen)" if seen_images else "seg"
        rows.append([split, stage, pct(result.miou), result.num_images])
    summary = {"command": "segment", "data_root": str(data_root), "train_split": train_split,
               "masks": str(mask_dir) if weights is None else None, "weights": str(weights_path),
               "weights_sha256": io.file_sha256(weights_path), "backbone": spec,
               "options": options.model_dump(mode="json"), "device": str(dev), "train": report,
               "miou": {s: v["miou"] for s, v in splits.items()}, "splits": splits,
               "wall_time_s": round(time.perf_counter() - start, 2)}
    io.write_json(out_dir / "segment.json", summary)
    trained_how = (f"trained {options.epochs} epochs on {report['images']} images of {train_split!r} "
                   f"in {report['seconds']:.0f} s" if report else f"weights {weights_path}")
    click.echo(f"DeepLab-v2 ASPP on {spec.get('name')} ({trained_how}); wall time "
               f"{summary['wall_time_s']:.0f} s\n")
    click.echo(markdown_table(["split", "stage", "mIoU (%)", "images"], rows))
    click.echo(f"\nwrote {weights_path}, {out_dir / 'segment.json'} and {out_dir / 'pred'}/<split>/")


def register(cli: click.Group) -> None:
    """Add the command to the group."""
    cli.add_command(segment_command)
