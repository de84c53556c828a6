"""Speed and memory of the pipeline stages, each row measured in this process on identical inputs.

    python benchmarks/speed.py --quick        # a couple of minutes on a 2-core CPU
    python benchmarks/speed.py                # larger images, full-width ResNet-38 included

Rows:
* CAM inference (multi-scale 1.0/0.5/1.5/2.0 + flip) of the toolkit against a *reference path*
  written here with the original SC-CAM structure: batch 1 per scale and flip, every class map
  upsampled to full resolution, fusion and normalisation in numpy.  Printed: images/s, speed-up,
  max |difference| of the normalised maps, and the mIoU difference on random ground truth.
* backbone efficiency: achieved FLOP/s of the backbone forward divided by the FLOP/s of a large
  matrix multiply in the same dtype (the machine's practical peak), measured in the same run;
  also against a dense 3x3 convolution, which oneDNN runs faster than its GEMM on some CPUs;
* training step and feature extraction images/s;
* evaluation: pixels/s of the confusion accumulation against the original numpy bincount, and of
  the threshold sweep (96 thresholds: oracle / held-out / curves) against the original
  per-threshold loop, same matrices;
* peak memory of CAM inference on one 500x375 image at all scales (in a child process);
* scaling of CAM inference time with image side.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

import wsss_bench
from wsss_bench.data.transforms import normalize, resize_by_scale
from wsss_bench.device import autocast, autocast_dtype
from wsss_bench.engine.cams import image_cams
from wsss_bench.engine.model import Classifier
from wsss_bench.evaluation.miou import ConfusionAccumulator, cams_to_labels, scores_from_confusion

SCALES = (1.0, 0.5, 1.5, 2.0)


def timeit(fn: Callable[[], Any], repeat: int = 3) -> float:
    """Best wall time of ``repeat`` calls after one warm-up."""
    fn()
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def reference_cams(model: Classifier, image: Image.Image, keys: list[int], num_classes: int) -> np.ndarray:
    """The original code's structure: 8 separate batch-1 passes, all classes upsampled, numpy fusion."""
    w, h = image.size
    total = np.zeros((num_classes, h, w), np.float32)
    with torch.no_grad():
        for scale in SCALES:
            arr = normalize(resize_by_scale(image, scale))
            for flip in (False, True):
                x = torch.from_numpy(np.ascontiguousarray((arr[:, ::-1] if flip else arr).transpose(2, 0, 1)))[None]
                cam = model.cams(x)
                cam = F.interpolate(cam, (h, w), mode="bilinear", align_corners=False)[0].numpy()
                total += cam[:, :, ::-1] if flip else cam
    mask = np.zeros((num_classes, 1, 1), np.float32)
    mask[keys] = 1
    total *= mask
    norm = total / (np.max(total, axis=(1, 2), keepdims=True) + 1e-5)
    return norm[keys]


def backbone_flops(model: torch.nn.Module, shape: tuple[int, ...]) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(torch.randn(*shape))
    return float(counter.get_total_flops())


def matmul_flops_per_s(dtype: torch.dtype) -> float:
    """The best GEMM rate over a few sizes (the machine's practical peak for ``dtype``)."""
    return max(_gemm_flops_per_s(dtype, n) for n in (1024, 2048, 3072))


def _gemm_flops_per_s(dtype: torch.dtype, n: int) -> float:
    """The practical GEMM peak in ``dtype``: the faster of ``torch.mm`` (the BLAS library) and
    the same n x n x n product run as a 1x1 convolution (oneDNN, the library the backbone's
    convolutions use).  On AMD CPUs MKL's sgemm can trail oneDNN's own kernels, and a peak
    taken from it alone lets convolutions exceed "100 %"."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    with torch.no_grad():
        mm = timeit(lambda: a @ b, repeat=5)
        side = int(n ** 0.5)  # n pixels as a side x side map with n channels, n output channels
        x = torch.randn(1, n, side, side, dtype=dtype)
        w = torch.randn(n, n, 1, 1, dtype=dtype)
        conv = timeit(lambda: F.conv2d(x, w), repeat=5) * n / (side * side)
    return 2 * n ** 3 / min(mm, conv)


def conv_flops_per_s(dtype: torch.dtype) -> float:
    """The best rate of a dense 3x3 convolution (256-512 channels) in ``dtype``: on this kind
    of CPU oneDNN's direct 3x3 kernels outrun its GEMM, so this is the higher practical peak."""
    best = 0.0
    for n, c, side in ((2, 512, 56), (1, 256, 112)):
        x, w = torch.randn(n, c, side, side, dtype=dtype), torch.randn(c, c, 3, 3, dtype=dtype)
        with torch.no_grad():
            seconds = timeit(lambda: F.conv2d(x, w, padding=1), repeat=3)
        best = max(best, 2 * n * c * c * 9 * side * side / seconds)
    return best


def make_model(name: str, options: dict[str, Any], classes: int = 20) -> Classifier:
    torch.manual_seed(0)
    model = Classifier(wsss_bench.create_backbone(name, **options), classes).eval()
    with torch.no_grad():  # random weights give near-zero CAMs; make the head meaningful
        model.heads["parent"].weight.normal_(0, 0.05)
    return model


def random_image(w: int, h: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 255, (h // 8 + 1, w // 8 + 1, 3), dtype=np.uint8)
    return Image.fromarray(base).resize((w, h), Image.BICUBIC)


def cam_rows(label: str, model: Classifier, size: tuple[int, int], n_images: int, keys: list[int],
             rows: list[dict[str, Any]]) -> None:
    images = [random_image(*size, seed=i) for i in range(n_images)]
    cpu = torch.device("cpu")
    ref_maps = [reference_cams(model, im, keys, 20) for im in images]
    t_ref = timeit(lambda: [reference_cams(model, im, keys, 20) for im in images], repeat=1)
    rows.append({"stage": f"CAM inference {label}", "variant": "reference (original structure)",
                 "images/s": n_images / t_ref, "speed-up": 1.0})
    rng = np.random.default_rng(0)
    gts = [rng.integers(0, len(keys) + 1, (size[1], size[0])) for _ in images]
    ref_miou = _miou(ref_maps, gts, keys)
    for precision in ("fp32", "bf16"):
        if precision == "bf16" and autocast_dtype(cpu, "auto") is None:
            continue

        def split_pass() -> list[np.ndarray]:
            # As infer_split: one autocast region for the whole split (weights cast once).
            with autocast(cpu, precision):
                return [image_cams(model, im, keys, SCALES, True, cpu, precision=precision) for im in images]

        ours = split_pass()
        t = timeit(split_pass, repeat=1)
        diff = max(float(np.abs(a - b).max()) for a, b in zip(ours, ref_maps))
        rows.append({"stage": f"CAM inference {label}", "variant": f"wsss-bench {precision}",
                     "images/s": n_images / t, "speed-up": t_ref / t, "max |diff|": diff,
                     "mIoU diff (points)": 100 * (_miou(ours, gts, keys) - ref_miou)})


def _miou(maps: list[np.ndarray], gts: list[np.ndarray], keys: list[int]) -> float:
    acc = ConfusionAccumulator(20)
    for cam, gt in zip(maps, gts):
        pred = cams_to_labels(np.array(keys), torch.from_numpy(cam), 0.15)
        remap = torch.tensor([0, *[k + 1 for k in keys]])
        acc.update(pred, remap[torch.from_numpy(gt)])
    return float(scores_from_confusion(acc.compute())["miou"])


def eval_section(quick: bool, rows: list[dict[str, Any]]) -> None:
    """Confusion accumulation (one threshold) and the threshold sweep, against numpy bincount."""
    rng = np.random.default_rng(0)
    n_img, (w, h) = (8, (250, 188)) if quick else (32, (500, 375))
    # Realistic inputs: uint8 masks with an ignore band, CAMs of 2 present classes out of 20.
    gts, cams, keys_all = [], [], []
    for _ in range(n_img):
        keys = np.sort(rng.choice(20, 2, replace=False))
        gt = np.zeros((h, w), np.uint8)
        gt[h // 4: h // 2, w // 4: w // 2] = keys[0] + 1
        gt[h // 2: 3 * h // 4, w // 2: 3 * w // 4] = keys[1] + 1
        gt[rng.random((h, w)) < 0.05] = 255
        small = rng.random((2, h // 8 + 1, w // 8 + 1)).astype(np.float32)
        cam = F.interpolate(torch.from_numpy(small)[None], (h, w), mode="bilinear", align_corners=False)[0].numpy()
        gts.append(gt)
        cams.append(cam)
        keys_all.append(keys)
    preds = [cams_to_labels(k, torch.from_numpy(c), 0.15) for k, c in zip(keys_all, cams)]
    pixels = n_img * w * h

    def numpy_conf(pred_list: list[np.ndarray]) -> np.ndarray:
        # The original code's _fast_hist: mask, widen to int64, bincount.
        conf = np.zeros((21, 21), np.int64)
        for p, g in zip(pred_list, gts):
            p_, g_ = np.asarray(p).ravel(), g.ravel()
            keep = g_ != 255
            conf += np.bincount(21 * g_[keep].astype(np.int64) + p_[keep], minlength=441).reshape(21, 21)
        return conf

    def ours_conf() -> np.ndarray:
        acc = ConfusionAccumulator(20)
        for p, g in zip(preds, gts):
            acc.update(p, g)
        return acc.compute()

    preds_np = [p.numpy() for p in preds]
    same = bool(np.array_equal(numpy_conf(preds_np), ours_conf()))
    t_np, t_ours = timeit(lambda: numpy_conf(preds_np)), timeit(ours_conf)
    rows.append({"stage": "evaluation: confusion, one threshold", "variant": "numpy bincount (original)",
                 "Mpixels/s": pixels / t_np / 1e6, "speed-up": 1.0})
    rows.append({"stage": "evaluation: confusion, one threshold", "variant": "wsss-bench (torchmetrics state)",
                 "Mpixels/s": pixels / t_ours / 1e6, "speed-up": t_np / t_ours, "identical": same})

    # The oracle / held-out protocols and the robustness curve need the confusion at every
    # threshold of a grid; the original structure re-labels and re-counts per threshold.
    from wsss_bench.evaluation.thresholds import sweep_confusions, threshold_grid
    from wsss_bench.data.voc import open_split
    import tempfile

    grid = threshold_grid()
    with tempfile.TemporaryDirectory() as tmp:
        root, cam_dir = write_eval_tree(Path(tmp), gts, cams, keys_all)
        dataset = open_split(root, "val")

        def numpy_sweep() -> np.ndarray:
            out = []
            for t in grid:
                labels = []
                for k, c in zip(keys_all, cams):
                    full = np.concatenate([np.full((1, h, w), t, np.float32), c])
                    labels.append(np.concatenate([[0], k + 1])[np.argmax(full, axis=0)])
                out.append(numpy_conf(labels))
            return np.stack(out)

        t_ref = timeit(numpy_sweep, repeat=1)
        ref = numpy_sweep()
        t_sweep = timeit(lambda: sweep_confusions(cam_dir, dataset, grid), repeat=3)
        same = bool(np.array_equal(ref, sweep_confusions(cam_dir, dataset, grid)))
    label = f"evaluation: threshold sweep, {len(grid)} thresholds"
    rows.append({"stage": label, "variant": "numpy per threshold (original structure, maps in memory)",
                 "Mpixels/s": pixels / t_ref / 1e6, "speed-up": 1.0})
    rows.append({"stage": label, "variant": "wsss-bench one-pass sweep (reads the files)",
                 "Mpixels/s": pixels / t_sweep / 1e6, "speed-up": t_ref / t_sweep, "identical": same})


def write_eval_tree(root: Path, gts: list[np.ndarray], cams: list[np.ndarray],
                    keys_all: list[np.ndarray]) -> tuple[Path, Path]:
    """A VOC-layout tree (masks, placeholder images, a val split) and a CAM folder for it."""
    from wsss_bench.evaluation.camfiles import write_cam

    ids = [f"img_{i:04d}" for i in range(len(gts))]
    for sub in ("JPEGImages", "SegmentationClassAug", "ImageSets/Segmentation", "cams"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    for image_id, gt, cam, keys in zip(ids, gts, cams, keys_all):
        Image.fromarray(np.zeros((*gt.shape, 3), np.uint8)).save(root / "JPEGImages" / f"{image_id}.jpg")
        Image.fromarray(gt).save(root / "SegmentationClassAug" / f"{image_id}.png")
        write_cam(root / "cams" / f"{image_id}.npz", keys, cam)
    (root / "ImageSets/Segmentation/val.txt").write_text("\n".join(ids) + "\n")
    return root, root / "cams"


def peak_memory_child(name: str, options: dict[str, Any], size: tuple[int, int]) -> float:
    """Peak RSS (MB) a fresh process gains while running one multi-scale CAM inference: the
    high-water mark minus the resident size just before (model and libraries loaded)."""
    # VmHWM, not ru_maxrss: Linux carries the parent's high-water mark (this process, with
    # full-width models loaded) into a child's ru_maxrss across fork + exec.
    code = (
        "import torch, json, sys;"
        "sys.path.insert(0, %r);" % str(Path(__file__).parent) +
        "import speed;"
        "m = speed.make_model(%r, %s);" % (name, json.dumps(options)) +
        "import os; base = int(open('/proc/self/statm').read().split()[1]) * os.sysconf('SC_PAGE_SIZE') // 1024;"
        "from wsss_bench.engine.cams import image_cams;"
        "image_cams(m, speed.random_image(%d, %d), [0, 1, 2], speed.SCALES, True, torch.device('cpu'));" % size +
        "hwm = next(int(l.split()[1]) for l in open('/proc/self/status') if l.startswith('VmHWM:'));"
        "print(json.dumps([base, hwm]))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    base, peak = json.loads(out.stdout.strip().splitlines()[-1])
    return (peak - base) / 1024.0


SECTIONS = ("cam", "backbone", "train", "eval", "memory", "scaling")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small images, fewer rows")
    parser.add_argument("--json", type=Path, help="also write the rows as JSON here")
    parser.add_argument("--sections", nargs="+", choices=SECTIONS, default=list(SECTIONS),
                        help="measure only these groups of rows")
    args = parser.parse_args()
    torch.manual_seed(0)
    rows: list[dict[str, Any]] = []
    print(f"device cpu, torch {torch.__version__}, threads {torch.get_num_threads()}, "
          f"bf16 native: {autocast_dtype(torch.device('cpu'), 'auto') is not None}, "
          f"AMX: {getattr(torch.cpu, '_is_amx_tile_supported', lambda: False)()}")
    for section in args.sections:
        globals()[f"{section}_section"](args.quick, rows)
    print_table(rows)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


SMALL = {"width": 0.125}


def cam_section(quick: bool, rows: list[dict[str, Any]]) -> None:
    cam_rows("resnet38d w=0.125 96x96", make_model("resnet38d", SMALL), (96, 96), 8 if quick else 32, [3, 7], rows)
    full_size = (120, 90) if quick else (250, 188)
    cam_rows(f"resnet38d full {full_size[0]}x{full_size[1]}", make_model("resnet38d", {}),
             full_size, 1 if quick else 3, [3, 7], rows)


def backbone_section(quick: bool, rows: list[dict[str, Any]]) -> None:
    peaks = {dtype: matmul_flops_per_s(dtype) for dtype in (torch.float32, torch.bfloat16)}
    conv_peaks = {dtype: conv_flops_per_s(dtype) for dtype in (torch.float32, torch.bfloat16)}
    for label, name, options, side in [("resnet38d w=0.125", "resnet38d", SMALL, 96),
                                        ("resnet38d full", "resnet38d", {}, 112 if quick else 224)]:
        model = make_model(name, options).backbone.eval()
        x = torch.randn(2, 3, side, side)
        flops = backbone_flops(model, tuple(x.shape))
        for precision, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
            if dtype is torch.bfloat16 and autocast_dtype(torch.device("cpu"), "auto") is None:
                continue

            def fwd() -> None:
                with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype is torch.bfloat16):
                    model(x)

            achieved = flops / timeit(fwd)
            rows.append({"stage": f"backbone forward {label} {side}px", "variant": precision,
                         "GFLOP/s": achieved / 1e9, "GEMM GFLOP/s": peaks[dtype] / 1e9,
                         "efficiency": achieved / peaks[dtype],
                         "3x3 conv GFLOP/s": conv_peaks[dtype] / 1e9,
                         "efficiency vs conv": achieved / conv_peaks[dtype]})


def train_section(quick: bool, rows: list[dict[str, Any]]) -> None:
    model = make_model("resnet38d", {"width": 0.125, "freeze_bn": False, "freeze_stem": False})
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    xb, yb = torch.randn(16, 3, 80, 80), torch.randint(0, 2, (16, 20)).float()
    for precision in ("fp32", "bf16"):
        def step() -> None:
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
                logits, _ = model(xb)
            loss = F.multilabel_soft_margin_loss(logits["parent"].float(), yb)
            opt.zero_grad()
            loss.backward()
            opt.step()
        rows.append({"stage": "training step w=0.125 80px b16", "variant": precision, "images/s": 16 / timeit(step)})
    model.eval()
    with torch.no_grad():
        feats_t = timeit(lambda: [model.pooled_features(torch.randn(1, 3, 96, 96)) for _ in range(16)])
    rows.append({"stage": "feature extraction w=0.125 96px b1", "variant": "fp32", "images/s": 16 / feats_t})


def memory_section(quick: bool, rows: list[dict[str, Any]]) -> None:
    size = (250, 188) if quick else (500, 375)
    rows.append({"stage": f"peak memory, CAM inference {size[0]}x{size[1]} all scales", "variant": "resnet38d w=0.125",
                 "MB": peak_memory_child("resnet38d", SMALL, size)})
    if not quick:
        rows.append({"stage": f"peak memory, CAM inference {size[0]}x{size[1]} all scales", "variant": "resnet38d full",
                     "MB": peak_memory_child("resnet38d", {}, size)})


def scaling_section(quick: bool, rows: list[dict[str, Any]]) -> None:
    model = make_model("resnet38d", SMALL)
    cpu = torch.device("cpu")
    for count in (1, 4, 16) if quick else (1, 8, 32):
        batch = [random_image(96, 96, seed=i) for i in range(count)]
        t = timeit(lambda: [image_cams(model, im, [0, 1], SCALES, True, cpu) for im in batch], repeat=1)
        rows.append({"stage": "scaling: CAM inference w=0.125, 96x96", "variant": f"{count} images",
                     "s": t, "s/image": t / count})
    for side in (64, 128, 256) if quick else (64, 128, 256, 512):
        image = random_image(side, side)
        t = timeit(lambda: image_cams(model, image, [0, 1], SCALES, True, cpu), repeat=1)
        rows.append({"stage": "scaling: CAM inference w=0.125", "variant": f"{side}x{side}", "s/image": t})


def print_table(rows: list[dict[str, Any]]) -> None:
    """One Markdown table per group of rows (CAM inference, backbone, ..., evaluation), each
    with only the columns its rows fill."""
    def fmt(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.3g}" if abs(v) < 1000 else f"{v:.0f}"
        return "" if v is None else str(v)

    groups: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault(r["stage"].split(":")[0].split(" w=")[0].split(" resnet38d")[0], []).append(r)
    for title, members in groups.items():
        columns = ["stage", "variant"]
        for r in members:
            columns += [k for k in r if k not in columns]
        print(f"\n### {title}\n")
        print("| " + " | ".join(columns) + " |")
        print("|" + "|".join("---" for _ in columns) + "|")
        for r in members:
            print("| " + " | ".join(fmt(r.get(c)) for c in columns) + " |")


if __name__ == "__main__":
    main()
