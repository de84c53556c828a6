"""Config resolution and validation."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

from wsss_bench.config import load_config, packaged_presets, parse_override
from wsss_bench.errors import ConfigError


def test_presets_resolve() -> None:
    assert {"default", "smoke"} <= set(packaged_presets())
    smoke = load_config("smoke")
    assert smoke.preset == "smoke" and smoke.train.epochs < load_config("default").train.epochs


def test_layers_apply_in_order(tmp_path: Path) -> None:
    user = tmp_path / "c.yaml"
    user.write_text("train:\n  epochs: 7\n  lr: 0.2\n")
    cfg = load_config("smoke", user, [{"seed": 3}], ["train.epochs=9", "cams.scales=[1.0]"])
    assert (cfg.train.epochs, cfg.train.lr, cfg.seed, cfg.cams.scales) == (9, 0.2, 3, [1.0])


def test_unknown_key_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="train.epoch"):
        load_config(sets=["train.epoch=3"])


@pytest.mark.parametrize("override, pattern", [
    ("train.epochs=0", "train.epochs"),
    ("train.epochs=many", "train.epochs"),
    ("eval.threshold=1.5", "eval.threshold"),
    ("cams.scales=[]", "cams.scales"),
    ("train.resize_long=[300, 200]", "resize_long"),
])
def test_bad_values_are_errors(override: str, pattern: str) -> None:
    with pytest.raises(ConfigError, match=pattern):
        load_config(sets=[override])


def test_invalid_yaml_names_the_file(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [unclosed\n")
    with pytest.raises(ConfigError, match="bad.yaml.*invalid YAML"):
        load_config(config_file=bad)


def test_missing_config_file() -> None:
    with pytest.raises(ConfigError, match="not found"):
        load_config(config_file=Path("/nonexistent/x.yaml"))


def test_switching_component_drops_its_options() -> None:
    cfg = load_config(overrides=[{"backbone": {"name": "timm:resnet18"}}])
    assert cfg.backbone.name == "timm:resnet18" and cfg.backbone.options == {}
    # ...also when the new component brings options of its own (a bench axis such as
    # {name: timm:resnet18, options: {output_stride: 16}} over ResNet-38's width/freeze_bn).
    cfg = load_config(overrides=[{"backbone": {"name": "timm:resnet18", "options": {"output_stride": 16}}}])
    assert cfg.backbone.options == {"output_stride": 16}
    # The same component keeps its options and merges new ones.
    cfg = load_config(overrides=[{"backbone": {"name": "efficientnet_lite", "options": {"output_stride": 8}}}])
    assert cfg.backbone.options["output_stride"] == 8 and cfg.backbone.options["variant"] == "lite0"
    # ...also over a preset's component.
    cfg = load_config("scratch", overrides=[{"backbone": {"name": "resnet38d", "options": {"width": 0.25}}}])
    assert cfg.backbone.options["width"] == 0.25 and "freeze_bn" in cfg.backbone.options


def test_override_syntax() -> None:
    assert parse_override("a.b=3") == {"a": {"b": 3}}
    with pytest.raises(ConfigError):
        parse_override("nokey")


def test_unknown_preset() -> None:
    with pytest.raises(ConfigError, match="unknown preset"):
        load_config("turbo")


@pytest.mark.parametrize("setting", ["cams.scales=[.nan]", "cams.scales=[1000]", "cams.scales=[0.001]",
                                     "seed=-1", "seed=4294967296", "train.lr=.inf", "train.lr=.nan",
                                     "eval.threshold=.nan", "train.weight_decay=-.inf"])
def test_non_finite_and_out_of_range_values_fail_validation(setting: str) -> None:
    """Rejected by the config model itself, so --dry-run and a run stop before writing anything."""
    with pytest.raises(ConfigError, match="invalid config"):
        load_config(sets=[setting])


def test_diverging_training_stops_with_one_line_and_writes_no_checkpoint(tmp_path: Path, tiny_voc: Path) -> None:
    from click.testing import CliRunner

    from wsss_bench.cli.main import cli

    out = tmp_path / "run"
    result = CliRunner().invoke(cli, [
        "run", "--method", "cam", "--data-root", str(tiny_voc), "--out", str(out), "--device", "cpu",
        "--quiet", "--backbone", "resnet38d", "--set", "backbone.options={width: 0.0625}",
        "--set", "train.lr=1e30", "--set", "train.epochs=2", "--set", "train.crop_size=32",
        "--set", "train.resize_long=[32,48]"])
    assert result.exit_code == 2, result.output
    assert re.search(r"training diverged at epoch \d+, step \d+ \(parent loss (nan|inf)", result.output)
    assert "lower train.lr" in result.output and "Traceback" not in result.output
    assert not list(out.rglob("*.pth")) and not list(out.rglob("*.npz"))


def test_non_finite_cams_are_never_written(tmp_path: Path) -> None:
    import numpy as np

    from wsss_bench.errors import CamFileError
    from wsss_bench.evaluation.camfiles import write_cam

    with pytest.raises(CamFileError, match="NaN or infinite"):
        write_cam(tmp_path / "a.npz", np.array([0]), np.full((1, 4, 4), np.nan))
    assert not list(tmp_path.iterdir())
