"""Built-in refiner ``affinity-rw``: PSA's AffinityNet random walk over CAMs.

For each image: the CAMs get a background map ``(1 - max)^alpha`` (PSA's ``infer_aff.py``,
alpha 16), are zero-padded to a multiple of the feature stride and average-pooled to it; the
image goes through AffinityNet (:mod:`wsss_bench.engine.affinity_net`, PSA's key layout) to the
affinities of pixel pairs within ``radius``; the walk (affinity^beta, column-normalised,
``2^logt`` steps; :mod:`wsss_bench.engine.random_walk`, sparse) spreads the pooled maps; they
are upsampled bilinearly to the padded image, cropped and arg-maxed.  The walk's label maps hold
no uncertain (255) pixels.

Weights: ``weights=FILE``, PSA's released ``res38_aff.pth`` (loaded strictly, keys as they are)
or an AffinityNet checkpoint of ours; the backbone and its width are read off the file (or
named with ``backbone`` / ``backbone_options``).  Or :meth:`AffinityRandomWalk.fit` trains one on
a split's CAMs (``wsss train-aff``; :mod:`wsss_bench.engine.train_affinity`: confident labels
through PSA's dense CRF when the ``[crf]`` extra is installed, ``train.crf``), its
backbone initialised from a classifier checkpoint (``init_weights``) when given.  Without
weights or training the refiner refuses to run, unless ``allow_untrained`` (random head:
conformance checks only).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, Optional

import numpy as np
import torch
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field, field_validator

from wsss_bench import checkpoints
from wsss_bench.architecture import backbone_for_checkpoint, backbone_state
from wsss_bench.components import create_backbone
from wsss_bench.data.transforms import normalize
from wsss_bench.engine.affinity_net import HEAD_NAMES, AffinityNet, head_widths_from_state_dict, is_affinity_state
from wsss_bench.engine.train_affinity import AffinityTraining, train_affinity
from wsss_bench.engine.random_walk import (pair_affinity, pair_indices, pool_cams, random_walk, walk_to_labels,
                                           with_background)
from wsss_bench.errors import ConfigError, WeightsError
from wsss_bench.hookspecs import hookimpl
from wsss_bench.io import file_sha256


class AffinityOptions(BaseModel):
    """Options of the ``affinity-rw`` refiner (defaults: PSA's ``infer_aff.py``)."""

    model_config = ConfigDict(extra="forbid")

    weights: Optional[str] = Field(None, description="AffinityNet weights (PSA's res38_aff.pth or ours)")
    backbone: Optional[str] = Field(None, description="backbone plugin (default: read off the weights)")
    backbone_options: dict[str, Any] = Field(default_factory=dict, description="its options")
    alpha: float = Field(16.0, gt=0, description="background map (1 - max CAM)^alpha")
    beta: float = Field(8.0, gt=0, description="affinity exponent")
    logt: int = Field(8, ge=0, le=12, description="the walk takes 2^logt steps")
    radius: int = Field(5, ge=2, le=12, description="pairs within this radius on the feature map")
    allow_untrained: bool = Field(False, description="run with a random head (checks only)")
    init_weights: Optional[str] = Field(None, description="fit(): backbone from this classifier checkpoint "
                                        "or ImageNet .params (PSA)")
    train: "AffinityTrainOptions" = Field(default_factory=lambda: AffinityTrainOptions(),
                                          description="fit() settings")


class AffinityTrainOptions(BaseModel):
    """Settings of ``fit`` (PSA: 8 epochs, crop 448, batch 8, lr 0.1; scaled for CPU runs)."""

    model_config = ConfigDict(extra="forbid")

    epochs: int = Field(3, ge=1, le=1000)
    batch_size: int = Field(8, ge=1, le=1024)
    crop_size: int = Field(160, ge=16, le=2048, description="a multiple of the backbone's stride")
    lr: float = Field(0.05, gt=0, le=10)
    momentum: float = Field(0.9, ge=0, lt=1)
    weight_decay: float = Field(5e-4, ge=0, le=1)
    fg_alpha: float = Field(4.0, gt=0, description="confident foreground: (1 - max)^fg_alpha loses")
    bg_alpha: float = Field(32.0, gt=0, description="confident background: (1 - max)^bg_alpha wins")
    seed: int = Field(0, ge=0)
    crf: Literal["auto", "on", "off"] = Field("auto", description="labels through PSA's dense CRF: auto = when "
                                              "the [crf] extra is installed, on = required, off = never")

    @field_validator("crf", mode="before")
    @classmethod
    def _yaml_switch(cls, value: Any) -> Any:
        # YAML reads a bare `on` / `off` (`--set refine.options.train.crf=off`) as a boolean.
        return {True: "on", False: "off"}.get(value, value) if isinstance(value, bool) else value


AffinityOptions.model_rebuild()


class AffinityRandomWalk:
    """``refine(image, cams, keys)`` -> uint8 label map (0 background, ``key + 1`` a class)."""

    def __init__(self, **options: Any) -> None:
        self.options = AffinityOptions(**options)
        self.device = torch.device("cpu")
        self.protocol: dict[str, Any] = {"refiner": "affinity-rw", "crf": "absent",
                                         "alpha": self.options.alpha, "beta": self.options.beta,
                                         "logt": self.options.logt, "radius": self.options.radius}
        self.model: Optional[AffinityNet] = None
        if self.options.weights is not None:
            self.model = self.load(Path(self.options.weights))
        elif self.options.allow_untrained:
            self.model = self._fresh()

    def _fresh(self) -> AffinityNet:
        """A new AffinityNet on the configured backbone (initialised from ``init_weights``)."""
        opts = self.options
        name, options = opts.backbone, dict(opts.backbone_options)
        state = None
        imagenet = opts.init_weights is not None and Path(opts.init_weights).suffix.lower() == ".params"
        if opts.init_weights is not None and not imagenet:
            found = checkpoints.read_checkpoint(Path(opts.init_weights))
            state = backbone_state(found["state_dict"])
            choice = backbone_for_checkpoint(found["state_dict"], found["meta"], name or "", options)
            name, options = choice.name or name, choice.options
        if not name:
            raise ConfigError("refiner 'affinity-rw' needs backbone=NAME (or init_weights=CLASSIFIER.pth "
                              "to read it from)")
        self.protocol["backbone"] = {"name": name, "options": options}
        backbone = create_backbone(name, **options)
        if state is not None:
            backbone.load_state_dict(state, strict=True)
            self.protocol["init_weights"] = str(opts.init_weights)
        elif imagenet:
            # PSA's train_aff.py starts from the ImageNet MXNet weights, as the classifier does.
            loader = getattr(backbone, "load_pretrained", None)
            if loader is None:
                raise WeightsError(f"{opts.init_weights}: backbone {name!r} cannot read MXNet weights")
            loader(Path(opts.init_weights))
            self.protocol["init_weights"] = str(opts.init_weights)
        return AffinityNet(backbone).eval()

    def fit(self, dataset: Any, cam_dir: Path, out_file: Path, device: torch.device | str = "cpu",
            show_progress: bool = False) -> Path:
        """Train AffinityNet on ``dataset``'s images and ``cam_dir``'s CAM files; save it to
        ``out_file`` (our checkpoint format, PSA's keys) and use it from now on."""
        opts = self.options
        model = self._fresh()
        settings = AffinityTraining(radius=opts.radius, **opts.train.model_dump())
        # The label stacks go to a temporary folder beside the output (disk, not memory).
        report = train_affinity(model, dataset, Path(cam_dir), settings, torch.device(device), show_progress,
                                scratch=Path(out_file).parent)
        checkpoints.save_checkpoint(Path(out_file), model, {
            "kind": "affinity", "backbone": self.protocol["backbone"], "losses": report.epoch_losses,
            "train": opts.train.model_dump(), "cams": str(cam_dir), "split": dataset.split,
            "crf": report.crf})
        self.protocol.update(crf=report.crf, weights=str(out_file), weights_sha256=file_sha256(Path(out_file)),
                             train_seconds=round(report.seconds, 2), train_losses=report.epoch_losses)
        self.model = model.to(self.device).eval()
        return Path(out_file)

    def load(self, path: Path) -> AffinityNet:
        """AffinityNet from ``path`` (PSA's ``res38_aff.pth`` or ours), loaded strictly."""
        opts = self.options
        found = checkpoints.read_checkpoint(path)
        state = dict(found["state_dict"])
        if not is_affinity_state(state):
            raise WeightsError(f"{path}: no AffinityNet head ({', '.join(HEAD_NAMES)}, f9); a classifier "
                               "checkpoint gives CAMs (wsss cams), not affinities")
        trunk = {k: v for k, v in state.items() if not k.startswith((*HEAD_NAMES, "f9."))}
        choice = backbone_for_checkpoint(trunk, found["meta"], opts.backbone or "", opts.backbone_options)
        if not choice.name:
            raise WeightsError(f"{path}: no registered backbone recognises the trunk's keys; name it "
                               "with backbone=NAME")
        model = AffinityNet(create_backbone(choice.name, **choice.options),
                            widths=head_widths_from_state_dict(state))
        try:
            model.load_state_dict(state, strict=True)
        except RuntimeError as exc:
            first = str(exc).splitlines()[0]
            raise WeightsError(f"{path}: does not fit AffinityNet on {choice.name} {choice.options} "
                               f"({first})") from None
        # `crf`: whether a CRF went into these masks here (the walk uses none; our own files say
        # whether their training labels went through one).  PSA's released file has no metadata:
        # how it was trained (PSA: on CRF labels) is the file's business, stated as unknown.
        meta = found["meta"] or {}
        self.protocol.update(weights=str(path), weights_sha256=file_sha256(path),
                             backbone={"name": choice.name, "options": choice.options},
                             crf=meta.get("crf", "absent"))
        if not meta:
            self.protocol["weights_training_crf"] = "unknown (no metadata)"
        return model.to(self.device).eval()

    @property
    def needs_fit(self) -> bool:
        """Whether :meth:`fit` must run before :meth:`refine` (no weights, no untrained head)."""
        return self.model is None

    def load_fitted(self, path: Path) -> None:
        """Use the AffinityNet a previous :meth:`fit` saved to ``path`` (a cached stage)."""
        self.model = self.load(Path(path))

    def to(self, device: torch.device | str) -> "AffinityRandomWalk":
        """Run on ``device``."""
        self.device = torch.device(device)
        if self.model is not None:
            self.model.to(self.device)
        return self

    @torch.no_grad()
    def refine(self, image: Image.Image, cams: np.ndarray, keys: np.ndarray) -> np.ndarray:
        """Walk ``cams`` (``[n, H, W]`` in [0, 1] of the 0-based class ids ``keys``) on ``image``."""
        opts = self.options
        if self.model is None:
            raise ConfigError("refiner 'affinity-rw' needs AffinityNet weights: --weights FILE (PSA's "
                              "released res38_aff.pth, or one `wsss train-aff` trained)")
        stride = self.model.stride
        width, height = image.size
        maps = torch.as_tensor(np.asarray(cams, np.float32), device=self.device)
        if maps.ndim != 3 or tuple(maps.shape[1:]) != (height, width):
            raise ValueError(f"CAMs {tuple(maps.shape)} do not match the {width}x{height} image")
        pooled = pool_cams(with_background(maps, opts.alpha), stride)
        pixels = torch.from_numpy(normalize(image)).permute(2, 0, 1)
        pad_h, pad_w = (-height) % stride, (-width) % stride
        pixels = torch.nn.functional.pad(pixels, (0, pad_w, 0, pad_h)).unsqueeze(0).to(self.device)
        features = self.model(pixels)[0].float()
        if tuple(features.shape[1:]) != tuple(pooled.shape[1:]):
            raise ValueError(f"AffinityNet gave a {tuple(features.shape[1:])} map for pooled CAMs "
                             f"{tuple(pooled.shape[1:])}")
        pairs = pair_indices(opts.radius, tuple(features.shape[1:]))
        walked = random_walk(pooled, pair_affinity(features, pairs), pairs, opts.beta, opts.logt)
        index = walk_to_labels(walked, (height, width), stride).cpu().numpy()
        lookup = np.concatenate([[0], np.asarray(keys, np.int64) + 1]).astype(np.uint8)
        return lookup[index]


def create_affinity_rw(**options: Any) -> AffinityRandomWalk:
    """Build the refiner from :class:`AffinityOptions` fields."""
    return AffinityRandomWalk(**options)


#: The conformance kit's case: a random head on a 1/16-width ResNet-38 (no weights file).
create_affinity_rw.conformance_cases = [  # type: ignore[attr-defined]
    ("affinity-rw", {"allow_untrained": True, "backbone": "resnet38d",
                     "backbone_options": {"width": 0.0625}, "logt": 3})]


@hookimpl
def register_refiners(register: Any) -> None:
    """Register the ``affinity-rw`` refiner."""
    register("affinity-rw", create_affinity_rw,
             help="PSA's AffinityNet random walk (weights: PSA's res38_aff.pth or ours)",
             options=AffinityOptions)
