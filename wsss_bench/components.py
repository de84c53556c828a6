"""Public factory and listing functions over the plugin registries."""
from __future__ import annotations

from typing import Any

from .plugins import registry


def create_backbone(name: str, **options: Any) -> Any:
    """Build a backbone by name, e.g. ``create_backbone("timm:resnet18")``."""
    return registry("backbone").create(name, **options)


def create_clusterer(name: str, **options: Any) -> Any:
    """Build a clustering algorithm by name, e.g. ``create_clusterer("kmeans", n_init=10)``."""
    return registry("clusterer").create(name, **options)


def create_method(name: str, **options: Any) -> Any:
    """Build a CAM method by name, e.g. ``create_method("cam")``."""
    return registry("method").create(name, **options)


def create_dataset(name: str, **options: Any) -> Any:
    """Build a dataset plugin object by name, e.g. ``create_dataset("synthetic", seed=1)``."""
    return registry("dataset").create(name, **options)


def create_refiner(name: str, **options: Any) -> Any:
    """Build a refiner by name, e.g. ``create_refiner("affinity-rw", weights="res38_aff.pth")``."""
    return registry("refiner").create(name, **options)


def create_launcher(name: str, **options: Any) -> Any:
    """Build a bench launcher by name, e.g. ``create_launcher("submitit", partition="gpu")``."""
    return registry("launcher").create(name, **options)


def _listing(kind: str) -> dict[str, str]:
    reg = registry(kind)
    return {name: reg.components[name].help for name in reg.names()}


def list_backbones() -> dict[str, str]:
    """Registered backbone names with their one-line help."""
    return _listing("backbone")


def list_clusterers() -> dict[str, str]:
    """Registered clusterer names with their one-line help."""
    return _listing("clusterer")


def list_methods() -> dict[str, str]:
    """Registered CAM method names with their one-line help."""
    return _listing("method")


def list_datasets() -> dict[str, str]:
    """Registered dataset names with their one-line help."""
    return _listing("dataset")


def list_refiners() -> dict[str, str]:
    """Registered refiner names with their one-line help."""
    return _listing("refiner")


def list_launchers() -> dict[str, str]:
    """Registered bench launcher names with their one-line help."""
    return _listing("launcher")
