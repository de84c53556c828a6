"""Run configuration: YAML presets, user files and ``--set`` overrides, validated by pydantic.

Resolution order (later wins): ``configs/base.yaml`` → ``configs/presets/<preset>.yaml`` →
``--config FILE`` (may name ``preset:`` itself) → command-line flags → ``--set key=value``.
Unknown keys anywhere are errors.  Plugin-specific sections (``backbone.options``,
``method.options``, ``dataset.options``) are validated by the plugin's own options model.
"""
from __future__ import annotations

import copy
import hashlib
import json
from importlib import resources
from pathlib import Path
from typing import Any, Literal, Optional

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from .errors import ConfigError
from .evaluation import DEFAULT_THRESHOLD
from .registry import format_validation_error


Precision = Literal["fp32", "bf16", "fp16", "auto"]
MIN_SCALE, MAX_SCALE = 1 / 32, 8.0
MAX_SEED = 2**32 - 1


def check_size_range(value: tuple[int, int]) -> tuple[int, int]:
    """A ``resize_long`` range ``[low, high]``: ``1 <= low <= high`` (pydantic validators)."""
    if value[0] < 1 or value[0] > value[1]:
        raise ValueError("must be two sizes [low, high] with 1 <= low <= high")
    return value


class Strict(BaseModel):
    """Base model: unknown keys are errors and values are checked on assignment."""

    # NaN and infinities are never meaningful settings (``train.lr=.inf`` trained to NaN before).
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


class ComponentConfig(Strict):
    """A plugin component chosen by name, with its own options."""

    name: str
    options: dict[str, Any] = Field(default_factory=dict)


class DatasetConfig(Strict):
    """Which data to use.  ``name: null`` with a ``root`` reads a VOC-layout tree as it is."""

    name: Optional[str] = "synthetic"
    root: Optional[Path] = None
    options: dict[str, Any] = Field(default_factory=dict)
    train_split: str = "train_aug"
    eval_splits: list[str] = Field(default_factory=lambda: ["train", "val"])
    max_images: Optional[int] = Field(default=None, ge=1)
    labels_file: Optional[Path] = None


class TrainConfig(Strict):
    """Classifier training (defaults follow SC-CAM, scaled by presets)."""

    epochs: int = Field(default=10, ge=1)
    batch_size: int = Field(default=16, ge=1)
    lr: float = Field(default=0.01, gt=0)
    head_lr_mult: float = Field(default=10.0, gt=0)
    weight_decay: float = Field(default=5e-4, ge=0)
    # PSA's PolyOptimizer passes weight_decay in SGD's momentum slot, so the published models were
    # trained with momentum = weight decay (effectively plain SGD).  Keep it to reproduce them.
    psa_momentum_quirk: bool = True
    momentum: float = Field(default=0.0, ge=0, lt=1)
    poly_power: float = Field(default=0.9, ge=0)
    crop_size: int = Field(default=224, ge=8)
    resize_long: tuple[int, int] = (256, 512)
    color_jitter: tuple[float, float, float, float] = (0.3, 0.3, 0.3, 0.1)
    head_dropout: float = Field(default=0.5, ge=0, lt=1)
    num_workers: int = Field(default=0, ge=0)
    init_weights: Optional[Path] = None
    snapshot_epoch: Optional[int] = Field(default=None, ge=0)
    precision: Precision = "fp32"

    @field_validator("resize_long")
    @classmethod
    def _ordered(cls, value: tuple[int, int]) -> tuple[int, int]:
        return check_size_range(value)


class CamConfig(Strict):
    """CAM inference."""

    scales: list[float] = Field(default_factory=lambda: [1.0, 0.5, 1.5, 2.0])
    flip: bool = True
    #: The head ``wsss cams`` reads CAMs from when ``--head`` is not given (methods choose their
    #: own: SC-CAM scores the parent head of every round).
    head: str = "parent"
    # fp32 reproduces the original code's maps; bf16/fp16 autocast the backbone (upsampling,
    # fusion and normalisation stay fp32).  ``auto``: bf16 where the hardware has it natively.
    precision: Precision = "fp32"

    @field_validator("scales")
    @classmethod
    def _positive(cls, value: list[float]) -> list[float]:
        # Above 8x an image's maps no longer fit in memory for VOC-sized inputs; below 1/32 a
        # stride-32 backbone sees less than one pixel.
        if not value or any(not (MIN_SCALE <= s <= MAX_SCALE) for s in value):
            raise ValueError(f"must be a non-empty list of scales in [{MIN_SCALE}, {MAX_SCALE}]")
        return value


class EvalConfig(Strict):
    """Scoring of CAMs against pixel ground truth.

    The headline number always uses the ``fixed`` policy (constant background score
    ``threshold``).  ``policies`` adds, side by side: ``oracle`` (best threshold on the evaluated
    split's own ground truth, an upper bound) and ``heldout`` (threshold chosen on
    ``selection_split``, or on another evaluation split when unset, then applied).
    """

    threshold: float = Field(default=DEFAULT_THRESHOLD, ge=0, le=1)
    threshold_policy: Literal["fixed"] = "fixed"
    policies: list[Literal["fixed", "oracle", "heldout"]] = Field(
        default_factory=lambda: ["fixed", "oracle", "heldout"])
    selection_split: Optional[str] = None
    curves: bool = True


#: The stages a run can have, in pipeline order: CAMs (always), refinement of the final CAMs into
#: pseudo masks, a segmentation network trained on the training split's pseudo masks.
STAGES = ("cam", "refine", "segment")
StageName = Literal["cam", "refine", "segment"]


#: Values one refine sweep may try: each refines every evaluation split.
MAX_SWEEP_VALUES = 8


class RefineConfig(ComponentConfig):
    """The ``refine`` stage: a refiner plugin (``wsss list refiners``) and how its masks are scored."""

    name: str = "affinity-rw"
    #: Unsure (255) pixels of a pseudo mask: counted as ``background`` or left out (``ignore``,
    #: which inflates mIoU; coverage is stated beside it either way).
    ignore_policy: Literal["background", "ignore"] = "background"
    #: One refine-time option of the refiner and the values to try, ``{alpha: [2, 4, 8, 16]}``:
    #: every value refines every evaluation split, and each split's row takes the value that
    #: scores best on its selection split (``eval.selection_split``, else another evaluation
    #: split: the rule of the ``heldout`` CAM threshold).  A fitted refiner is fitted once, with
    #: ``options``; the swept option must not change what fit() learns.  Empty: no sweep.
    sweep: dict[str, list[Any]] = Field(default_factory=dict)

    @field_validator("sweep")
    @classmethod
    def _one_option(cls, value: dict[str, list[Any]]) -> dict[str, list[Any]]:
        if len(value) > 1:
            raise ValueError(f"sweeps one option at a time, got {sorted(value)}")
        for option, values in value.items():
            if not values or len(values) > MAX_SWEEP_VALUES or len(set(map(repr, values))) != len(values):
                raise ValueError(f"{option}: 1 to {MAX_SWEEP_VALUES} distinct values, got {values}")
        return value


class SegmentConfig(Strict):
    """The ``segment`` stage: DeepLab (ASPP head) on a backbone plugin, trained on pseudo masks."""

    #: ``null``: the run's own backbone (name and options).
    backbone: Optional[ComponentConfig] = None
    #: Training and inference settings (:class:`wsss_bench.engine.segmentation.SegmentOptions`).
    options: dict[str, Any] = Field(default_factory=dict)


class RunConfig(Strict):
    """Everything one ``wsss run`` needs."""

    # numpy's legacy RandomState (scikit-learn's seeds) takes [0, 2**32); torch takes more.
    seed: int = Field(default=0, ge=0, le=MAX_SEED)
    device: str = "auto"
    preset: Optional[str] = None
    quiet: bool = False
    dataset: DatasetConfig = Field(default_factory=DatasetConfig)
    backbone: ComponentConfig = Field(default_factory=lambda: ComponentConfig(name="resnet38d"))
    method: ComponentConfig = Field(default_factory=lambda: ComponentConfig(name="cam"))
    train: TrainConfig = Field(default_factory=TrainConfig)
    cams: CamConfig = Field(default_factory=CamConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    #: Which stages run: ``[cam]``, ``[cam, refine]``, ``[cam, refine, segment]`` (or
    #: ``[cam, segment]``: segmentation on the CAMs' own pseudo masks at ``eval.threshold``).
    stages: list[StageName] = Field(default_factory=lambda: ["cam"])
    refine: RefineConfig = Field(default_factory=RefineConfig)
    segment: SegmentConfig = Field(default_factory=SegmentConfig)

    @field_validator("stages")
    @classmethod
    def _pipeline_order(cls, value: list[str]) -> list[str]:
        if not value or value[0] != "cam" or len(set(value)) != len(value) or \
                value != sorted(value, key=STAGES.index):
            raise ValueError(f"must start with cam and follow the order {list(STAGES)} without repeats, "
                             "e.g. [cam], [cam, refine] or [cam, refine, segment]")
        return value

    def to_dict(self) -> dict[str, Any]:
        """A JSON/YAML-safe dict (paths as strings)."""
        return json.loads(self.model_dump_json())

    def digest(self) -> str:
        """A short hash of the resolved configuration."""
        text = json.dumps(self.to_dict(), sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]


def _packaged_yaml(relative: str) -> dict[str, Any]:
    try:
        text = resources.files("wsss_bench_configs").joinpath(relative).read_text()
    except (FileNotFoundError, ModuleNotFoundError):
        raise ConfigError(f"no packaged config {relative!r}") from None
    return _parse_yaml(text, relative)


def packaged_presets() -> list[str]:
    """Names of the presets shipped in ``configs/presets``."""
    folder = resources.files("wsss_bench_configs").joinpath("presets")
    return sorted(p.name[:-5] for p in folder.iterdir() if p.name.endswith(".yaml"))


def _parse_yaml(text: str, source: str) -> dict[str, Any]:
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark is not None else ""
        raise ConfigError(f"{source}: invalid YAML{where}: {getattr(exc, 'problem', exc)}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a mapping at the top level, got {type(data).__name__}")
    return data


def packaged_path(path: Path) -> Path:
    """``path`` itself, or the shipped copy when it names a file of ``configs/`` that is not on
    disk (a non-editable install has no repository checkout): ``configs/bench/methods.yaml``."""
    path = Path(path)
    if path.exists():
        return path
    parts = path.parts[1:] if path.parts and path.parts[0] == "configs" else path.parts
    try:
        candidate = resources.files("wsss_bench_configs").joinpath(*parts)
        if parts and candidate.is_file():
            return Path(str(candidate))
    except (ModuleNotFoundError, TypeError):
        pass
    return path


def read_yaml_file(path: Path) -> dict[str, Any]:
    """Read a user YAML file into a dict, with one-line errors."""
    path = packaged_path(path)
    try:
        text = Path(path).read_text()
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except (IsADirectoryError, PermissionError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read config file ({exc.__class__.__name__})") from None
    return _parse_yaml(text, str(path))


def deep_merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """Merge ``override`` into a copy of ``base``; mappings merge, everything else replaces.

    A layer that names a different component (``name``) drops the options of the component it
    replaces, whether or not it gives options of its own: they were written for that other
    plugin (``{name: timm:resnet18, options: {output_stride: 16}}`` over a ResNet-38 with a
    ``width`` option must not inherit ``width``).  Likewise a layer that changes a key ``K``
    drops the ``K_options`` beside it (``backbone`` / ``backbone_options`` of a refiner).
    """
    out = copy.deepcopy(base)
    # The same rule for options kept beside a name (a refiner's ``backbone`` and
    # ``backbone_options``): a layer that changes ``K`` drops the previous ``K_options``.
    for key, value in override.items():
        if f"{key}_options" in out and key in out and out[key] != value:
            del out[f"{key}_options"]
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            previous = out[key]
            if "name" in value and value["name"] != previous.get("name"):
                previous = {k: v for k, v in previous.items() if k != "options"}
            out[key] = deep_merge(previous, value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def parse_override(text: str) -> dict[str, Any]:
    """Turn ``a.b.c=value`` into ``{"a": {"b": {"c": value}}}``; the value is parsed as YAML."""
    if "=" not in text:
        raise ConfigError(f"--set {text!r}: expected KEY=VALUE, e.g. train.epochs=5")
    key, raw = text.split("=", 1)
    parts = [p for p in key.strip().split(".")]
    if not all(parts):
        raise ConfigError(f"--set {text!r}: empty key component")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    nested: dict[str, Any] = {parts[-1]: value}
    for part in reversed(parts[:-1]):
        nested = {part: nested}
    return nested


def load_config(preset: Optional[str] = None, config_file: Optional[Path] = None,
                overrides: Optional[list[dict[str, Any]]] = None,
                sets: Optional[list[str]] = None) -> RunConfig:
    """Resolve and validate a configuration (see the module docstring for the order)."""
    user = read_yaml_file(config_file) if config_file else {}
    chosen = preset or user.get("preset") or "default"
    if chosen not in packaged_presets():
        raise ConfigError(f"unknown preset {chosen!r}; available: {', '.join(packaged_presets())}")
    data = deep_merge(_packaged_yaml("base.yaml"), _packaged_yaml(f"presets/{chosen}.yaml"))
    data = deep_merge(data, user)
    for layer in overrides or []:
        data = deep_merge(data, layer)
    for item in sets or []:
        data = deep_merge(data, parse_override(item))
    data["preset"] = chosen
    return validate_config(data)


def validate_config(data: dict[str, Any]) -> RunConfig:
    """Validate a config dict, turning pydantic errors into one ConfigError line."""
    try:
        return RunConfig(**data)
    except ValidationError as exc:
        raise ConfigError(f"invalid config: {format_validation_error(exc)}") from None
    except TypeError as exc:
        raise ConfigError(f"invalid config: {exc}") from None
