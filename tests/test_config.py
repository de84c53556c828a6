"""Config resolution and validation."""
from __future__ import annotations

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
    cfg = load_config(overrides=[{"backbone": {"name": "resnet38d", "options": {"width": 0.25}}}])
    assert cfg.backbone.options["width"] == 0.25 and "freeze_bn" in cfg.backbone.options


def test_override_syntax() -> None:
    assert parse_override("a.b=3") == {"a": {"b": 3}}
    with pytest.raises(ConfigError):
        parse_override("nokey")


def test_unknown_preset() -> None:
    with pytest.raises(ConfigError, match="unknown preset"):
        load_config("turbo")
