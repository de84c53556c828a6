"""wsss-bench: weakly-supervised semantic segmentation toolkit.

Importing the package is cheap: the torch-heavy parts (:func:`run`, :func:`evaluate`) load on
first use, so a plugin importing :data:`hookimpl` costs nothing.
"""
from __future__ import annotations

from typing import Any

from .components import (
    create_backbone,
    create_clusterer,
    create_dataset,
    create_launcher,
    create_method,
    create_refiner,
    list_backbones,
    list_clusterers,
    list_datasets,
    list_launchers,
    list_methods,
    list_refiners,
)
from .errors import UserError
from .hookspecs import hookimpl

__version__ = "0.1.0"

_LAZY = {
    "run": ("wsss_bench.orchestration.runner", "run"),
    "evaluate": ("wsss_bench.evaluation.evaluate", "evaluate_cam_dir"),
    "load_config": ("wsss_bench.config", "load_config"),
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        module, attr = _LAZY[name]
        return getattr(importlib.import_module(module), attr)
    raise AttributeError(f"module 'wsss_bench' has no attribute {name!r}")


__all__ = [
    "__version__", "hookimpl", "UserError", "run", "evaluate", "load_config",
    "create_backbone", "create_clusterer", "create_dataset", "create_launcher", "create_method",
    "create_refiner", "list_backbones", "list_clusterers", "list_datasets", "list_launchers", "list_methods",
    "list_refiners",
]
