"""The host checks what plugin components give back; a violation names the component, its plugin
and its distribution (never an IndexError or AttributeError deep in the pipeline)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from torch import nn

from tests.conftest import write_voc_tree
from wsss_bench import clustering, hookimpl, plugins
from wsss_bench.cli.main import cli
from wsss_bench.errors import PluginError


class OffByOne:
    """Labels 1..k instead of 0..k-1: silently another class's column before the host checked."""

    def fit_predict(self, features: np.ndarray, k: int, seed: int) -> np.ndarray:
        return np.arange(len(features)) % k + 1


class NoChannels(nn.Module):
    stride = 8

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


class WrongChannels(nn.Module):
    out_channels = 16
    stride = 4

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x[:, :1, ::4, ::4]


class ReturnsNothing:
    def run(self, ctx):  # noqa: ANN001 - deliberately broken method
        return None


class Broken:
    @hookimpl
    def register_clusterers(self, register):
        register("off-by-one", OffByOne, help="labels shifted by one")

    @hookimpl
    def register_backbones(self, register):
        register("no-channels", NoChannels, help="no out_channels")
        register("wrong-channels", WrongChannels, help="forward disagrees with out_channels")

    @hookimpl
    def register_methods(self, register):
        register("returns-nothing", ReturnsNothing, help="run() returns None")


@pytest.fixture
def broken():
    plugins.register_plugin(Broken(), "broken_plugin")
    yield
    plugins.unregister_plugin("broken_plugin")


def test_off_by_one_clusterer_is_rejected_naming_its_plugin(broken: None) -> None:
    algo = plugins.registry("clusterer").create("off-by-one")
    features = np.random.default_rng(0).normal(size=(6, 4))
    with pytest.raises(PluginError, match=r"clusterer 'off-by-one' \(plugin 'broken_plugin'.*labels must lie in \[0, 2\)"):
        clustering.fit_predict(algo, features, 2, 0)


def test_backbone_without_out_channels_is_a_contract_error(broken: None) -> None:
    with pytest.raises(PluginError, match=r"backbone 'no-channels' \(plugin 'broken_plugin'.*out_channels"):
        plugins.registry("backbone").create("no-channels")


def test_backbone_output_is_checked_on_its_first_forward(broken: None) -> None:
    backbone = plugins.registry("backbone").create("wrong-channels")
    with pytest.raises(PluginError, match=r"'wrong-channels'.*1 channels but out_channels is 16"):
        backbone(torch.zeros(1, 3, 32, 32))


def test_builtin_backbones_pass_their_own_first_forward() -> None:
    backbone = plugins.registry("backbone").create("resnet38d", width=0.0625)
    out = backbone(torch.zeros(1, 3, 33, 47))
    assert out.shape[1] == backbone.out_channels


def test_method_returning_none_ends_in_one_line(broken: None, tmp_path: Path) -> None:
    root = write_voc_tree(tmp_path / "voc", {"train_aug": ["a", "b"], "train": ["a"], "val": ["b"]})
    result = CliRunner().invoke(cli, ["run", "--method", "returns-nothing", "--data-root", str(root),
                                      "--out", str(tmp_path / "run"), "--quiet", "--device", "cpu",
                                      "--backbone", "resnet38d"])
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert lines[-1].startswith("Error: method 'returns-nothing' (plugin 'broken_plugin'"), result.output
    assert "Traceback" not in result.output
    assert not (tmp_path / "run" / "results.json").exists()
