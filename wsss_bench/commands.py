"""Public API for commands, the host's and plugins': the standard config flags and their mapping
onto a :class:`~wsss_bench.config.RunConfig`.

A plugin command (``register_commands`` hook or ``wsss_bench.commands`` entry point) decorates
itself with :func:`config_options` and calls :func:`resolve_config` with the flags it received,
so ``--preset``, ``--config``, ``--set``, ``--data-root`` ... mean the same in every command.
Importing this module costs click and pydantic only (no torch).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Optional

import click

from .config import RunConfig, load_config
from .errors import ConfigError


def config_options(func: Callable[..., Any]) -> Callable[..., Any]:
    """Decorate a command with the options that resolve a :class:`RunConfig`."""
    options = [
        click.option("--preset", help="Preset from configs/presets (default: 'default'; 'smoke' is tiny)."),
        click.option("--config", "config_file", type=click.Path(path_type=Path), multiple=True,
                     help="YAML config file layered over the preset (once; it may name a preset)."),
        click.option("--set", "sets", multiple=True, metavar="KEY=VALUE",
                     help="Override one config value, e.g. --set train.epochs=3 (repeatable)."),
        click.option("--method", help="CAM method plugin (see `wsss list methods`)."),
        click.option("--backbone", help="Backbone plugin, e.g. resnet38d or timm:resnet18."),
        click.option("--dataset", help="Dataset plugin (default synthetic; 'voc' with --data-root)."),
        click.option("--data-root", type=click.Path(path_type=Path),
                     help="VOC-layout root, e.g. /data/VOCdevkit/VOC2012."),
        click.option("--device", help="auto (default), cpu, cuda or cuda:N."),
        click.option("--seed", type=int, help="Seed for python, numpy, torch and the clusterer."),
        click.option("--quiet", is_flag=True, default=False, help="No progress bars, logs only."),
        click.option("--stages", metavar="LIST",
                     help="Pipeline stages, comma-separated: cam (default), cam,refine or cam,refine,segment."),
    ]
    for option in reversed(options):
        func = option(func)
    return func


def resolve_config(preset: Optional[str], config_file: Any, sets: tuple[str, ...],
                   method: Optional[str], backbone: Optional[str], dataset: Optional[str],
                   data_root: Optional[Path], device: Optional[str], seed: Optional[int],
                   quiet: bool, stages: Optional[str] = None, **_: Any) -> RunConfig:
    """Layer the command-line flags between the config file and ``--set``."""
    if isinstance(config_file, (tuple, list)):
        if len(config_file) > 1:
            # Keeping the last one silently dropped the others; there is no merge order a user
            # could guess, so say so instead.
            raise ConfigError(f"--config given {len(config_file)} times ({', '.join(map(str, config_file))}); "
                              "give one file (it may set `preset:`) and add single values with --set")
        config_file = config_file[0] if config_file else None
    flags: dict[str, Any] = {}
    if method:
        flags["method"] = {"name": method}
    if backbone:
        flags["backbone"] = {"name": backbone}
    if data_root is not None:
        # A root without a dataset name is read as the VOC-layout tree it is.
        flags["dataset"] = {"root": str(data_root), "name": dataset}
    elif dataset:
        flags["dataset"] = {"name": dataset}
    if device:
        flags["device"] = device
    if seed is not None:
        flags["seed"] = seed
    if quiet:
        flags["quiet"] = True
    if stages:
        flags["stages"] = [part.strip() for part in stages.split(",") if part.strip()]
    return load_config(preset, config_file, [flags], list(sets))
