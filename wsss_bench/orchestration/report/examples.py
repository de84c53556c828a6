"""Example grids of a run report: best / worst / random images, across rounds, galleries."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
from PIL import Image

from ...data.voc import IGNORE_INDEX
from ...errors import DataError, UserError
from ...evaluation.rows import cam_method_of, stage_of
from ...evaluation.tables import pct
from .html import esc, figure, img_tag
from .images import GALLERY_THUMB, colour_hex, data_uri, heatmap_overlay, mask_image, thumbnail
from .loading import Run
from .scores import image_miou, pick_examples, pseudo_mask, score_images


def _legend(class_names: Sequence[str]) -> str:
    items = [f'<span class="swatch" style="background:{colour_hex(0)}"></span>background']
    items += [f'<span class="swatch" style="background:{colour_hex(i + 1)}"></span>{esc(n)}'
              for i, n in enumerate(class_names)]
    items.append(f'<span class="swatch" style="background:{colour_hex(IGNORE_INDEX)}"></span>ignore')
    return f'<p class="note">Colours:{"".join(items)}</p>'


class ExampleRenderer:
    """Thumbnails of one evaluation split: image, ground truth, CAMs, pseudo masks (cached)."""

    def __init__(self, dataset: Any, threshold: float) -> None:
        self.dataset = dataset
        self.threshold = threshold
        self._cache: dict[tuple[str, str], str] = {}

    def _photo(self, image_id: str) -> Image.Image:
        return self.dataset.load_image(image_id)

    def image(self, image_id: str) -> str:
        """The photo as a JPEG thumbnail."""
        key = ("image", image_id)
        if key not in self._cache:
            self._cache[key] = figure(data_uri(thumbnail(self._photo(image_id))), f"{image_id}")
        return self._cache[key]

    def truth(self, image_id: str) -> str:
        """The ground truth in VOC colours (PNG)."""
        key = ("truth", image_id)
        if key not in self._cache:
            mask = self.dataset.load_mask(image_id)
            self._cache[key] = figure(data_uri(thumbnail(mask_image(mask), nearest=True), "png"),
                                      "ground truth", "thumb mask")
        return self._cache[key]

    def label_map(self, folder: Path, image_id: str, caption: str) -> str:
        """A label-map PNG of ``folder`` (refined mask, segmentation) in VOC colours, with the
        image's mIoU; a missing or unreadable file is a cell that says so."""
        from ...data.voc import read_mask

        path = Path(folder) / f"{image_id}.png"
        try:
            labels = read_mask(path, self.dataset.num_classes)
        except (OSError, ValueError, DataError):
            return f'<div class="warn">{esc(caption)}: no mask {esc(path.name)}</div>'
        score = image_miou(np.where(labels == IGNORE_INDEX, 0, labels), self.dataset.load_mask(image_id),
                           self.dataset.num_classes)
        return figure(data_uri(thumbnail(mask_image(labels), nearest=True), "png"),
                      f"{caption} (mIoU {pct(score)} %)", "thumb mask")

    def cams(self, cam_dir: Path, image_id: str) -> tuple[list[str], float]:
        """One heat map per class of the CAM file, the pseudo mask, and the image's mIoU."""
        from ...evaluation.camfiles import read_cam

        photo = self._photo(image_id)
        truth = self.dataset.load_mask(image_id)
        keys, cams = read_cam(cam_dir / f"{image_id}.npz", self.dataset.num_classes, truth.shape)
        names = self.dataset.class_names
        cells = [figure(data_uri(thumbnail(heatmap_overlay(photo, cam))), f"CAM {names[int(k)]} (max {cam.max():.2f})")
                 for k, cam in zip(keys, cams)]
        labels = pseudo_mask(keys, cams, self.threshold)
        score = image_miou(labels, truth, self.dataset.num_classes)
        cells.append(figure(data_uri(thumbnail(mask_image(labels), nearest=True), "png"),
                            f"pseudo mask @ {self.threshold:g}", "thumb mask"))
        return cells, score


def _split_for_examples(run: Run, split: Optional[str]) -> dict[str, Any]:
    final = [r for r in run.final if r.get("head", "parent") == "parent" and r.get("cams")] or \
        [r for r in run.final if r.get("cams")]
    if not final:
        raise DataError(f"{run.path / 'results.json'}: no final row with a CAM folder")
    if split is not None:
        chosen = [r for r in final if r["split"] == split]
        if not chosen:
            raise UserError(f"--split {split!r}: the final rows cover splits "
                            f"{', '.join(r['split'] for r in final)}")
        return chosen[0]
    return next((r for r in final if r["split"] == "val"), final[0])


def examples_section(run: Run, row: dict[str, Any], dataset: Any, renderer: ExampleRenderer,
                     count: int, seed: int) -> str:
    """Best, worst and random images of the final CAMs by per-image mIoU."""
    cam_dir = run.path / row["cams"]
    scores = score_images(cam_dir, dataset, renderer.threshold)
    if not scores:
        return f'<p class="warn">No CAM files in {esc(row["cams"])}.</p>'
    chosen = pick_examples(scores, count, seed)
    parts = [f'<p class="note">Split <b>{esc(row["split"])}</b>, CAMs <code>{esc(row["cams"])}</code> '
             f"({len(scores)} images ranked by per-image mIoU: mean IoU over the classes of the "
             f"image's ground truth, pseudo mask at background score {renderer.threshold:g}). "
             f"{count} best, {count} worst, {count} random (seed {seed}).</p>",
             _legend(dataset.class_names)]
    later = later_stage_rows(run, row["split"])   # refined masks, segmentation predictions
    for kind, score in chosen:
        cells, _ = renderer.cams(cam_dir, score.image_id)
        cells += [renderer.label_map(run.path / r["masks"], score.image_id, _stage_caption(r)) for r in later]
        label = f'<div class="label"><b>{esc(kind)}</b><br>{esc(score.image_id)}<br>mIoU {pct(score.miou)} %</div>'
        parts.append(f'<div class="row">{label}{renderer.image(score.image_id)}'
                     f'{renderer.truth(score.image_id)}{"".join(cells)}</div>')
    return "".join(parts)


def later_stage_rows(run: Run, split: str) -> list[dict[str, Any]]:
    """The split's refined and segmentation rows whose mask folder is in the run folder."""
    return [r for r in run.rows if r["split"] == split and stage_of(r) != "cam" and r.get("masks")
            and (run.path / r["masks"]).is_dir()]


def _stage_caption(row: dict[str, Any]) -> str:
    stage = stage_of(row)
    if stage == "seg":
        return "segmentation" + (" (seen in training)" if row["protocol"].get("seen") else "")
    return stage.replace("refined:", "refined: ")


def across_rounds_section(run: Run, row: dict[str, Any], dataset: Any, renderer: ExampleRenderer,
                          seed: int) -> Optional[str]:
    """The same images under every round's CAMs: the largest gain, the largest loss, one random."""
    rows = sorted((r for r in run.rows if "round" in r and r["split"] == row["split"]
                   and r.get("head", "parent") == "parent" and r.get("cams")
                   and stage_of(r) == "cam" and cam_method_of(r) == cam_method_of(row)
                   and (run.path / r["cams"]).is_dir()), key=lambda r: int(r["round"]))
    if len({r["round"] for r in rows}) < 2:
        return None
    per_round = {int(r["round"]): {s.image_id: s.miou for s in score_images(run.path / r["cams"], dataset, renderer.threshold)}
                 for r in rows}
    first, last = min(per_round), max(per_round)
    common = [i for i in per_round[last] if i in per_round[first]
              and per_round[first][i] == per_round[first][i] and per_round[last][i] == per_round[last][i]]
    if not common:
        return None
    delta = {i: per_round[last][i] - per_round[first][i] for i in common}
    picks: list[tuple[str, str]] = []
    gain = max(common, key=lambda i: (delta[i], i))
    picks.append((f"largest gain ({pct(delta[gain])} points)", gain))
    loss = min(common, key=lambda i: (delta[i], i))
    if loss != gain:
        picks.append((f"largest loss ({pct(delta[loss])} points)", loss))
    rest = [i for i in common if i not in (gain, loss)]
    if rest:
        pick = rest[int(np.random.default_rng(seed + 1).integers(len(rest)))]
        picks.append((f"random ({pct(delta[pick])} points)", pick))
    parts = [f'<p class="note">Split <b>{esc(row["split"])}</b>: each block is one image under the CAMs '
             f"of rounds {first}..{last} (change of per-image mIoU from round {first} to {last}).</p>"]
    for kind, image_id in picks:
        parts.append(f"<h3>{esc(image_id)}: {esc(kind)}</h3>")
        # One table row per round; the image and its ground truth span all of them.
        span = f' rowspan="{len(rows)}"'
        lines = []
        for n, r in enumerate(rows):
            cells, score = renderer.cams(run.path / r["cams"], image_id)
            lead = (f"<td{span}>{renderer.image(image_id)}</td><td{span}>{renderer.truth(image_id)}</td>"
                    if n == 0 else "")
            lines.append(f'<tr>{lead}<td class="label">round {esc(r["round"])}<br>mIoU {pct(score)} %</td>'
                         f'<td><div class="row">{"".join(cells)}</div></td></tr>')
        parts.append(f'<table class="rounds">{"".join(lines)}</table>')
    return "".join(parts)


def gallery_section(run: Run, seed: int, per_cluster: int = 4) -> Optional[str]:
    """A few training images per sub-category of the last round, for 2-3 classes."""
    files = sorted(run.path.glob("subcategories/round*.npy"),
                   key=lambda p: int("".join(c for c in p.stem if c.isdigit()) or 0))
    files = [p for p in files if p.stem[len("round"):].isdigit()]   # not round<r>.targets.npy
    if not files:
        return None
    path = files[-1]
    try:
        assignment = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise DataError(f"{path}: unreadable sub-category file ({exc})") from None
    ids = run.train_ids()
    names = run.class_names
    if assignment.ndim != 2 or assignment.shape[0] != len(ids) or assignment.shape[1] != len(names):
        return (f'<p class="warn">{esc(path.name)} has shape {assignment.shape}, but the training split has '
                f"{len(ids)} images and {len(names)} classes: gallery skipped.</p>")
    root = run.data_root("train")

    clusters_per_class = [len(set(assignment[:, c][assignment[:, c] >= 0].tolist())) for c in range(len(names))]
    candidates = [c for c in range(len(names)) if clusters_per_class[c] >= 2]
    # Many clusters per class means many thumbnails: show fewer classes then, to stay small.
    n_classes = 3 if max(clusters_per_class, default=0) <= 6 else 2
    chosen = sorted(candidates, key=lambda c: (-(assignment[:, c] >= 0).sum(), c))[:n_classes]
    if not chosen:
        return '<p class="note">No class has two or more sub-categories.</p>'
    rng = np.random.default_rng(seed)
    parts = [f'<p class="note">From <code>{esc(path.relative_to(run.path))}</code>: up to {per_cluster} '
             f"random training images per sub-category of the {len(chosen)} classes with the most "
             "images; where a ground-truth mask exists, everything but the class is dimmed.</p>"]
    for c in chosen:
        column = assignment[:, c]
        parts.append(f"<h3>{esc(names[c])}</h3>")
        boxes = []
        for k in sorted(set(column[column >= 0].tolist())):
            members = np.flatnonzero(column == k)
            shown = sorted(rng.choice(members, size=min(per_cluster, len(members)), replace=False).tolist())
            cells = [img_tag(data_uri(thumbnail(_class_focus(root, ids[i], c, len(names)), GALLERY_THUMB)),
                             ids[i], "thumb small") for i in shown]
            boxes.append(f'<div class="cluster"><div class="caption">sub-category {k} · {len(members)} '
                         f'image{"s" if len(members) != 1 else ""}</div>{"".join(cells)}</div>')
        parts.append(f'<div class="row">{"".join(boxes)}</div>')
    return "".join(parts)


def _class_focus(root: Path, image_id: str, class_index: int, num_classes: int) -> Image.Image:
    """A training image with everything but ``class_index`` dimmed, when its mask exists.

    Images often hold several objects; dimming the rest shows which one the sub-category is
    about.  Without a mask (image-level labels only) the plain image is shown.
    """
    from ...data.voc import IMAGE_DIR, MASK_DIRS, open_image, read_mask

    image = open_image(root / IMAGE_DIR / f"{image_id}.jpg")
    mask_path = next((root / d / f"{image_id}.png" for d in MASK_DIRS if (root / d / f"{image_id}.png").is_file()), None)
    if mask_path is None:
        return image
    mask = read_mask(mask_path, num_classes)
    if mask.shape != (image.height, image.width) or not (mask == class_index + 1).any():
        return image
    pixels = np.asarray(image, np.float32)
    keep = (mask == class_index + 1)[..., None]
    return Image.fromarray(np.where(keep, pixels, 0.3 * pixels + 40).astype(np.uint8), mode="RGB")
