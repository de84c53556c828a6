"""SC-CAM (Chang et al., CVPR 2020): sub-category exploration over R rounds.

Round 0 is the baseline classifier (trained, or a user checkpoint such as PSA's
``res38_cls.pth``).  Each round r = 1..R then:

1. extracts one feature per training image with the round r-1 model (GAP of the last map);
2. clusters, per parent class, the features of the images holding that class into K
   sub-categories with a clusterer plugin;
3. trains a classifier with a parent head and a C·K sub-category head (index ``c·K + k``),
   loss = parent + λ·sub, from the initial weights again (the paper's choice; configurable).

CAMs are read from the parent head.  K larger than a class's image count is clipped to that
count (each image its own sub-category); per-class K is set with ``k_per_class``, or by the
clusterer itself (``choose_k``, e.g. the ``oracle``'s true sub-type counts).

On a dataset that declares its true sub-types (``subtype_labels.json``), every round also
reports the AMI and purity of its clusters against them (``subtype_ami`` / ``subtype_purity``),
and the clusterer receives the per-class metadata (:mod:`wsss_bench.clustering`).
"""
from __future__ import annotations

import functools

from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from wsss_bench import clustering
from wsss_bench.clustering import ClusterMetadata
from wsss_bench.data.subtypes import SubtypeTruth
from wsss_bench.errors import ConfigError
from wsss_bench.evaluation.subtype_scores import subtype_scores
from wsss_bench.hookspecs import hookimpl

if TYPE_CHECKING:  # pragma: no cover - annotations only
    from wsss_bench.contracts import MethodContext, MethodOutcome


class ClustererChoice(BaseModel):
    """Which clusterer plugin groups the features, with its options."""

    model_config = ConfigDict(extra="forbid")
    name: str = "kmeans"
    options: dict[str, Any] = Field(default_factory=dict)


class SubcatOptions(BaseModel):
    """Options of the ``subcat`` method (defaults follow SC-CAM's code)."""

    model_config = ConfigDict(extra="forbid")
    rounds: int = Field(default=3, ge=1, le=20)
    k: int = Field(default=10, ge=1, description="sub-categories per parent class")
    k_per_class: dict[str, int] = Field(default_factory=dict, description="per-class K by class name")
    loss_weight: float = Field(default=5.0, ge=0, description="λ, weight of the sub-category loss")
    clusterer: ClustererChoice = Field(default_factory=ClustererChoice)
    reinit_each_round: bool = Field(default=True, description="restart every round from the initial weights (paper); false fine-tunes the previous round")
    round0_weights: Optional[Path] = Field(default=None, description="round-0 checkpoint, e.g. PSA res38_cls.pth")
    snapshot_epochs: Optional[list[int]] = Field(default=None, description="epoch kept per round 1..R (SC-CAM: 30, 40, 50)")
    sub_head_cams: bool = Field(default=False, description="also score the merged sub-category maps")
    eval_every_round: bool = True


def class_k(options: SubcatOptions, class_names: list[str]) -> list[int]:
    """K per parent class."""
    unknown = sorted(set(options.k_per_class) - set(class_names))
    if unknown:
        raise ConfigError(f"method.options.k_per_class names unknown classes {unknown}; "
                          f"classes are {class_names}")
    return [options.k_per_class.get(name, options.k) for name in class_names]


def class_metadata(labels: np.ndarray, ids: list[str], class_names: list[str],
                   truth: Optional[SubtypeTruth], matrix: Optional[np.ndarray] = None) -> list[ClusterMetadata]:
    """What a clusterer may know about each class's images (ids, true sub-types if declared).

    ``matrix`` is ``truth.matrix(ids)`` when the caller has it already.
    """
    if truth is not None and matrix is None:
        matrix = truth.matrix(ids)
    out: list[ClusterMetadata] = []
    for c, name in enumerate(class_names):
        members = np.flatnonzero(labels[:, c] > 0)
        out.append(ClusterMetadata(
            class_index=c, class_name=name, image_ids=[ids[i] for i in members],
            subtypes=matrix[members, c] if matrix is not None else None,
            num_subtypes=truth.num_subtypes[c] if truth is not None else None))
    return out


def cluster_per_class(features: np.ndarray, labels: np.ndarray, ks: list[int], clusterer: Any,
                      seed: int, metadata: Optional[list[ClusterMetadata]] = None) -> np.ndarray:
    """Sub-category id per (image, class): ``[N, C]`` int64, -1 where the image lacks the class."""
    assignment = np.full(labels.shape, -1, np.int64)
    for c, k in enumerate(ks):
        members = np.flatnonzero(labels[:, c] > 0)
        if members.size == 0:
            continue
        assignment[members, c] = clustering.fit_predict(clusterer, features[members], k, seed,
                                                        metadata[c] if metadata else None)
    return assignment


def chosen_ks(ks: list[int], clusterer: Any, metadata: list[ClusterMetadata]) -> list[int]:
    """K per class after the clusterer's own choice (``choose_k``, e.g. the oracle's true count)."""
    return [clustering.choose_k(clusterer, k, meta) for k, meta in zip(ks, metadata)]


def subcategory_targets(assignment: np.ndarray, k_max: int) -> np.ndarray:
    """Multi-hot ``[N, C·K]`` targets: one active sub-category per present parent."""
    n, c = assignment.shape
    targets = np.zeros((n, c * k_max), np.float32)
    rows, classes = np.nonzero(assignment >= 0)
    targets[rows, classes * k_max + assignment[rows, classes]] = 1.0
    return targets


def changed_since(previous: Optional[np.ndarray], current: np.ndarray) -> Optional[int]:
    """(image, class) pairs whose sub-category changed, after matching cluster ids per class.

    Cluster ids are arbitrary across rounds, so each class's ids are matched one-to-one by the
    Hungarian algorithm on the overlap table before counting disagreements.
    """
    if previous is None:
        return None
    from scipy.optimize import linear_sum_assignment

    changed = 0
    for c in range(current.shape[1]):
        members = current[:, c] >= 0
        a, b = previous[members, c], current[members, c]
        if a.size == 0:
            continue
        table = np.zeros((a.max() + 1, b.max() + 1), np.int64)
        np.add.at(table, (a, b), 1)
        rows, cols = linear_sum_assignment(-table)
        changed += int(a.size - table[rows, cols].sum())
    return changed


def cluster_stats(assignment: np.ndarray, previous: Optional[np.ndarray],
                  class_names: list[str]) -> dict[str, Any]:
    """Cluster sizes per class and how many assignments moved since the last round."""
    sizes = {name: np.bincount(assignment[assignment[:, c] >= 0, c]).tolist()
             for c, name in enumerate(class_names)}
    return {"sizes": sizes, "pairs": int((assignment >= 0).sum()),
            "changed": changed_since(previous, assignment)}


class SubCategoryCam:
    """The SC-CAM method (see the module docstring)."""

    def __init__(self, **options: Any) -> None:
        self.options = SubcatOptions(**options)
        # Fail at configuration time, not after round 0 has trained, on a bad clusterer.
        from wsss_bench.plugins import registry

        registry("clusterer").get(self.options.clusterer.name).validate_options(
            self.options.clusterer.options)

    def run(self, ctx: MethodContext) -> MethodOutcome:
        opts = self.options
        clusterer = ctx.clusterer(opts.clusterer.name, opts.clusterer.options)
        labels = np.stack([ctx.train_set.label(i) for i in ctx.train_set.ids])
        truth = ctx.train_set.subtype_truth()
        truth_matrix = truth.matrix(ctx.train_set.ids) if truth is not None else None
        metadata = class_metadata(labels, ctx.train_set.ids, ctx.class_names, truth, truth_matrix)
        ks = chosen_ks(class_k(opts, ctx.class_names), clusterer, metadata)
        k_max = max(ks)
        if opts.round0_weights is not None:
            model = ctx.load_classifier(opts.round0_weights)
        else:
            model = ctx.new_classifier()
            ctx.train(model, "round0")
        rows = ctx.cams_and_scores(model, "round0", row={"round": 0}) if opts.eval_every_round else []
        previous: Optional[np.ndarray] = None
        stats: dict[str, Any] = {}
        diagnostics: dict[str, Any] = {}
        for r in range(1, opts.rounds + 1):
            features = ctx.features(model, f"round{r - 1}")
            # Clustered once (rank 0 under torchrun) and shared, so every process trains on the
            # same sub-category labels.
            assignment = ctx.shared(functools.partial(cluster_per_class, features, labels, ks, clusterer,
                                                      ctx.config.seed, metadata))
            stats[f"round{r}"] = cluster_stats(assignment, previous, ctx.class_names)
            diag: dict[str, Any] = {}
            if truth_matrix is not None:
                diag = subtype_scores(assignment, truth_matrix, ctx.class_names)
                diagnostics[f"round{r}"] = diag
                ctx.info(f"round{r}: sub-type AMI {_fmt(diag['ami']['mean'])}, "
                         f"purity {_fmt(diag['purity']['mean'])} (against the dataset's true sub-types)")
            ctx.save_array(f"subcategories/round{r}.npy", assignment)
            previous = assignment
            targets = subcategory_targets(assignment, k_max)
            next_model = ctx.new_classifier(sub_classes=len(ks) * k_max)
            if not opts.reinit_each_round:  # fine-tune: carry the backbone and parent head over
                next_model.backbone.load_state_dict(model.backbone.state_dict())
                next_model.heads["parent"].load_state_dict(model.heads["parent"].state_dict())
            snapshot = opts.snapshot_epochs[r - 1] if opts.snapshot_epochs and len(opts.snapshot_epochs) >= r else None
            ctx.train(next_model, f"round{r}", extra_targets={"sub": targets},
                      loss_weights={"sub": opts.loss_weight}, seed_offset=r, snapshot_epoch=snapshot)
            model = next_model
            last = r == opts.rounds
            if opts.eval_every_round or last:
                extra_cols = {"subtype_ami": diag["ami"]["mean"], "subtype_purity": diag["purity"]["mean"]} if diag else {}
                rows += ctx.cams_and_scores(model, f"round{r}", row={"round": r, "final": last, **extra_cols})
                if opts.sub_head_cams:
                    rows += ctx.cams_and_scores(model, f"round{r}", head="sub", row={"round": r})
        tables = {"Sub-category clusters per round": cluster_table(stats)}
        summary: dict[str, Any] = {}
        if diagnostics:
            tables["Sub-categories against the true sub-types"] = diagnostics_table(diagnostics, ctx.class_names)
            summary = {"subtype_ami": {tag: d["ami"] for tag, d in diagnostics.items()},
                       "subtype_purity": {tag: d["purity"] for tag, d in diagnostics.items()}}
        return {"rows": rows, "extra": {"clusters": stats, "k_per_class": dict(zip(ctx.class_names, ks))},
                "tables": tables, "summary": summary}


def _fmt(value: Optional[float]) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def diagnostics_table(diagnostics: dict[str, Any], class_names: list[str]) -> str:
    """Markdown: per round, mean and per-class AMI / purity against the true sub-types."""
    from wsss_bench.evaluation.tables import markdown_table

    body = []
    for tag, d in diagnostics.items():
        for metric in ("ami", "purity"):
            body.append([tag, metric, _fmt(d[metric]["mean"])]
                        + [_fmt(d[metric]["per_class"][name]) for name in class_names])
    return markdown_table(["round", "score", "mean (classes with >= 2 sub-types)"] + class_names, body)


def cluster_table(stats: dict[str, Any]) -> str:
    """Markdown: per round, cluster-size range and how many assignments changed."""
    from wsss_bench.evaluation.tables import markdown_table

    body = []
    for tag, s in stats.items():
        sizes = [n for per_class in s["sizes"].values() for n in per_class]
        changed = "–" if s["changed"] is None else f"{s['changed']} ({100 * s['changed'] / max(1, s['pairs']):.1f} %)"
        body.append([tag, s["pairs"], min(sizes) if sizes else 0, int(np.median(sizes)) if sizes else 0,
                     max(sizes) if sizes else 0, changed])
    return markdown_table(["round", "(image, class) pairs", "min size", "median size", "max size",
                           "changed since previous round"], body)


@hookimpl
def register_methods(register: Any) -> None:
    register("subcat", SubCategoryCam, help="SC-CAM: sub-category exploration, R rounds (CVPR 2020)",
             options=SubcatOptions)


@hookimpl
def register_commands(cli: Any) -> None:
    import click

    from wsss_bench.commands import config_options, resolve_config

    @cli.command("cluster")
    @config_options
    @click.option("--out", required=True, type=click.Path(path_type=Path), help="Run directory.")
    @click.option("--features", "features_file", required=True, type=click.Path(path_type=Path),
                  help="Features [N, D] of the training split (from `wsss extract-features`).")
    @click.option("--tag", default="round1", show_default=True,
                  help="Writes OUT/subcategories/TAG.npy and TAG.targets.npy.")
    @click.option("--k", type=int, help="Sub-categories per class (default: method.options.k).")
    @click.option("--clusterer", help="Clusterer plugin (default: method.options.clusterer.name).")
    def cluster_command(out: Path, features_file: Path, tag: str, k: Optional[int],
                        clusterer: Optional[str], **flags: Any) -> None:
        """SC-CAM step 2: per-class clustering of image features into sub-category labels."""
        from wsss_bench import io
        from wsss_bench.components import create_clusterer
        from wsss_bench.errors import DataError
        from wsss_bench.data.open import open_datasets

        config = resolve_config(**flags)
        raw = dict(config.method.options) if config.method.name == "subcat" else {}
        if k is not None:
            raw["k"] = k
        if clusterer:
            raw["clusterer"] = {"name": clusterer}
        opts = SubcatOptions(**raw)
        train_set, _ = open_datasets(config.model_copy(update={"dataset": config.dataset.model_copy(
            update={"eval_splits": []})}))
        try:
            features = np.load(features_file, allow_pickle=False)
        except (OSError, ValueError) as exc:
            raise DataError(f"{features_file}: cannot read features ({exc})") from None
        if features.ndim != 2 or features.shape[0] != len(train_set.ids):
            raise DataError(f"{features_file}: expected features [{len(train_set.ids)}, D] for split "
                            f"{train_set.split!r}, got {features.shape}")
        bad = np.flatnonzero(~np.isfinite(features).all(axis=1)) if features.dtype.kind == "f" else []
        if len(bad):
            raise DataError(f"{features_file}: NaN or Inf in {len(bad)} of {len(features)} rows "
                            f"(first: row {bad[0]}, image {train_set.ids[bad[0]]!r})")
        labels = np.stack([train_set.label(i) for i in train_set.ids])
        algo = create_clusterer(opts.clusterer.name, **opts.clusterer.options)
        metadata = class_metadata(labels, train_set.ids, train_set.class_names, train_set.subtype_truth())
        ks = chosen_ks(class_k(opts, train_set.class_names), algo, metadata)
        assignment = cluster_per_class(features, labels, ks, algo, config.seed, metadata)
        folder = Path(out) / "subcategories"
        io.write_with(folder / f"{tag}.npy", lambda h: np.save(h, assignment, allow_pickle=False))
        targets = subcategory_targets(assignment, max(ks))
        io.write_with(folder / f"{tag}.targets.npy", lambda h: np.save(h, targets, allow_pickle=False))
        click.echo(f"sub-categories: {folder / (tag + '.npy')}; train with "
                   f"`wsss train --targets sub={folder / (tag + '.targets.npy')} --loss-weight sub={opts.loss_weight}`")
