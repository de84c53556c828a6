"""Shared by dataset plugins that generate a VOC-layout tree (the synthetic set, Fashion scenes).

Public API for plugin authors, so that generators do not import each other:

* :func:`encode_jpeg`, :func:`encode_png`, :func:`dump_json`: deterministic file bytes;
* :func:`install_tree`: build a tree in a temporary sibling folder and rename it into place, so
  a crash never leaves a partial tree where a complete one is expected;
* :func:`read_marker` and :func:`replaceable`: the tree's completeness marker (a JSON file
  written last) and whether an existing folder may be replaced by a generator;
* :func:`option_flags`: one ``--flag`` per field of a pydantic options model;
* :func:`add_data_command`: add a sub-command to ``wsss data``;
* :func:`generator_command`: the ``wsss data <name> --out DIR [--preview PNG] [--option ...]``
  command of a generator, built from its options model;
* :func:`options_error`: a pydantic error on one line, for the plugin's own messages;
* :func:`write_preview`: a PNG grid of images beside their colourised masks.
"""
from __future__ import annotations

import io
import json
import os
import shutil
from pathlib import Path
from typing import Any, Callable

import click
import numpy as np
from PIL import Image
from pydantic import BaseModel, ValidationError

from ..errors import FileSystemError, PluginError, UserError, describe_os_error
from ..registry import format_validation_error
from .voc import voc_palette


def encode_jpeg(image: np.ndarray, quality: int) -> bytes:
    """JPEG bytes of an RGB uint8 image, 4:4:4 chroma (small coloured details stay sharp)."""
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="JPEG", quality=quality, subsampling=0)
    return buf.getvalue()


def encode_png(mask: np.ndarray) -> bytes:
    """PNG bytes of a uint8 index mask (mode 'L')."""
    buf = io.BytesIO()
    Image.fromarray(mask).save(buf, format="PNG")
    return buf.getvalue()


def dump_json(obj: Any, sort_keys: bool = True) -> bytes:
    """Indented JSON bytes with a final newline (stable across runs)."""
    return (json.dumps(obj, indent=1, sort_keys=sort_keys) + "\n").encode()


def read_marker(root: Path, name: str) -> dict[str, Any] | None:
    """The JSON object in ``root/name`` (a generator's marker, written last), or None."""
    try:
        meta = json.loads((Path(root) / name).read_text())
    except (OSError, ValueError):
        return None
    return meta if isinstance(meta, dict) else None


def replaceable(folder: Path, marker: str, generator: str) -> bool:
    """Whether ``folder`` may be replaced: it is empty, or a tree written by ``generator``."""
    folder = Path(folder)
    if not folder.is_dir():
        return False
    if not any(folder.iterdir()):
        return True
    meta = read_marker(folder, marker)
    return meta is not None and meta.get("generator") == generator


def install_tree(out: Path, write: Callable[[Path], Any], is_complete: Callable[[Path], bool],
                 replaceable: Callable[[Path], bool], what: str) -> tuple[Path, bool]:
    """Make ``out`` hold a complete tree; returns ``(out, written)`` (False: reused as it was).

    ``write(folder)`` fills a fresh folder; ``is_complete(folder)`` says whether a folder
    already holds the wanted tree; ``replaceable(folder)`` whether an existing, different
    ``out`` may be replaced (empty, or a tree of the same generator).  The tree is written to
    ``<out>.tmp-<pid>`` and renamed into place; whatever was at ``out`` is moved aside first, so
    readers never see a half-replaced folder.
    """
    out = Path(out)
    if is_complete(out):
        return out, False
    if out.exists() and not replaceable(out):
        raise UserError(f"{out} exists and is not a {what}; refusing to overwrite it "
                        "(choose an empty or new folder)")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f"{out.name}.tmp-{os.getpid()}")
    old = out.with_name(f"{out.name}.old-{os.getpid()}")
    try:
        if tmp.exists():  # left over by a crashed run that had our pid
            shutil.rmtree(tmp)
        try:
            write(tmp)
        except OSError as exc:  # a full disk mid-tree: name the tree (the finally removes it)
            raise FileSystemError(describe_os_error(exc, out, f"cannot write the {what}")) from None
        if out.exists():
            os.replace(out, old)
        try:
            os.replace(tmp, out)
        except OSError:
            # Another process installed its copy between our checks: fine if it is the same.
            if is_complete(out):
                return out, False
            raise
    finally:
        for leftover in (tmp, old):
            if leftover.exists():
                shutil.rmtree(leftover, ignore_errors=True)
    return out, True


def option_flags(model: type[BaseModel]) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """A decorator adding one ``--flag`` per field of ``model``, so a CLI never drifts from it."""

    def decorate(command: Callable[..., Any]) -> Callable[..., Any]:
        for name, info in reversed(list(model.model_fields.items())):
            flag = "--" + name.replace("_", "-")
            if info.annotation is bool:
                command = click.option(f"{flag}/--no-{name.replace('_', '-')}", name, default=info.default,
                                       show_default=True, help=info.description)(command)
            else:
                ptype = {int: int, float: float}.get(info.annotation, str)  # type: ignore[arg-type]
                command = click.option(flag, name, type=ptype, default=info.default,
                                       show_default=True, help=info.description)(command)
        return command

    return decorate


def options_error(prefix: str, exc: ValidationError) -> str:
    """``prefix`` followed by the error on one line (model-level errors named ``options``)."""
    return prefix + format_validation_error(exc, root="options")


def generator_command(name: str, help: str, spec_model: type[BaseModel], error_prefix: str,
                      generate: Callable[[Path, Any], tuple[Path, bool]],
                      describe: Callable[[Any, bool], str]) -> click.Command:
    """``wsss data NAME --out DIR [--preview PNG]`` plus one flag per field of ``spec_model``.

    ``generate(out, spec)`` returns ``(path, written)``; ``describe(spec, written)`` the summary
    line printed after the path.
    """

    @click.command(name, help=help)
    @click.option("--out", "out", required=True,
                  type=click.Path(file_okay=False, path_type=Path),
                  help="Folder to write the dataset into (created atomically).")
    @click.option("--preview", type=click.Path(dir_okay=False, path_type=Path), default=None,
                  help="Also save a PNG grid of images and colourised masks here.")
    @option_flags(spec_model)
    def command(out: Path, preview: Path | None, **options: Any) -> None:
        try:
            spec = spec_model(**options)
        except ValidationError as exc:
            raise UserError(options_error(error_prefix, exc)) from None
        path, written = generate(out, spec)
        click.echo(str(path))
        click.echo(describe(spec, written))
        if preview is not None:
            click.echo(f"preview: {write_preview(path, preview)}")

    return command


def add_data_command(cli: click.Group, command: click.Command) -> None:
    """Add ``command`` under ``wsss data`` (creating the group if nothing has yet)."""
    group = cli.commands.get("data")
    if group is None:
        @cli.group("data")
        def group() -> None:
            """Dataset utilities."""
    if not isinstance(group, click.Group):
        raise PluginError(f"the 'data' command is not a group; cannot add 'data {command.name}'")
    group.add_command(command)


def write_preview(root: Path, path: Path, n: int = 12, cols: int = 4, scale: int = 2) -> Path:
    """Save a grid of the first ``n`` train_aug images of a VOC tree, each beside its mask."""
    root = Path(root)
    ids = (root / "ImageSets/Segmentation/train_aug.txt").read_text().split()[:n]
    pal = voc_palette()
    tiles = []
    for image_id in ids:
        img = np.asarray(Image.open(root / "JPEGImages" / f"{image_id}.jpg").convert("RGB"))
        mask = pal[np.asarray(Image.open(root / "SegmentationClassAug" / f"{image_id}.png"))]
        gap = np.full((img.shape[0], 2, 3), 255, np.uint8)
        tiles.append(np.concatenate([img, gap, mask, np.full((img.shape[0], 6, 3), 255,
                                                             np.uint8)], axis=1))
    while len(tiles) % cols:
        tiles.append(np.full_like(tiles[0], 255))
    rows = [np.concatenate(tiles[i:i + cols], axis=1) for i in range(0, len(tiles), cols)]
    sep = np.full((6, rows[0].shape[1], 3), 255, np.uint8)
    grid = np.concatenate([x for r in rows for x in (r, sep)], axis=0)
    im = Image.fromarray(grid)
    im = im.resize((im.width * scale, im.height * scale), Image.NEAREST)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    im.save(path)
    return path
