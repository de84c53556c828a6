"""Opening the data a config names: the dataset plugin's tree (generated or found) and its splits.

Public API for plugins and commands: :func:`open_datasets` gives the training split and the
evaluation splits exactly as ``wsss run`` opens them.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

from ..components import create_dataset
from ..contracts import check_prepared_root
from ..plugins import registry
from ..config import RunConfig
from ..errors import ConfigError, DataError
from .voc import VOCDataset, open_split


def cache_dir() -> Path:
    """Where generated datasets are cached (``WSSS_BENCH_CACHE`` or ``~/.cache/wsss-bench``)."""
    return Path(os.environ.get("WSSS_BENCH_CACHE", Path.home() / ".cache" / "wsss-bench"))


def resolve_data_root(config: RunConfig) -> tuple[Path, Optional[list[str]]]:
    """The VOC-layout root to read, preparing it with the dataset plugin when one is named."""
    ds = config.dataset
    if ds.name is None:
        if ds.root is None:
            raise ConfigError("no dataset: give --data-root DIR or a dataset name")
        return Path(ds.root), None
    plugin = create_dataset(ds.name, **ds.options)
    root = check_prepared_root(plugin.prepare(Path(ds.root) if ds.root else None, cache_dir()),
                               registry("dataset").get(ds.name))
    return root, getattr(plugin, "class_names", None)


def open_datasets(config: RunConfig, require_masks: bool = True
                  ) -> tuple[VOCDataset, dict[str, VOCDataset]]:
    """The training split and the evaluation splits (which must have masks to be scored)."""
    root, names = resolve_data_root(config)
    ds = config.dataset
    train = open_split(root, ds.train_split, ds.labels_file, names).subset(ds.max_images)
    evals = {}
    for split in ds.eval_splits:
        evals[split] = open_split(root, split, ds.labels_file, names).subset(ds.max_images)
        if require_masks and evals[split].mask_dir is None:
            raise DataError(f"{root}: split {split!r} has no ground-truth masks to evaluate against")
    return train, evals
