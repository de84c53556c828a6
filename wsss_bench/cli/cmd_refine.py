"""``wsss refine``: a CAM folder -> pseudo masks through a refiner plugin (``wsss list refiners``).

Writes one VOC-palette ``<id>.png`` per image of the split into ``--out`` (single channel: 0
background, ``1..C`` classes, 255 unsure), each atomically, and ``refine.json`` with the
refiner's protocol (its options, the weights file and its sha256, whether a CRF was used).
Score the folder with ``wsss eval --masks``.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Optional

import click

from .. import io
from ..errors import ConfigError

#: The refiner when none is named (works without the CRF extra).
DEFAULT_REFINER = "affinity-rw"


def refine_settings(refiner: Optional[str], weights: Optional[Path], sets: tuple[str, ...]) -> tuple[str, dict[str, Any]]:
    """The refiner name and options from ``--refiner``, ``--weights`` and ``--set refine.*``."""
    from ..config import deep_merge, parse_override

    layer: dict[str, Any] = {}
    for text in sets:
        override = parse_override(text)
        if set(override) != {"refine"}:
            raise ConfigError(f"--set {text!r}: wsss refine takes refine.name and refine.options.* only")
        layer = deep_merge(layer, override)
    section = layer.get("refine") or {}
    if not isinstance(section, dict) or set(section) - {"name", "options"}:
        raise ConfigError("--set refine.*: only refine.name and refine.options.KEY exist")
    options = dict(section.get("options") or {})
    if weights is not None:
        options["weights"] = str(weights)
    name = refiner or section.get("name") or DEFAULT_REFINER
    return str(name), options


def cam_folder_options(default_split: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """The options ``refine`` and ``train-aff`` share: refiner, CAMs, data, split, labels, device."""
    def decorate(command: Callable[..., Any]) -> Callable[..., Any]:
        for option in reversed([
            click.option("--refiner", help=f"Refiner plugin (default {DEFAULT_REFINER}; `wsss list refiners`)."),
            click.option("--cams", "cam_dir", required=True, type=click.Path(path_type=Path),
                         help="Folder of <id>.npz CAM files."),
            click.option("--data-root", required=True, type=click.Path(path_type=Path),
                         help="VOC-layout root (split lists, images)."),
            click.option("--split", default=default_split, show_default=True, help="Split list to use."),
            click.option("--set", "sets", multiple=True, metavar="KEY=VALUE",
                         help="refine.name=NAME or refine.options.KEY=VALUE (YAML values)."),
            click.option("--labels", "labels_file", type=click.Path(path_type=Path), help="Image-level labels JSON."),
            click.option("--max-images", type=click.IntRange(min=1), help="Use only the split's first N images."),
            click.option("--device", default="auto", show_default=True),
        ]):
            command = option(command)
        return command
    return decorate


@click.command("refine")
@cam_folder_options("train")
@click.option("--out", "out_dir", required=True, type=click.Path(path_type=Path), help="Folder for the <id>.png masks.")
@click.option("--weights", type=click.Path(path_type=Path),
              help="The refiner's weights, e.g. PSA's released res38_aff.pth (sets refine.options.weights).")
def refine_command(refiner: Optional[str], cam_dir: Path, data_root: Path, split: str, out_dir: Path,
                   weights: Optional[Path], sets: tuple[str, ...], labels_file: Optional[Path],
                   max_images: Optional[int], device: str) -> None:
    """Refine CAM files into pseudo masks (PSA's random walk by default)."""
    from ..data.voc import open_split
    from ..device import resolve_device
    from ..refinement import refine_folder

    name, options = refine_settings(refiner, weights, sets)
    dataset = open_split(data_root, split, labels_file).subset(max_images)
    summary = refine_folder(name, options, cam_dir, dataset, out_dir, resolve_device(device))
    io.write_json(Path(out_dir) / "refine.json", summary)
    click.echo(f"wrote {summary['images']} masks of split {split!r} to {out_dir} (refiner {name}, "
               f"crf: {summary['protocol'].get('crf', 'absent')})")


@click.command("train-aff")
@cam_folder_options("train_aug")
@click.option("--out", "out_dir", required=True, type=click.Path(path_type=Path),
              help="Folder for affinity.pth (the weights) and train-aff.json.")
@click.option("--backbone", help="Backbone plugin (default: read off --init-weights).")
@click.option("--init-weights", type=click.Path(path_type=Path),
              help="Classifier checkpoint whose backbone initialises AffinityNet's (e.g. the run's final round).")
def train_aff_command(refiner: Optional[str], cam_dir: Path, data_root: Path, split: str, out_dir: Path,
                      backbone: Optional[str], init_weights: Optional[Path], sets: tuple[str, ...],
                      labels_file: Optional[Path], max_images: Optional[int], device: str) -> None:
    """Train AffinityNet (PSA) on a split's CAMs; then `wsss refine --weights OUT/affinity.pth`."""
    from ..data.voc import open_split
    from ..device import resolve_device
    from ..evaluation.camfiles import check_cam_dir
    from ..plugins import registry

    name, options = refine_settings(refiner, None, sets)
    if backbone is not None:
        options["backbone"] = backbone
    if init_weights is not None:
        options["init_weights"] = str(init_weights)
    dataset = open_split(data_root, split, labels_file).subset(max_images)
    check_cam_dir(cam_dir, dataset.ids, dataset.split)
    made = registry("refiner").create(name, **options)
    if not callable(getattr(made, "fit", None)):
        raise ConfigError(f"refiner {name!r} has no fit(): it needs no training")
    dev = resolve_device(device)
    weights = made.fit(dataset, cam_dir, Path(out_dir) / "affinity.pth", dev, show_progress=True)
    io.write_json(Path(out_dir) / "train-aff.json", {"refiner": name, "options": options, "split": split,
                                                    "images": len(dataset.ids), "protocol": made.protocol})
    click.echo(f"trained {name} on {len(dataset.ids)} images of split {split!r}: {weights} "
               f"(then: wsss refine --refiner {name} --weights {weights} ...)")


def register(cli: click.Group) -> None:
    """Add the commands to the group."""
    cli.add_command(refine_command)
    cli.add_command(train_aff_command)
