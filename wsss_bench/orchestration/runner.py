"""``wsss run``: resolve data and plugins, let the method work, write the run directory."""
from __future__ import annotations

import logging
import os
import time
from datetime import datetime
from pathlib import Path
from typing import Any, Optional

import torch
from pydantic import ValidationError

from .. import contracts, distributed, io
from ..config import RunConfig
from ..data.open import cache_dir, open_datasets, resolve_data_root  # noqa: F401 (the old home)
from ..device import seed_everything
from ..errors import ConfigError, WeightsError
from ..registry import format_validation_error
from ..evaluation.tables import results_markdown
from ..plugins import registry
from . import runlock
from .context import MethodContext
from .manifest import Manifest
from .pipeline import final_rows, later_stages

log = logging.getLogger("wsss_bench")


def default_run_dir(config: RunConfig) -> Path:
    """``runs/<time>-<method>-<backbone>``."""
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    backbone = config.backbone.name.replace(":", "-").replace("/", "-")
    return Path("runs") / f"{stamp}-{config.method.name}-{backbone}"


def prepare_run_dir(path: Path, resume: bool) -> Path:
    """Create the run directory; refuse to mix a new run into a used folder unless resuming."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ConfigError(f"{path}: output path exists and is not a directory")
    if path.is_dir() and any(path.iterdir()):
        if not resume:
            raise ConfigError(f"{path}: output folder is not empty; choose another --out or pass --resume")
        if not runlock.is_run_folder(path):
            # --resume continues a run; it must not scatter a run's files among someone else's.
            raise ConfigError(f"{path}: holds files but no wsss run (no manifest.json); --resume "
                              "continues a run: choose an empty or new --out")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"{path}: cannot create the output folder ({exc.strerror})") from None
    if not os.access(path, os.W_OK):
        raise ConfigError(f"{path}: output folder is not writable")
    runlock.acquire(path)  # held until the command ends; a second writer is refused
    if resume:
        # Temporary files of a killed process (ours by name) are never valid output.
        for stale in path.rglob(".*"):
            if stale.is_file() and stale.name.endswith((".tmp", ".link")):
                stale.unlink()
    return path


def validate_plugins(config: RunConfig) -> Any:
    """Resolve every named plugin and check its options; build the backbone on the meta device
    (no memory, no compute) so that bad variants such as ``timm:resnet1888`` fail early.

    Returns the method object, built once from its validated options: the run executes this
    very object (:attr:`MethodContext.method`).
    """
    # Building the method object is cheap and lets it check what it names (e.g. a clusterer).
    method = registry("method").create(config.method.name, **config.method.options)
    if config.dataset.name is not None:
        registry("dataset").get(config.dataset.name).validate_options(dict(config.dataset.options))
    with torch.device("meta"):
        registry("backbone").create(config.backbone.name, **config.backbone.options)
    if "refine" in config.stages:
        refiner = registry("refiner").get(config.refine.name)
        refiner.validate_options(dict(config.refine.options))
        for option, values in config.refine.sweep.items():   # each value is a configuration too
            for value in values:
                refiner.validate_options({**config.refine.options, option: value})
    if "segment" in config.stages:
        from ..engine.segmentation import SegmentOptions

        try:
            SegmentOptions(**config.segment.options)
        except ValidationError as exc:
            raise ConfigError(f"invalid config: segment.options: {format_validation_error(exc)}") from None
        backbone = config.segment.backbone or config.backbone
        with torch.device("meta"):
            registry("backbone").create(backbone.name, **backbone.options)
    return method


def preflight(config: RunConfig, training: bool = True) -> Any:
    """Every check a run makes before it writes anything; ``wsss run --dry-run`` and
    ``wsss bench --dry-run`` make exactly these.

    Plugins and their options (:func:`validate_plugins`), the device, the data root of a
    config that names one, and (``training``) the ``train.init_weights`` file.  Returns the
    method object :func:`validate_plugins` built.
    """
    from ..data.voc import check_root
    from ..device import resolve_device

    method = validate_plugins(config)
    resolve_device(config.device)
    if config.dataset.name is None and config.dataset.root is not None:
        check_root(Path(config.dataset.root))
    init = config.train.init_weights
    if training and init is not None:
        if Path(init).is_dir():
            raise WeightsError(f"{init}: train.init_weights is a directory; give the weights file inside it")
        if not Path(init).is_file():
            raise WeightsError(f"{init}: train.init_weights file not found")
    return method


def make_context(config: RunConfig, run_dir: Path, resume: bool = False,
                 eval_splits: Optional[list[str]] = None, require_masks: bool = True,
                 store: Optional[Path] = None, force: tuple[str, ...] = (),
                 training: bool = True) -> MethodContext:
    """Validate plugins, pick the device, seed, open the data and the run directory.

    ``training=False`` (inference from a checkpoint) skips what only training needs, such as
    the ``train.init_weights`` file.
    """
    method = preflight(config, training)
    # Denormal floats (weights decayed towards zero, tiny activations) slow CPU kernels down by
    # an order of magnitude; flushing them changes nothing measurable in CAMs or mIoU.
    torch.set_flush_denormal(True)
    job, device = distributed.setup(config.device)
    seed_everything(config.seed)
    if eval_splits is not None:
        config = config.model_copy(update={"dataset": config.dataset.model_copy(
            update={"eval_splits": eval_splits})})
    with job.main_first():  # a generated dataset is written once, by rank 0
        train_set, eval_sets = open_datasets(config, require_masks)
    # Rank 0 checks and creates the folder (the others would find it already in use).
    run_dir = job.on_main(lambda: prepare_run_dir(run_dir, resume))
    manifest = None
    if job.is_main:
        manifest = Manifest(run_dir, config, device,
                            {"train": train_set, **{f"eval:{k}": v for k, v in eval_sets.items()}})
        manifest.save()
    return MethodContext(config, run_dir, device, train_set, eval_sets,
                         not config.quiet and job.is_main, manifest=manifest,
                         store=Path(store) if store is not None else None, force=tuple(force),
                         job=job, method=method)


def run(config: RunConfig, out_dir: Optional[Path] = None, resume: bool = False,
        store: Optional[Path] = None, force: tuple[str, ...] = ()) -> dict[str, Any]:
    """Run the configured method end to end; returns the content of ``results.json``.

    ``store`` is a content-addressed cache folder shared between runs: stages whose inputs
    were computed before (same weights, data, settings) are linked in, not recomputed.
    """
    start = time.perf_counter()
    job, _ = distributed.setup(config.device)
    # The default folder name holds a time stamp: every process must use rank 0's.
    run_dir = Path(out_dir) if out_dir else job.broadcast(default_run_dir(config))
    ctx = make_context(config, run_dir, resume, store=store, force=force)
    try:
        return _run_method(config, ctx, start)
    finally:
        if job.is_main:
            runlock.release(ctx.run_dir)


def _miou_by_stage(final: list[dict[str, Any]], later_rows: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """``{stage: {split: mIoU}}`` of the final CAM rows and the rows of the later stages."""
    table: dict[str, dict[str, float]] = {}
    for r in [*final, *later_rows]:
        table.setdefault(r.get("stage", "cam"), {})[r["split"]] = r["miou"]
    return table


def _run_method(config: RunConfig, ctx: MethodContext, start: float) -> dict[str, Any]:
    """The method's work in a prepared context, then ``results.json`` / ``results.md``."""
    job = ctx.job
    run_dir, device, eval_sets = ctx.run_dir, ctx.device, ctx.eval_sets
    if job.is_main:
        io.write_yaml(run_dir / "config.yaml", config.to_dict())
    log.info("run %s: method %s, backbone %s, %d training images, device %s", run_dir,
             config.method.name, config.backbone.name, len(ctx.train_set.ids), device)
    component = registry("method").get(config.method.name)
    outcome = contracts.check_method_outcome(ctx.method.run(ctx), component)
    final = final_rows(outcome["rows"], len(eval_sets))
    # Refinement and segmentation of the final CAMs, when `stages` asks for them.
    later_rows, later = later_stages(ctx, outcome["rows"])
    rows = [*outcome["rows"], *later_rows]
    results = {
        "method": config.method.name, "backbone": config.backbone.name,
        "dataset": config.dataset.name or str(config.dataset.root), "seed": config.seed,
        "device": str(device), "threshold_policy": config.eval.threshold_policy,
        "threshold": config.eval.threshold, "train_split": config.dataset.train_split,
        "eval_splits": list(eval_sets), "config_digest": config.digest(),
        "miou": {r["split"]: r["miou"] for r in final},
        "stages": list(config.stages),
        # The headline of each stage: final CAMs, refined masks, segmentation, per split.
        "miou_by_stage": _miou_by_stage(final, later_rows),
        **later,
        "rows": rows, "final": final, "extra": {**ctx.extra, **outcome.get("extra", {})},
        "tables": outcome.get("tables", {}), "torch": torch.__version__,
        "wall_time_s": round(time.perf_counter() - start, 2),
    }
    # Method-level figures (e.g. SC-CAM's sub-type AMI per round) become top-level keys; they
    # never replace the host's own.
    results.update({k: v for k, v in outcome.get("summary", {}).items() if k not in results})
    if job.is_main:
        io.write_json(run_dir / "results.json", results)
        io.write_text(run_dir / "results.md", results_markdown(results))
    if ctx.manifest is not None:
        ctx.manifest.finish()
    job.barrier()  # results.json exists for every process once run() returns
    results["run_dir"] = str(run_dir)
    return results
