"""Random walk: peak memory and time of PSA's dense walk against wsss-bench's sparse one.

PSA's ``infer_aff.py`` builds the dense ``N x N`` transition matrix and squares it ``logt`` times;
``wsss_bench.engine.random_walk.random_walk`` applies the ``2^logt`` steps to the CAM vectors
through the sparse matrix.  Each variant runs in its own process; the figure is the growth of
the process's peak resident memory (``VmHWM``) during the walk, the inputs already in memory.
Label agreement is measured against the float64 dense walk.

    python benchmarks/random_walk.py            # 500x375 at stride 8 (N = 2,961) and N = 11,750
    python benchmarks/random_walk.py --quick    # the small case only

N = 11,750 is both a 1000x750 image at stride 8 and a 500x375 image at stride 4 (125 x 94
nodes): the walk sees only the map.  The dense float64 reference of that case needs about 3.3 GB
and minutes of CPU.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).parents[1]


def _peak_kb() -> int:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmHWM:"))


def _inputs(h: int, w: int, classes: int = 3):  # noqa: ANN202 - torch tensors
    import torch

    from wsss_bench.engine.random_walk import pair_affinity, pair_indices

    gen = torch.Generator().manual_seed(0)
    yy, xx = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    region = ((yy // max(1, h // 5)) * 7 + (xx // max(1, w // 6))).float()
    feats = torch.stack([torch.sin(region * (k + 1)) for k in range(16)]) + 0.05 * torch.randn(16, h, w, generator=gen)
    pairs = pair_indices(5, (h, w))
    cams = torch.rand(classes + 1, h, w, generator=gen)
    return cams, pair_affinity(feats, pairs), pairs


def worker(variant: str, h: int, w: int) -> None:
    """Run one variant and print ``{"variant", "peak_extra_mb", "seconds", "labels"}`` as JSON."""
    import torch

    from wsss_bench.engine.random_walk import _symmetric_entries, dense_random_walk, random_walk

    torch.set_num_threads(2)
    cams, affinity, pairs = _inputs(h, w)
    before = _peak_kb()
    start = time.perf_counter()
    if variant == "sparse":
        walked = random_walk(cams, affinity, pairs)
    elif variant == "dense64":
        walked = dense_random_walk(cams, affinity, pairs)
    else:  # PSA's structure in float32: dense matrix, squared logt = 8 times
        rows, cols, values, n = _symmetric_entries(affinity, pairs, 8.0)
        trans = torch.zeros(n, n)
        trans.index_put_((rows, cols), values, accumulate=True)
        trans = trans / trans.sum(dim=0, keepdim=True)
        for _ in range(8):
            trans = trans @ trans
        walked = (cams.reshape(cams.shape[0], n) @ trans).reshape(cams.shape)
    seconds = time.perf_counter() - start
    print(json.dumps({"variant": variant, "peak_extra_mb": (_peak_kb() - before) / 1024, "seconds": seconds,
                      "labels": walked.argmax(0).flatten().tolist()}))


def run_variant(variant: str, h: int, w: int) -> dict:
    out = subprocess.run([sys.executable, __file__, "--worker", variant, str(h), str(w)], check=True,
                         capture_output=True, text=True, cwd=ROOT).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="the 2,961-node case only")
    parser.add_argument("--worker", nargs=3, metavar=("VARIANT", "H", "W"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.worker[0], int(args.worker[1]), int(args.worker[2]))
        return
    cases = [("500x375 @ stride 8", 47, 63)]
    if not args.quick:
        cases.append(("1000x750 @ stride 8 = 500x375 @ stride 4", 94, 125))
    print("| image (map) | nodes | variant | peak extra memory (MB) | time (s) | labels = float64 dense |")
    print("|---|---|---|---|---|---|")
    for label, h, w in cases:
        reference = run_variant("dense64", h, w)
        for variant in ("dense32", "sparse"):
            found = run_variant(variant, h, w)
            agree = sum(a == b for a, b in zip(found["labels"], reference["labels"])) / len(reference["labels"])
            name = "PSA structure (dense fp32, squared 8x)" if variant == "dense32" else "wsss-bench (sparse, 256 steps)"
            print(f"| {label} | {h * w} | {name} | {found['peak_extra_mb']:.0f} | {found['seconds']:.2f} | "
                  f"{100 * agree:.3f} % |")
        print(f"| {label} | {h * w} | float64 dense reference | {reference['peak_extra_mb']:.0f} | "
              f"{reference['seconds']:.2f} | 100 % |")


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    main()
