"""An example third-party wsss-bench plugin: uniformly random sub-categories.

Install it (``pip install examples/wsss-random-clusterer``) and it shows up in ``wsss plugins``
and ``wsss list clusterers``; use it with ``--set method.options.clusterer.name=random``.
It is the floor any real clustering algorithm should beat in ``configs/bench/clusterers.yaml``.
"""
from __future__ import annotations

from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict

from wsss_bench import hookimpl


class RandomOptions(BaseModel):
    """No options."""

    model_config = ConfigDict(extra="forbid")


class RandomClusterer:
    """Assigns each row a uniformly random label in ``[0, min(k, N))``."""

    def fit_predict(self, features: np.ndarray, k: int, seed: int) -> np.ndarray:
        k_eff = max(1, min(k, len(features)))
        return np.random.default_rng(seed).integers(0, k_eff, len(features)).astype(np.int64)


@hookimpl
def register_clusterers(register: Any) -> None:
    register("random", RandomClusterer, help="uniformly random sub-categories (a baseline)",
             options=RandomOptions)
