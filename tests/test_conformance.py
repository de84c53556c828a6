"""Every registered component passes its kind's conformance checks (wsss_bench.testing), the
same kit a third-party plugin's tests use."""
from __future__ import annotations

import pytest

from wsss_bench.errors import DataError
from wsss_bench.testing import Case, check_component, parametrize_plugins

pytestmark = [
    pytest.mark.filterwarnings("ignore:Graph is not fully connected:UserWarning"),
    pytest.mark.filterwarnings("ignore:Number of distinct clusters:sklearn.exceptions.ConvergenceWarning"),
]


@parametrize_plugins("backbone")
def test_backbone_conforms(case: Case) -> None:
    check_component(case)


@parametrize_plugins("clusterer")
def test_clusterer_conforms(case: Case) -> None:
    check_component(case)


@parametrize_plugins("method")
def test_method_conforms(case: Case) -> None:
    check_component(case)


@parametrize_plugins("dataset")
def test_dataset_conforms(case: Case) -> None:
    try:
        check_component(case)
    except DataError as exc:
        if "fashion" in case.name and "dataset-fashion-mnist" in str(exc):
            pytest.skip(f"Fashion-MNIST source not installed: {exc}")
        raise


def test_the_kit_catches_an_off_by_one_clusterer() -> None:
    import numpy as np

    from wsss_bench import hookimpl, plugins
    from wsss_bench.errors import PluginError
    from wsss_bench.testing import cases

    class OffByOne:
        def fit_predict(self, features, k, seed):  # noqa: ANN001, ANN201
            return np.arange(len(features)) % k + 1

    class Plugin:
        @hookimpl
        def register_clusterers(self, register):  # noqa: ANN001, ANN201
            register("off-by-one-kit", OffByOne)

    plugins.register_plugin(Plugin(), "kit_probe")
    try:
        found = cases("clusterer", plugin="kit_probe")
        assert [c.name for c in found] == ["off-by-one-kit"]
        with pytest.raises(PluginError, match="kit_probe"):
            check_component(found[0])
    finally:
        plugins.unregister_plugin("kit_probe")


@parametrize_plugins("refiner")
def test_refiner_conforms(case: Case) -> None:
    check_component(case)


@parametrize_plugins("launcher")
def test_launcher_conforms(case: Case) -> None:
    from wsss_bench.errors import ConfigError

    try:
        check_component(case)
    except ConfigError as exc:
        if "pip install" in str(exc):
            pytest.skip(f"launcher library not installed: {exc}")
        raise
