"""``wsss data``: dataset utilities (plugins add sub-commands such as ``synth``)."""
from __future__ import annotations

from pathlib import Path

import click

from .common import WsssGroup


@click.group("data", cls=WsssGroup)
def data_group() -> None:
    """Prepare and inspect datasets."""


@data_group.command("check")
@click.option("--data-root", required=True, type=click.Path(path_type=Path))
@click.option("--split", "splits", multiple=True, default=("train",), show_default=True)
def check_command(data_root: Path, splits: tuple[str, ...]) -> None:
    """Validate a VOC-layout tree: split lists, images, masks, labels."""
    from ..data.voc import open_split

    for split in splits:
        ds = open_split(data_root, split)
        masked = 0
        for image_id in ds.ids:
            image = ds.load_image(image_id)
            if ds.mask_dir is not None and ds.mask_path(image_id).is_file():
                ds.load_mask(image_id, image.size)
                masked += 1
        # `wsss eval` needs a mask for every image: say so here rather than "ok".
        if masked == len(ds.ids):
            verdict = "ok"
        elif masked == 0:
            verdict = "ok for training, no masks: not scorable"
        else:
            verdict = f"ok for training; masks for {masked} of {len(ds.ids)} images: not scorable as a whole"
        click.echo(f"{split}: {len(ds.ids)} images, {ds.num_classes} classes: {verdict}")


def register(cli: click.Group) -> None:
    """Add the group to the CLI."""
    cli.add_command(data_group)
