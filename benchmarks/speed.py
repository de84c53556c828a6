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
* training step and feature extraction images/s;
* evaluation: pixels/s of the confusion accumulation against a numpy bincount (same matrix);
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
from wsss_bench.device import autocast_dtype
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


def matmul_flops_per_s(dtype: torch.dtype, n: int = 2048) -> float:
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    seconds = timeit(lambda: a @ b)
    return 2 * n ** 3 / seconds


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
        ours = [image_cams(model, im, keys, SCALES, True, cpu, precision=precision) for im in images]
        t = timeit(lambda: [image_cams(model, im, keys, SCALES, True, cpu, precision=precision) for im in images], repeat=1)
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


def peak_memory_child(name: str, options: dict[str, Any], size: tuple[int, int]) -> float:
    """Peak RSS (MB) a fresh process gains while running one multi-scale CAM inference: the
    high-water mark minus the resident size just before (model and libraries loaded)."""
    code = (
        "import resource, torch, json, sys;"
        "sys.path.insert(0, %r);" % str(Path(__file__).parent) +
        "import speed;"
        "m = speed.make_model(%r, %s);" % (name, json.dumps(options)) +
        "import os; base = int(open('/proc/self/statm').read().split()[1]) * os.sysconf('SC_PAGE_SIZE') // 1024;"
        "from wsss_bench.engine.cams import image_cams;"
        "image_cams(m, speed.random_image(%d, %d), [0, 1, 2], speed.SCALES, True, torch.device('cpu'));" % size +
        "print(json.dumps([base, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss]))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    base, peak = json.loads(out.stdout.strip().splitlines()[-1])
    return (peak - base) / 1024.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small images, fewer rows")
    parser.add_argument("--json", type=Path, help="also write the rows as JSON here")
    args = parser.parse_args()
    torch.manual_seed(0)
    rows: list[dict[str, Any]] = []
    small = {"width": 0.125}
    print(f"device cpu, torch {torch.__version__}, threads {torch.get_num_threads()}, "
          f"bf16 native: {autocast_dtype(torch.device('cpu'), 'auto') is not None}")

    cam_rows("resnet38d w=0.125 96x96", make_model("resnet38d", small), (96, 96), 8 if args.quick else 32, [3, 7], rows)
    full_size = (120, 90) if args.quick else (250, 188)
    cam_rows(f"resnet38d full {full_size[0]}x{full_size[1]}", make_model("resnet38d", {}),
             full_size, 1 if args.quick else 3, [3, 7], rows)

    for label, name, options, side in [("resnet38d w=0.125", "resnet38d", small, 96),
                                        ("resnet38d full", "resnet38d", {}, 112 if args.quick else 224)]:
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
            peak = matmul_flops_per_s(dtype)
            rows.append({"stage": f"backbone forward {label} {side}px", "variant": precision,
                         "GFLOP/s": achieved / 1e9, "matmul GFLOP/s": peak / 1e9, "efficiency": achieved / peak})

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

    rng = np.random.default_rng(0)
    n_img, side = (8, 256) if args.quick else (32, 500)
    preds = [torch.from_numpy(rng.integers(0, 21, (side, side))) for _ in range(n_img)]
    gts = [torch.from_numpy(np.where(rng.random((side, side)) < 0.05, 255, rng.integers(0, 21, (side, side)))) for _ in range(n_img)]

    def numpy_conf() -> np.ndarray:
        conf = np.zeros((21, 21), np.int64)
        for p, g in zip(preds, gts):
            p_, g_ = p.numpy().ravel(), g.numpy().ravel()
            keep = g_ != 255
            conf += np.bincount(21 * g_[keep] + p_[keep], minlength=441).reshape(21, 21)
        return conf

    def torch_conf() -> np.ndarray:
        acc = ConfusionAccumulator(20)
        for p, g in zip(preds, gts):
            acc.update(p, g)
        return acc.compute()

    assert np.array_equal(numpy_conf(), torch_conf())
    pixels = n_img * side * side
    t_np, t_t = timeit(numpy_conf), timeit(torch_conf)
    rows.append({"stage": "evaluation (confusion)", "variant": "numpy bincount", "Mpixels/s": pixels / t_np / 1e6, "speed-up": 1.0})
    rows.append({"stage": "evaluation (confusion)", "variant": "wsss-bench torchmetrics", "Mpixels/s": pixels / t_t / 1e6,
                 "speed-up": t_np / t_t, "identical": True})

    size = (250, 188) if args.quick else (500, 375)
    rows.append({"stage": f"peak memory, CAM inference {size[0]}x{size[1]} all scales", "variant": "resnet38d w=0.125",
                 "MB": peak_memory_child("resnet38d", small, size)})
    if not args.quick:
        rows.append({"stage": f"peak memory, CAM inference {size[0]}x{size[1]} all scales", "variant": "resnet38d full",
                     "MB": peak_memory_child("resnet38d", {}, size)})

    model = make_model("resnet38d", small)
    for side in (64, 128, 256) if args.quick else (64, 128, 256, 512):
        t = timeit(lambda: image_cams(model, random_image(side, side), [0, 1], SCALES, True, torch.device("cpu")), repeat=1)
        rows.append({"stage": "scaling: CAM inference w=0.125", "variant": f"{side}x{side}", "s/image": t})

    print_table(rows)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


def print_table(rows: list[dict[str, Any]]) -> None:
    columns = ["stage", "variant"] + sorted({k for r in rows for k in r} - {"stage", "variant"})
    def fmt(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.3g}" if abs(v) < 1000 else f"{v:.0f}"
        return "" if v is None else str(v)
    print("| " + " | ".join(columns) + " |")
    print("|" + "|".join("---" for _ in columns) + "|")
    for r in rows:
        print("| " + " | ".join(fmt(r.get(c)) for c in columns) + " |")


if __name__ == "__main__":
    main()
