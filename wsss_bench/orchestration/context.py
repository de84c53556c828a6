"""What a method plugin gets to work with: data, device, run directory and the shared steps.

Methods compose these steps (train a classifier, extract features, cluster, infer CAMs,
evaluate) rather than re-implementing them, so every method writes the same artifacts:

    RUN/checkpoints/<tag>.pth     classifier weights (our format; PSA/SC-CAM files also load)
    RUN/features/<tag>.npy        image-level features of the training split
    RUN/cams/<tag>/<split>/<id>.npz
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch

from .. import checkpoints, io
from ..architecture import backbone_for_checkpoint
from ..components import create_backbone, create_clusterer
from ..config import RunConfig
from ..data.voc import VOCDataset
from ..distributed import Distributed
from ..engine.cams import CamFunction, extract_features, infer_split
from ..engine.model import PARENT, Classifier
from ..engine.train import train_classifier
from ..errors import ConfigError, WeightsError
from ..evaluation.camfiles import CHECKSUMS, damaged_cam_files, record_checksums
from ..evaluation.evaluate import result_at, result_row, save_confusions
from ..evaluation.scoring import SplitScores, score_split
from ..evaluation.thresholds import (DEFAULT_GRID, _check_selection, plot_curves, policy_reports,
                                     save_curve)
from .manifest import Manifest
from .stage_cache import Stage, StageCache, digest, link_file, link_tree  # noqa: F401 (public here)

log = logging.getLogger("wsss_bench")


@dataclass
class MethodContext:
    """Shared state and steps for one run."""

    config: RunConfig
    run_dir: Path
    device: torch.device
    train_set: VOCDataset
    eval_sets: dict[str, VOCDataset]
    show_progress: bool = True
    extra: dict[str, Any] = field(default_factory=dict)
    manifest: Optional[Manifest] = None
    #: Content-addressed store shared between runs (``wsss bench`` cells, ``--cache-dir``):
    #: a stage whose inputs hash to a stored key is linked in instead of recomputed.
    store: Optional[Path] = None
    #: Stage names or prefixes to recompute even when cached (``--force train:round1``,
    #: ``--force cams``).
    force: tuple[str, ...] = ()
    #: The ``torchrun`` job this process belongs to (a single process by default).
    job: Distributed = field(default_factory=Distributed)
    #: The method object this run executes, built once from the validated options
    #: (:func:`wsss_bench.orchestration.runner.make_context`); None for steps run without a method.
    method: Any = None
    #: Store look-ups, ``--force`` and the manifest record of every cached stage.
    stages: StageCache = field(init=False)
    #: What made each CAM folder of this run (``cams/<folder>``), to infer it on other splits.
    _cam_sources: dict[str, "_CamSource"] = field(init=False, default_factory=dict)

    def __post_init__(self) -> None:
        self.stages = StageCache(self.store, tuple(self.force), self.manifest)

    def shared(self, fn: Callable[[], Any]) -> Any:
        """Run ``fn`` once, on rank 0, and return its result on every process.

        For steps whose result must be identical everywhere but is not bit-reproducible across
        processes (clustering with threaded BLAS); a single-process run just calls ``fn``.
        """
        return self.job.on_main(fn)

    def forced(self, stage: str) -> bool:
        """Whether ``stage`` (e.g. ``train:round1``) must be recomputed."""
        return self.stages.forced(stage)

    @property
    def num_classes(self) -> int:
        """Foreground classes C."""
        return self.train_set.num_classes

    @property
    def class_names(self) -> list[str]:
        """Foreground class names."""
        return self.train_set.class_names

    def info(self, message: str) -> None:
        """Log a progress message."""
        log.info(message)

    # -- models -------------------------------------------------------------------------------
    def new_classifier(self, sub_classes: int = 0, init_weights: Optional[Path] = None) -> Classifier:
        """A fresh classifier on the configured backbone, optionally from pretrained weights."""
        # Seeded here, not by whatever ran before: a resumed run (which skips finished stages)
        # builds the same initial weights as an uninterrupted one, and every SC-CAM round
        # restarts from the same initialisation, as the paper restarts from ImageNet weights.
        torch.manual_seed(self.config.seed)
        backbone = create_backbone(self.config.backbone.name, **self.config.backbone.options)
        self.record_pretrained(backbone)
        model = Classifier(backbone, self.num_classes, sub_classes, self.config.train.head_dropout)
        weights = init_weights or self.config.train.init_weights
        if weights is not None:
            self.load_backbone_weights(model, Path(weights))
        return model

    def record_pretrained(self, backbone: Any) -> None:
        """Note in the manifest where a backbone's built-in pretrained weights came from.

        A backbone that loads weights of its own (e.g. from an installed package) may expose
        ``pretrained_source``: a dict such as ``{"file": ..., "sha256": ...}``.
        """
        source = getattr(backbone, "pretrained_source", None)
        if source and self.manifest is not None and self.manifest.data.get("pretrained") != source:
            self.manifest.data["pretrained"] = source
            self.manifest.save()

    def load_backbone_weights(self, model: Classifier, path: Path) -> None:
        """Initialise the backbone only (ImageNet ``.params`` or any ``.pth``); heads stay fresh."""
        if path.suffix.lower() == ".params":
            loader = getattr(model.backbone, "load_pretrained", None)
            if loader is None:
                raise WeightsError(f"{path}: backbone {self.config.backbone.name!r} cannot read MXNet weights")
            loader(path)
            return
        state = checkpoints.read_checkpoint(path)["state_dict"]
        backbone_only = {k: v for k, v in checkpoints.to_internal_keys(state).items()
                         if k.startswith("backbone.")}
        checkpoints.load_into(model, backbone_only, str(path), allow_missing_heads=True)

    def load_classifier(self, path: Path) -> Classifier:
        """A classifier shaped after the heads found in ``path``, with its weights."""
        found = checkpoints.read_checkpoint(Path(path))
        state = found["state_dict"]
        sizes = checkpoints.head_sizes(state)
        if PARENT not in sizes:
            raise WeightsError(f"{path}: holds a backbone without a classifier head (no fc8, fc8_20 or "
                               f"heads.parent), so it gives no CAMs; such a file initialises training: "
                               f"--set train.init_weights={path}")
        if sizes[PARENT] != self.num_classes:
            raise WeightsError(f"{path}: parent head has {sizes[PARENT]} classes but the dataset "
                               f"has {self.num_classes}")
        # The architecture comes from the file (recorded, or read off its keys by a backbone
        # plugin), so `--weights FILE` alone fits PSA's, SC-CAM's and our own checkpoints.
        choice = backbone_for_checkpoint(state, found["meta"], self.config.backbone.name,
                                         self.config.backbone.options)
        if choice.source != "configured" and (choice.name, choice.options) != (
                self.config.backbone.name, dict(self.config.backbone.options)):
            log.info("%s: backbone %s %s (%s from the checkpoint)", path, choice.name, choice.options, choice.source)
        backbone = create_backbone(choice.name, **choice.options)
        model = Classifier(backbone, self.num_classes, sizes.get("sub", 0), self.config.train.head_dropout)
        checkpoints.load_into(model, state, str(path))
        if self.manifest is not None:
            self.manifest.data.setdefault("checkpoints", {})[str(path)] = {
                "backbone": {"name": choice.name, "options": choice.options}, "backbone_source": choice.source}
        return model.to(self.device).eval()

    # -- steps --------------------------------------------------------------------------------
    def checkpoint_path(self, tag: str) -> Path:
        """Where the checkpoint of ``tag`` lives."""
        return self.run_dir / "checkpoints" / f"{tag}.pth"

    def train(self, model: Classifier, tag: str, extra_targets: Optional[dict[str, np.ndarray]] = None,
              loss_weights: Optional[dict[str, float]] = None, seed_offset: int = 0,
              snapshot_epoch: Optional[int] = None) -> Path:
        """Train ``model`` (or reuse an identical earlier training) and save it as ``tag``.

        ``snapshot_epoch`` (else ``train.snapshot_epoch``) keeps the weights after that epoch
        instead of the last one.
        """
        cfg = self.config.train
        if snapshot_epoch is not None:
            cfg = cfg.model_copy(update={"snapshot_epoch": snapshot_epoch})
        if cfg.snapshot_epoch is not None and cfg.snapshot_epoch >= cfg.epochs:
            raise ConfigError(f"snapshot epoch {cfg.snapshot_epoch} is not below train.epochs={cfg.epochs}")
        key_inputs = {"train": cfg.model_dump(mode="json"), "backbone": self.config.backbone.model_dump(),
                      "ids": self.train_set.ids, "seed": self.config.seed + seed_offset,
                      "targets": {k: digest(v) for k, v in (extra_targets or {}).items()},
                      "weights": loss_weights, "heads": model.describe(),
                      "init": checkpoints.state_digest(model)}
        key = digest(key_inputs)
        stage = self.stages.stage(f"train:{tag}", "checkpoints", key_inputs, ".pth",
                                  record={"digest": key, "images": len(self.train_set.ids),
                                          "heads": model.describe()})
        path = self.checkpoint_path(tag)
        state_file = path.with_suffix(".state.pth")
        if self.job.is_main:
            stage.fetch_file(path)
            if stage.forced:
                state_file.unlink(missing_ok=True)  # our own resume file: start the stage afresh
        self.job.barrier()  # every process now sees the same files and takes the same branch
        found = self._readable_checkpoint(path) if not stage.forced else None
        if found is not None:
            if found["meta"].get("input_digest") == key:
                self.info(f"{tag}: reusing {path}")
                checkpoints.load_into(model, found["state_dict"], str(path))
                stage.record([path], reused=True)
                return path
        train_log = train_classifier(model, self.train_set, cfg, self.device, self.config.seed + seed_offset,
                                     extra_targets, loss_weights, self.show_progress, tag,
                                     state_file=state_file, state_key=key, job=self.job)
        self.extra.setdefault("training", {})[tag] = {
            "seconds": round(train_log.seconds, 2), "images_per_second": round(train_log.images_per_second, 2),
            "losses": train_log.epoch_losses}
        if self.job.is_main:
            checkpoints.save_checkpoint(path, model, {"tag": tag, "input_digest": key,
                                                      "backbone": self.config.backbone.model_dump(),
                                                      "class_names": self.class_names, "heads": model.describe()})
            state_file.unlink(missing_ok=True)  # our own resume file, superseded by the checkpoint
            stage.record([path])
            stage.publish_file(path)
        self.job.barrier()
        return path

    def _readable_checkpoint(self, path: Path) -> Optional[dict[str, Any]]:
        """Our own checkpoint at ``path``, or ``None``: absent, or damaged and then removed (a
        truncated file or one failing its checksum is retrained, not trusted or fatal)."""
        if not path.is_file():
            return None
        try:
            return checkpoints.read_checkpoint(path)
        except WeightsError as exc:
            if self.job.is_main:
                log.warning("%s; training it again", exc)
                path.unlink(missing_ok=True)
            return None

    def features(self, model: Classifier, tag: str) -> np.ndarray:
        """Image-level features of the training split, saved under ``features/<tag>.npy``."""
        key_inputs = {"model": checkpoints.state_digest(model), "ids": self.train_set.ids,
                      "root": str(self.train_set.root)}
        stage = self.stages.stage(f"features:{tag}", "features", key_inputs, ".npy",
                                  record={"key": digest(key_inputs)})
        path = self.run_dir / "features" / f"{tag}.npy"

        def compute() -> None:
            if stage.stored_file():
                link_file(stage.stored, path)  # type: ignore[arg-type]
                if _readable_array(path):
                    stage.record([path], reused=True)
                    return
                log.warning("%s: damaged stored features, extracting them again", stage.stored)
            feats = extract_features(model, self.train_set, self.device, self.show_progress)
            self.save_array(f"features/{tag}.npy", feats)
            stage.inputs = {**stage.inputs, "split": self.train_set.split}
            stage.record([path])
            stage.publish_file(path)

        # Rank 0 extracts (a single pass over the split is cheap next to training); the others
        # read its file, so every process clusters exactly the same numbers.
        self.job.on_main(compute)
        return np.load(path, allow_pickle=False)

    def save_array(self, relative: str, array: np.ndarray) -> Path:
        """Save an array artifact under the run directory (``.npy``, never pickled)."""
        path = self.run_dir / relative
        if self.job.is_main:
            io.write_with(path, lambda handle: np.save(handle, array, allow_pickle=False))
        return path

    def clusterer(self, name: str, options: Optional[dict[str, Any]] = None) -> Any:
        """A clusterer plugin instance."""
        return create_clusterer(name, **(options or {}))

    def cams_and_scores(self, model: Classifier, tag: str, head: str = PARENT,
                        row: Optional[dict[str, Any]] = None, cam_fn: Optional[CamFunction] = None,
                        stage: Optional[str] = None) -> list[dict[str, Any]]:
        """CAMs for every evaluation split, scored; one result row per split.

        ``cam_fn`` swaps the head-weight CAM for another map (post-hoc methods); ``stage``
        names it in the protocol and the output folder.  Each split's CAM files are read once
        for all its scores (fixed threshold, per-image confusions, threshold policies, curves
        and checksums), and a split's sweep is reused as another's selection split.
        """
        stage = stage or ("cam" if head == PARENT else f"cam-{head}")
        model_key = checkpoints.state_digest(model)
        # The later stages (refinement, segmentation) need the same maps on the training split.
        self._cam_sources[_cam_folder(tag, stage)] = _CamSource(model, tag, head, stage, model_key, cam_fn)
        made = [self._split_cams(model, tag, head, split, dataset, stage, model_key, cam_fn)
                for split, dataset in self.eval_sets.items()]
        # Rank 0 scores; every process gets the rows back.
        return self.job.on_main(lambda: self._score_splits(made, tag, head, stage, row))

    def _split_cams(self, model: Classifier, tag: str, head: str, split: str, dataset: VOCDataset,
                    stage: str, model_key: str, cam_fn: Optional[CamFunction]) -> "_SplitCams":
        """CAM files of one split (cached, sharded under torchrun), not yet scored."""
        folder = _cam_folder(tag, stage)
        out = self.run_dir / "cams" / folder / split
        inputs = {"model": model_key, "scales": self.config.cams.scales, "stage": stage,
                  "precision": self.config.cams.precision,
                  "flip": self.config.cams.flip, "head": head, "ids": digest(dataset.ids),
                  "root": str(dataset.root)}
        cached = self.stages.stage(f"cams:{folder}:{split}", "cams", inputs)
        reused = cached.stored_folder()

        def prepare_folder() -> int:
            marker = out / ".inputs"
            if cached.forced or not marker.is_file() or marker.read_text() != cached.key:
                # CAMs of other inputs (another model or setting) are stale: our own files in
                # our own run folder, removed before the marker says the folder holds this key.
                for old in [*out.glob("*.npz"), out / CHECKSUMS]:
                    old.unlink(missing_ok=True)
                io.write_text(marker, cached.key)
            if reused:
                cached.fetch_folder(out)
            # Resume trusts nothing it finds: a file changed since it was recorded, truncated or
            # unreadable is recomputed rather than failing every retry at scoring time.
            damaged = damaged_cam_files(out, dataset.num_classes)
            for path in damaged:
                log.warning("%s: damaged CAM file (checksum or content), recomputing it", path)
                path.unlink()
            return len(damaged)

        if self.job.on_main(prepare_folder):
            reused = False  # the damaged files are missing now: infer them again
        if not reused:
            # Under torchrun each process writes its own shard of the split.
            written = infer_split(model, dataset, out, self.config.cams.scales, self.config.cams.flip,
                                  self.device, head, self.show_progress, cam_fn=cam_fn,
                                  precision=self.config.cams.precision,
                                  rank=self.job.rank, world_size=self.job.world_size)
            reused = sum(self.job.all_gather(written)) == 0
        cached.pause()   # the other splits' CAMs come next; this one is scored after them
        return _SplitCams(split, dataset, out, cached, reused)

    def split_cams_like(self, row: dict[str, Any], dataset: VOCDataset) -> Path:
        """The CAM folder of ``dataset`` made by the model (and CAM function) behind ``row``,
        a row this run's method returned: cached, resumable and forced like every CAM stage
        (``cams:<folder>:<split>``).  What refinement trains on."""
        folder = _cam_folder(row["tag"], row["protocol"]["cam_method"])
        source = self._cam_sources.get(folder)
        if source is None:
            raise ConfigError(f"row {row['tag']} ({row['protocol']['cam_method']}) was not made by this "
                              "run's method; its CAMs cannot be inferred on other splits")
        made = self._split_cams(source.model, source.tag, source.head, dataset.split, dataset, source.stage,
                                source.model_key, source.cam_fn)

        def finish() -> None:
            record_checksums(made.out)
            made.stage.publish_folder(made.out)
            made.stage.record([made.out], made.reused)

        self.job.on_main(finish)
        return made.out

    def _score_splits(self, made: list["_SplitCams"], tag: str, head: str, stage: str,
                      row: Optional[dict[str, Any]]) -> list[dict[str, Any]]:
        """Score every split's CAMs in one read each, record the stages, build the rows."""
        cfg = self.config.eval
        # The fixed policy is a sweep of one threshold; the other policies need the grid.
        grid = [] if cfg.policies == ["fixed"] else list(DEFAULT_GRID)
        thresholds = list(dict.fromkeys([*grid, cfg.threshold]))
        scores: dict[str, SplitScores] = {}
        rows = []
        for cams in made:
            cams.stage.resume()
            scored = score_split(cams.out, cams.dataset, thresholds, per_image_threshold=cfg.threshold,
                                 device=self.device, label="score")
            record_checksums(cams.out, scored.digests)
            cams.stage.publish_folder(cams.out)
            cams.stage.record([cams.out], cams.reused,
                              known={cams.out / name: sha for name, sha in scored.digests.items()})
            scores[cams.split] = scored
            result = result_at(scored, cfg.threshold, stage)
            result_row_ = result_row(result, tag, head, cams.out.relative_to(self.run_dir), row)
            # Per-image confusions: what the bench's paired bootstrap over images resamples.
            result_row_["confusions"] = save_confusions(
                self.run_dir, f"confusions/{tag}-{stage}-{cams.split}.npz", result)
            rows.append(result_row_)
        if grid:
            self.add_threshold_policies(rows, stage, scores)
        return rows

    def selection_for(self, split: str) -> Optional[str]:
        """The split whose ground truth picks the ``heldout`` threshold for ``split``."""
        chosen = self.config.eval.selection_split
        if chosen is not None:
            return chosen if chosen != split else None
        return next((s for s in self.eval_sets if s != split), None)

    def add_threshold_policies(self, rows: list[dict[str, Any]], stage: str,
                               scores: dict[str, SplitScores]) -> None:
        """Attach oracle / held-out scores and the mIoU-vs-threshold curve to each row, from
        the splits' sweeps (no CAM file is read again)."""
        cfg = self.config.eval
        for r in rows:
            split = r["split"]
            selection = self.selection_for(split) if "heldout" in cfg.policies else None
            if selection is not None and selection not in self.eval_sets:
                raise ConfigError(f"eval.selection_split {selection!r} must be one of the evaluation "
                                  f"splits {list(self.eval_sets)}")
            try:
                if selection is not None:
                    _check_selection(self.eval_sets[split], self.eval_sets[selection], allow_overlap=False)
                reports = policy_reports(scores[split], threshold=cfg.threshold,
                                         selection=scores[selection] if selection else None, stage=stage)
            except ConfigError as exc:  # e.g. a selection split overlapping the evaluated one
                log.warning("threshold policies for %s: %s", split, exc)
                continue
            r["policies"] = {name: {"threshold": rep.threshold, "miou": rep.miou, "auc": rep.auc,
                                    "selection_split": rep.selection_split,
                                    "upper_bound": rep.upper_bound}
                             for name, rep in reports.items() if name in cfg.policies}
            if cfg.curves:
                name = f"{r['tag']}-{stage}-{split}"
                curve = reports["fixed"].curve
                save_curve(self.run_dir / "curves" / f"{name}.json", curve,
                           {"split": split, "cam_method": stage, "tag": r["tag"]})
                plot_curves(self.run_dir / "curves" / f"{name}.png", {f"{split} ({stage})": curve},
                            {name: rep.threshold for name, rep in reports.items()},
                            title=f"mIoU vs background threshold: {r['tag']} {stage} {split}")
                r["curve"] = f"curves/{name}.json"


def _cam_folder(tag: str, stage: str) -> str:
    """``cams/<folder>``: the tag for the plain head-weight CAM, ``<tag>-<method>`` otherwise."""
    return tag if stage == "cam" else f"{tag}-{stage}"


@dataclass
class _CamSource:
    """The model and map function behind one CAM folder."""

    model: Classifier
    tag: str
    head: str
    stage: str
    model_key: str
    cam_fn: Optional[CamFunction]


@dataclass
class _SplitCams:
    """One split's CAM folder between inference and scoring."""

    split: str
    dataset: VOCDataset
    out: Path
    stage: Stage
    reused: bool


def _readable_array(path: Path) -> bool:
    """Whether ``path`` is a readable ``.npy`` array (never unpickled)."""
    try:
        np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError):
        return False
    return True
