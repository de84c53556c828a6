"""The stages after the CAMs: refinement into pseudo masks, a segmentation network trained on them.

A run's ``stages`` (``[cam]``, ``[cam, refine]``, ``[cam, refine, segment]``, ``[cam, segment]``)
picks them.  Both work on the method's final CAMs (the ``final`` rows; other rounds are not
refined) and give rows scored by the same evaluator as the CAMs
(:func:`wsss_bench.evaluation.masks.evaluate_masks`), with ``stage`` ``refined:<refiner>`` or
``seg``, the CAM method they started from, the ignore policy, the coverage and the refiner's
protocol (``crf: used|absent``, weights and their checksum).

Artifacts, each a cached stage (store, ``--resume``, ``--force refine`` / ``--force segment``):

    RUN/cams/<tag>/<train_split>/      the final model's CAMs on the training split
    RUN/refine/<refiner>.pth           the refiner's fitted state (``refine:fit``)
    RUN/refined/<refiner>/<split>/     pseudo masks, one VOC-palette <id>.png per image
    RUN/segment/segment.pth            the segmentation network (``segment:fit``)
    RUN/segment/pred/<split>/          its label maps
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Callable, Optional

from .. import io
from ..data.voc import VOCDataset
from ..evaluation.evaluate import EvalResult, save_confusions
from ..evaluation.masks import evaluate_masks
from ..evaluation.rows import SEG, refined_stage
from ..refinement import BuiltRefiner, build_refiner, refine_images
from .context import MethodContext
from .stage_cache import Stage, digest

log = logging.getLogger("wsss_bench")

#: The marker a finished mask folder holds: the key of the inputs it was made from.
INPUTS = ".inputs"


def final_rows(rows: list[dict[str, Any]], num_splits: int) -> list[dict[str, Any]]:
    """The rows of the method's final CAMs: those marked ``final``, else the last per split."""
    return [r for r in rows if r.get("final")] or rows[-num_splits:]


def later_stages(ctx: MethodContext, rows: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Run the configured stages after ``cam`` on ``rows`` (the method's rows); returns the new
    rows and a summary for ``results.json`` (``{"refine": {...}, "segment": {...}}``)."""
    stages = ctx.config.stages
    if stages == ["cam"]:
        return [], {}
    final = [r for r in final_rows(rows, len(ctx.eval_sets)) if r.get("head", "parent") == "parent"]
    if not final:
        raise ValueError("the method returned no final parent-head rows to refine")
    source = final[0]
    ctx.info(f"later stages {stages[1:]} on {source['tag']} ({source['protocol']['cam_method']})")
    train_cams = ctx.split_cams_like(source, ctx.train_set)
    new_rows: list[dict[str, Any]] = []
    summary: dict[str, Any] = {}
    train_masks: Optional[Path] = None
    if "refine" in stages:
        refined, summary["refine"], train_masks = refine_stage(ctx, source, final, train_cams,
                                                               with_train="segment" in stages)
        new_rows += refined
    if "segment" in stages:
        if train_masks is None:   # [cam, segment]: the CAMs' own pseudo masks at the threshold
            train_masks = threshold_masks(ctx, train_cams)
        segmented, summary["segment"] = segment_stage(ctx, source, final, train_masks)
        new_rows += segmented
    return new_rows, summary


# -- refinement -------------------------------------------------------------------------------
def refine_stage(ctx: MethodContext, source: dict[str, Any], final: list[dict[str, Any]], train_cams: Path,
                 with_train: bool) -> tuple[list[dict[str, Any]], dict[str, Any], Optional[Path]]:
    """Fit the refiner on the training split's CAMs (when it learns), refine every evaluation
    split's final CAMs (and the training split's, for segmentation), score them.  With
    ``refine.sweep``, every value of the swept option refines every evaluation split and each
    split's row takes the value chosen on its selection split (:func:`_choose`)."""
    cfg = ctx.config.refine
    base = build_refiner(cfg.name, dict(cfg.options), ctx.device)
    fitted = fit_refiner(ctx, base, train_cams) if base.needs_fit else None
    option, values = next(iter(cfg.sweep.items()), (None, []))
    splits = [r["split"] for r in final]
    targets = [*splits, *([ctx.train_set.split] if with_train else [])]
    # Each split's selection split among the refined ones; None: it takes the configured value.
    selections = {s: sel if (sel := ctx.selection_for(s)) in splits else None for s in targets}
    if option is not None and None in selections.values() and _configured(base, option, values) not in values:
        values = [*values, _configured(base, option, values)]
    variants = {None: base} if option is None else {
        value: _variant(ctx, cfg.name, {**cfg.options, option: value}, fitted) for value in values}
    scored = _refine_and_score(ctx, variants, option, fitted, final, source["protocol"]["cam_method"])
    chosen = {s: _choose(option, values, base, s, selections[s], scored) for s in targets}
    rows = []
    for r in final:
        value, sweep = chosen[r["split"]]
        result, out = scored[value, r["split"]]
        protocol = variants[value].protocol()
        protocol.setdefault("crf", "absent")
        rows.append(_mask_row(ctx, r, result, out, {**protocol, **({"sweep": sweep} if sweep else {})}))
    train_masks = None
    if with_train:
        value = chosen[ctx.train_set.split][0]
        train_masks = refine_split(ctx, variants[value], _refine_state(variants[value], fitted), train_cams,
                                   ctx.train_set, _variant_name(option, value))
    summary = {"refiner": cfg.name, "options": base.options, "protocol": base.protocol(),
               "ignore_policy": cfg.ignore_policy, "fitted": fitted}
    if option is not None:
        summary["sweep"] = {"option": option, "values": values,
                            "chosen": {s: value for s, (value, _) in chosen.items()},
                            "miou": {split: _miou_by_value(scored, values, split) for split in splits}}
    return rows, summary, train_masks


Scored = dict[tuple[Any, str], tuple[EvalResult, Path]]


def _refine_and_score(ctx: MethodContext, variants: dict[Any, BuiltRefiner], option: Optional[str],
                      fitted: Optional[str], final: list[dict[str, Any]], cam_method: str) -> Scored:
    """Every variant's masks of every evaluation split, scored: ``{(value, split): (result, folder)}``."""
    cfg = ctx.config.refine
    scored: Scored = {}
    for r in final:
        dataset = ctx.eval_sets[r["split"]]
        for value, built in variants.items():
            out = refine_split(ctx, built, _refine_state(built, fitted), ctx.run_dir / r["cams"], dataset,
                               _variant_name(option, value))
            result = ctx.job.on_main(lambda: evaluate_masks(out, dataset, cfg.ignore_policy, ctx.device,
                                                            refined_stage(cfg.name), per_image=True,
                                                            cam_method=cam_method))
            scored[value, r["split"]] = (result, out)
    return scored


def _variant(ctx: MethodContext, name: str, options: dict[str, Any], fitted: Optional[str]) -> BuiltRefiner:
    """The refiner with one swept option changed, using the state the configured one fitted."""
    built = build_refiner(name, options, ctx.device)
    if fitted is not None:
        built.refiner.load_fitted(ctx.run_dir / fitted)
    return built


def _variant_name(option: Optional[str], value: Any) -> Optional[str]:
    """The sweep value's folder and stage suffix (``alpha=4``), None without a sweep."""
    return None if option is None else f"{_safe(option)}={_safe(str(value))}"


def _refine_state(built: BuiltRefiner, fitted: Optional[str]) -> dict[str, Any]:
    """What a refiner's masks depend on besides the CAMs: its options and state."""
    return {"options": built.options, "fitted": fitted, "weights": built.protocol().get("weights_sha256")}


def _configured(base: BuiltRefiner, option: str, values: list[Any]) -> Any:
    """The swept option's configured value (the first swept one if the refiner states none)."""
    return base.options.get(option, values[0])


def _miou_by_value(scored: Scored, values: list[Any], split: str) -> dict[str, float]:
    """Each swept value's mIoU on ``split`` (keys as strings: JSON's)."""
    return {str(v): scored[v, split][0].miou for v in values}


def _choose(option: Optional[str], values: list[Any], base: BuiltRefiner, split: str, selection: Optional[str],
            scored: Scored) -> tuple[Any, dict[str, Any]]:
    """The swept value for ``split``: the best mIoU on ``selection`` (the first of equals), or
    the configured value when there is no selection split; with what a row states about it
    (``miou``: every value's score on ``split``, when it was refined with every value)."""
    if option is None:
        return None, {}
    sweep: dict[str, Any] = {"option": option, "selection_split": selection}
    if selection is None:
        value = _configured(base, option, values)
    else:
        value = max(values, key=lambda v: scored[v, selection][0].miou)
        sweep["selection_miou"] = _miou_by_value(scored, values, selection)
    if (values[0], split) in scored:
        sweep["miou"] = _miou_by_value(scored, values, split)
    return value, {**sweep, "value": value}


def fit_refiner(ctx: MethodContext, built: BuiltRefiner, train_cams: Path) -> str:
    """``refine:fit``: train the refiner on the training split (or reuse the identical earlier
    fit: same options, CAMs and images); returns the fitted file's path, relative to the run."""
    inputs = {"refiner": built.name, "options": built.options, "cams": _folder_digest(train_cams, "*.npz"),
              "ids": digest(ctx.train_set.ids), "root": str(ctx.train_set.root), "seed": ctx.config.seed}
    stage = ctx.stages.stage("refine:fit", "refiners", inputs, ".pth")
    path = ctx.run_dir / "refine" / f"{_safe(built.name)}.pth"

    def fit() -> None:
        built.refiner.fit(ctx.train_set, train_cams, path, ctx.device, show_progress=ctx.show_progress)

    if ctx.job.on_main(lambda: _cached_file(ctx, stage, path, fit)) or not ctx.job.is_main:
        built.refiner.load_fitted(path)   # reused: fit() did not run in this process
    return str(path.relative_to(ctx.run_dir))


def refine_split(ctx: MethodContext, built: BuiltRefiner, state: dict[str, Any], cam_dir: Path,
                 dataset: VOCDataset, variant: Optional[str] = None) -> Path:
    """``refine:<split>`` (``refine:<split>:<variant>`` for a sweep value): the split's pseudo
    masks (cached; a resumed stage keeps the masks already written under the same inputs)."""
    inputs = {**state, "refiner": built.name, "cams": _folder_digest(cam_dir, "*.npz"),
              "ids": digest(dataset.ids), "root": str(dataset.root)}
    stage = ctx.stages.stage(f"refine:{dataset.split}" + (f":{variant}" if variant else ""), "refined", inputs)
    out = ctx.run_dir / "refined" / _safe(built.name) / (variant or "") / dataset.split
    ctx.job.on_main(lambda: _fill_folder(ctx, stage, out, dataset,
                                         lambda resume: refine_images(built, cam_dir, dataset, out,
                                                                      ctx.show_progress, skip_existing=resume)))
    return out


def threshold_masks(ctx: MethodContext, cam_dir: Path) -> Path:
    """Pseudo masks of the training split from its CAMs at ``eval.threshold`` (no refiner)."""
    from ..evaluation.pseudo_masks import export_masks

    threshold = ctx.config.eval.threshold
    inputs = {"cams": _folder_digest(cam_dir, "*.npz"), "threshold": threshold, "ids": digest(ctx.train_set.ids)}
    stage = ctx.stages.stage(f"masks:{ctx.train_set.split}", "masks", inputs)
    out = ctx.run_dir / "masks" / ctx.train_set.split
    ctx.job.on_main(lambda: _fill_folder(ctx, stage, out, ctx.train_set,
                                         lambda resume: export_masks(cam_dir, ctx.train_set, out, threshold,
                                                                     device=ctx.device)))
    return out


# -- segmentation -----------------------------------------------------------------------------
def segment_stage(ctx: MethodContext, source: dict[str, Any], final: list[dict[str, Any]],
                  train_masks: Path) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Train the segmentation network on the training split's pseudo masks, predict every
    evaluation split, score (a split overlapping the training split is marked ``seen``)."""
    from ..engine import segmentation as seg

    cfg = ctx.config.segment
    backbone = cfg.backbone or ctx.config.backbone
    options = seg.SegmentOptions(**{"seed": ctx.config.seed, **cfg.options})
    inputs = {"masks": _folder_digest(train_masks, "*.png"), "backbone": backbone.model_dump(),
              "options": options.model_dump(mode="json"), "ids": digest(ctx.train_set.ids),
              "root": str(ctx.train_set.root)}
    stage = ctx.stages.stage("segment:fit", "segmentation", inputs, ".pth")
    path = ctx.run_dir / "segment" / "segment.pth"
    report: dict[str, Any] = {}

    def train() -> None:
        model = seg.build_segmentation(backbone.name, dict(backbone.options), ctx.num_classes, options)
        trained = seg.train_segmentation(model, ctx.train_set, train_masks, options, ctx.device,
                                         ctx.show_progress, state_file=path.with_suffix(".state.pth"),
                                         state_key=stage.key)
        report.update(trained.to_dict())
        seg.save_segmentation(path, model, {"backbone": backbone.model_dump(), "num_classes": ctx.num_classes,
                                            "options": options.model_dump(mode="json"),
                                            "masks": str(train_masks.relative_to(ctx.run_dir))})
        path.with_suffix(".state.pth").unlink(missing_ok=True)

    ctx.job.on_main(lambda: _cached_file(ctx, stage, path, train))
    model = seg.load_segmentation(path).to(ctx.device)
    train_ids = set(ctx.train_set.ids)
    rows = []
    for split, dataset in ctx.eval_sets.items():
        out = ctx.run_dir / "segment" / "pred" / split
        pred_stage = ctx.stages.stage(f"segment:{split}", "segmented",
                                      {"model": stage.key, "ids": digest(dataset.ids), "root": str(dataset.root),
                                       "infer": [options.infer_scales, options.infer_flip, options.crf]})
        ctx.job.on_main(lambda: _fill_folder(ctx, pred_stage, out, dataset,
                                             lambda resume: seg.predict_split(model, dataset, out, options,
                                                                              ctx.device, ctx.show_progress)))
        result = ctx.job.on_main(lambda: evaluate_masks(out, dataset, "background", ctx.device, SEG,
                                                        per_image=True, cam_method=source["protocol"]["cam_method"]))
        seen = bool(train_ids & set(dataset.ids))
        base = next((r for r in final if r["split"] == split), source)
        rows.append(_mask_row(ctx, base, result, out,
                              {"segment_backbone": backbone.name, "seen": seen,
                               "trained_on": f"{ctx.train_set.split} pseudo masks ({train_masks.relative_to(ctx.run_dir)})"}))
    summary = {"backbone": backbone.model_dump(), "options": options.model_dump(mode="json"),
               "weights": str(path.relative_to(ctx.run_dir)), "train": report or None,
               "masks": str(train_masks.relative_to(ctx.run_dir))}
    return rows, summary


# -- shared -----------------------------------------------------------------------------------
def _cached_file(ctx: MethodContext, stage: Stage, path: Path, make: Callable[[], Any]) -> bool:
    """Give ``stage`` its one output file ``path``: from the store, or an earlier attempt with the
    same key (marker ``<path>.inputs``), else ``make()`` writes it.  Records and publishes the
    stage; returns whether the file was reused (``make`` did not run)."""
    marker = path.with_name(path.name + INPUTS)
    if stage.forced:
        marker.unlink(missing_ok=True)
    if stage.fetch_file(path):
        io.write_text(marker, stage.key)
    if path.is_file() and marker.is_file() and marker.read_text() == stage.key:
        ctx.info(f"{stage.name}: reusing {path}")
        stage.record([path], reused=True)
        return True
    marker.unlink(missing_ok=True)
    make()
    io.write_text(marker, stage.key)   # after the file: a marker means a finished stage
    stage.record([path])
    stage.publish_file(path)
    return False


def _fill_folder(ctx: MethodContext, stage: Stage, out: Path, dataset: VOCDataset,
                 make: Callable[[bool], Any]) -> None:
    """Fill ``out`` with one ``<id>.png`` per image of ``dataset`` for ``stage``'s key: from
    the store, from a finished or half-finished earlier attempt with the same key (resumed),
    or afresh (``make(resume)``); then record and publish it."""
    marker = out / INPUTS
    same = marker.is_file() and marker.read_text() == stage.key and not stage.forced
    if not same:
        # Masks of other inputs are stale: our own files in our own run folder.
        for old in out.glob("*.png"):
            old.unlink()
        io.write_text(marker, stage.key)
    fetched = stage.fetch_folder(out, pattern="*.png")
    missing = [i for i in dataset.ids if not (out / f"{i}.png").is_file()]
    reused = not missing and (same or fetched)
    if missing:
        make(same or fetched)   # resume: keep the masks an interrupted attempt finished
    stage.publish_folder(out, pattern="*.png")
    stage.record([out], reused)


def _mask_row(ctx: MethodContext, base: dict[str, Any], result: EvalResult, out: Path,
              protocol: dict[str, Any]) -> dict[str, Any]:
    """A result row for a scored mask folder, beside the CAM row ``base`` it came from."""
    stage = result.protocol["stage"]
    name = f"{base['tag']}-{stage.replace(':', '-')}-{result.split}"
    row = {"tag": base["tag"], "head": base.get("head", "parent"),
           **({"round": base["round"]} if "round" in base else {}),
           "split": result.split, "stage": stage, "miou": result.miou, "num_images": result.num_images,
           "protocol": {**result.protocol, **protocol}, "per_class": result.per_class,
           "masks": str(out.relative_to(ctx.run_dir)),
           "confusions": save_confusions(ctx.run_dir, f"confusions/{name}.npz", result)}
    return row


def _folder_digest(folder: Path, pattern: str) -> str:
    """A digest of the files of ``folder`` (names and SHA-256s): what a later stage depends on.

    A CAM folder's checksum list (written when it was scored or finished) stands for its files,
    so large CAM folders are not read again."""
    from ..evaluation.camfiles import CHECKSUMS
    from ..io import file_sha256

    listed = Path(folder) / CHECKSUMS
    if pattern == "*.npz" and listed.is_file():
        return digest(listed.read_text())
    return digest({p.name: file_sha256(p) for p in sorted(Path(folder).glob(pattern))})


def _safe(name: str) -> str:
    """A plugin name as a file-name part (``timm:x`` -> ``timm-x``)."""
    return "".join(c if c.isalnum() or c in "-_." else "-" for c in name)
