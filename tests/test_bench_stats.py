"""Bench statistics: seed t-intervals, Holm, ``separated``, the per-image bootstrap, and the
per-image confusion files it reads."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from scipy import stats

from wsss_bench.orchestration.bench import (Cell, bootstrap_miou_difference, holm, paired_deltas, paired_t_test,
                              separated, t_interval, write_tables)
from wsss_bench.data.voc import open_split
from wsss_bench.evaluation.camfiles import write_cam
from wsss_bench.evaluation.evaluate import EvalResult, evaluate_cams, load_confusions, save_confusions
from wsss_bench.evaluation.miou import miou_from_confusions, scores_from_confusion


def row(group: str, mious: list[float], seeds: list[int], split: str = "val") -> dict:
    arr = np.array(mious)
    return {"group": {"m": group}, "split": split, "round": 0, "stage": "cam", "mious": mious,
            "seeds": seeds, "miou_mean": float(arr.mean()),
            "miou_std": float(arr.std(ddof=1)) if arr.size > 1 else 0.0}


# -- seed t-interval and Holm ------------------------------------------------------------------

def test_t_interval_against_a_hand_computation() -> None:
    diffs = [0.01, 0.03, 0.02, 0.04]
    mean = 0.025
    se = np.sqrt(((0.015 ** 2) * 2 + (0.005 ** 2) * 2) / 3) / np.sqrt(4)   # sample sd / sqrt(n)
    half = stats.t.ppf(0.975, df=3) * se                                     # 3.182 * 0.006455
    low, high = t_interval(diffs, 0.95)
    assert (low, high) == pytest.approx((mean - half, mean + half), abs=1e-12)
    assert (low, high) == pytest.approx((0.004457, 0.045543), abs=1e-6)
    _, got_se, p = paired_t_test(diffs)
    assert got_se == pytest.approx(se)
    assert p == pytest.approx(2 * stats.t.sf(mean / se, df=3))
    assert p == pytest.approx(stats.ttest_1samp(diffs, 0.0).pvalue)
    # a wider level widens the interval around the same mean
    wide = t_interval(diffs, 1 - 0.05 / 3)
    assert wide[0] < low and wide[1] > high and np.mean(wide) == pytest.approx(mean)
    # no spread: a degenerate interval at the mean, p = 0
    assert t_interval([0.02, 0.02], 0.95) == pytest.approx((0.02, 0.02))
    assert paired_t_test([0.02, 0.02])[2] == 0.0
    with pytest.raises(ValueError):
        paired_t_test([0.1])


def test_holm_against_a_hand_computed_example() -> None:
    # sorted: 0.005, 0.01, 0.03, 0.04 -> x4, x3, x2, x1 = 0.02, 0.03, 0.06, 0.04 -> running max
    # 0.02, 0.03, 0.06, 0.06; the first two are rejected at 0.05, the step-down stops at step 3.
    adjusted, multipliers = holm([0.01, 0.04, 0.03, 0.005])
    assert adjusted == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert multipliers == [3, 2, 2, 4]
    assert holm([0.5, 0.9]) == (pytest.approx([1.0, 1.0]), [2, 2])
    assert holm([0.001, 0.002]) == (pytest.approx([0.002, 0.002]), [2, 1])
    assert holm([]) == ([], [])


def test_holm_matches_statsmodels_when_installed() -> None:
    multitest = pytest.importorskip("statsmodels.stats.multitest")
    p = np.random.default_rng(0).uniform(0, 0.1, size=7)
    assert holm(p)[0] == pytest.approx(multitest.multipletests(p, method="holm")[1].tolist())


def test_separated_yes_no_and_na() -> None:
    assert separated(3, [0.01, 0.02]) == "yes"
    assert separated(3, [-0.02, -0.01]) == "yes"
    assert separated(3, [-0.01, 0.02]) == "no"
    assert separated(1, None) == "n/a"
    base = row("base", [0.30, 0.20, 0.25], [0, 1, 2])
    up = row("up", [0.34, 0.24, 0.29], [0, 1, 2])             # +4 points every seed
    clear = row("clear", [0.33, 0.232, 0.278], [0, 1, 2])     # +3, +3.2, +2.8
    noisy = row("noisy", [0.40, 0.10, 0.25], [2, 1, 0])       # -5, -10, +15
    single = row("single", [0.50], [1])                       # one paired seed
    deltas = {d["row"]["group"]["m"]: d for d in paired_deltas([base, up, clear, noisy, single])}
    assert {k: d["separated"] for k, d in deltas.items()} == {
        "up": "yes", "clear": "yes", "noisy": "no", "single": "n/a"}
    assert deltas["single"]["ci"] is None and deltas["single"]["p_holm"] is None
    # The family is the three rows with an interval: Holm multipliers 3 (smallest p), 2, then
    # the step-down continues (clear is rejected) and stops at noisy, multiplier 1.
    assert deltas["up"]["ci_level"] == pytest.approx(1 - 0.05 / 3)
    assert deltas["clear"]["ci_level"] == pytest.approx(1 - 0.05 / 2)
    assert deltas["noisy"]["ci_level"] == pytest.approx(1 - 0.05 / 1)
    assert deltas["clear"]["diffs"] == pytest.approx([0.03, 0.032, 0.028])
    raw = paired_t_test([0.03, 0.032, 0.028])[2]
    assert deltas["clear"]["p_value"] == pytest.approx(raw) and deltas["clear"]["p_holm"] == pytest.approx(2 * raw)
    assert deltas["clear"]["ci"] == pytest.approx(list(t_interval([0.03, 0.032, 0.028], 1 - 0.05 / 2)))
    # +3, +4, +2 points would be separated alone (p = 0.035) but not after Holm (x2 = 0.07)
    loose = row("loose", [0.33, 0.24, 0.27], [0, 1, 2])
    alone = paired_deltas([base, loose])[0]
    assert alone["separated"] == "yes" and alone["ci_level"] == pytest.approx(0.95)
    assert paired_deltas([base, noisy, loose])[1]["separated"] == "no"


def test_separated_agrees_with_holm_decisions() -> None:
    # Two rows with p = 0.03 and 0.04: Holm rejects neither (2 x 0.03 > 0.05). A plain 95 %
    # interval of the second would exclude 0; the step-down's multiplier 2 keeps it at 0.
    rng = np.random.default_rng(1)
    for _ in range(200):
        n = int(rng.integers(2, 6))
        base = row("base", rng.uniform(0.2, 0.4, n).tolist(), list(range(n)))
        others = [row(f"r{i}", (np.array(base["mious"]) + rng.normal(rng.uniform(-0.02, 0.03), 0.01, n)).tolist(),
                      list(range(n))) for i in range(4)]
        for d in paired_deltas([base, *others]):
            assert (d["separated"] == "yes") == (d["p_holm"] < 0.05)


# -- per-image bootstrap -----------------------------------------------------------------------

def synthetic_confusions(rng: np.random.Generator, n: int, k: int, accuracy: float) -> np.ndarray:
    """Per-image confusions ``[n, k, k]``: each image's pixels of each class, a share of them
    labelled right and the rest spread over the other classes."""
    out = np.zeros((n, k, k), np.int64)
    for i in range(n):
        for c in rng.choice(k, size=2, replace=False):
            pixels = int(rng.integers(50, 200))
            right = rng.binomial(pixels, accuracy)
            out[i, c, c] = right
            wrong = rng.multinomial(pixels - right, np.full(k - 1, 1 / (k - 1)))
            out[i, c, [j for j in range(k) if j != c]] = wrong
    return out


def test_vectorised_miou_matches_the_reference() -> None:
    conf = synthetic_confusions(np.random.default_rng(0), 12, 4, 0.7)
    stacked = miou_from_confusions(conf)
    for i in range(len(conf)):
        assert stacked[i] == pytest.approx(scores_from_confusion(conf[i])["miou"], abs=1e-15)
    assert miou_from_confusions(conf.sum(0)) == pytest.approx(scores_from_confusion(conf.sum(0))["miou"])
    assert np.isnan(miou_from_confusions(np.zeros((3, 3))))


def test_bootstrap_separates_a_better_method_and_not_identical_ones() -> None:
    rng = np.random.default_rng(0)
    n, k = 60, 4
    pairs = []
    for _ in range(3):   # three training seeds, the same 60 images
        weak = synthetic_confusions(np.random.default_rng(rng.integers(1 << 30)), n, k, 0.55)
        strong = synthetic_confusions(np.random.default_rng(rng.integers(1 << 30)), n, k, 0.80)
        pairs.append((strong, weak))
    better = bootstrap_miou_difference(pairs, resamples=1000, seed=0)
    assert better["low"] > 0 and better["high"] > better["low"]
    assert better["n_images"] == n and better["n_seeds"] == 3 and better["resamples"] == 1000
    assert better["estimate"] == pytest.approx(np.mean(
        [miou_from_confusions(a.sum(0)) - miou_from_confusions(b.sum(0)) for a, b in pairs]))
    assert better["low"] < better["estimate"] < better["high"]
    # reproducible: a fixed RNG seed
    assert bootstrap_miou_difference(pairs, resamples=1000, seed=0) == better
    same = bootstrap_miou_difference([(b, b) for _, b in pairs], resamples=1000, seed=0)
    assert same["low"] <= 0 <= same["high"]
    # two methods of equal quality, independent errors: the interval straddles 0
    twin = [(synthetic_confusions(np.random.default_rng(10 + s), n, k, 0.7),
             synthetic_confusions(np.random.default_rng(20 + s), n, k, 0.7)) for s in range(3)]
    tie = bootstrap_miou_difference(twin, resamples=1000, seed=0)
    assert tie["low"] < 0 < tie["high"]
    with pytest.raises(ValueError):
        bootstrap_miou_difference([(pairs[0][0], pairs[0][1][:10])])


def test_bench_tables_show_intervals_and_bootstrap(tmp_path: Path) -> None:
    """Synthetic cells with per-image confusion files: bench.json, .md and .tex carry the seed
    interval, adjusted p, ``separated`` and the bootstrap; cells without files show n/a."""
    n, k = 40, 4
    ids = [f"img_{i:03d}" for i in range(n)]
    spec = {"name": "stats", "matrix": {"method.name": ["cam", "better", "old"], "seed": [0, 1, 2]},
            "labels": {"method.name": "method"}}
    out = tmp_path / "bench"
    records = []
    for method, accuracy in (("cam", 0.55), ("better", 0.85), ("old", 0.85)):
        for seed in range(3):
            cell_dir = out / "cells" / f"{method}-{seed}"
            rows = []
            for split in ("train", "val"):
                conf = synthetic_confusions(np.random.default_rng(100 * seed + len(split) + int(100 * accuracy)),
                                            n, k, accuracy)
                result = EvalResult(split, 0.15, scores_from_confusion(conf.sum(0))["miou"], [], conf.sum(0),
                                    n, per_image=conf, ids=ids)
                r = {"split": split, "round": "", "miou": result.miou,
                     "protocol": {"stage": "cam", "threshold_policy": "fixed", "threshold": 0.15,
                                  "ignore_index": 255, "mean_over": "classes present in ground truth"}}
                if method != "old":   # a cell from before per-image confusions were kept
                    r["confusions"] = save_confusions(cell_dir, f"confusions/round0-cam-{split}.npz", result)
                rows.append(r)
            records.append({"cell": Cell({"method.name": method, "seed": seed}, {}), "dir": cell_dir,
                            "results": {"rows": rows, "seed": seed},
                            "meta": {"seconds": 1.0, "peak_rss_mb": 100.0}})
    write_tables(spec, records, out)
    data = json.loads((out / "bench.json").read_text())
    deltas = {(d["group"]["method.name"], d["split"]): d for d in data["deltas"]}
    assert set(deltas) == {(m, s) for m in ("better", "old") for s in ("train", "val")}
    val = deltas[("better", "val")]
    assert val["separated"] == "yes" and val["ci"][0] > 0 and 0 <= val["p_holm"] < 0.05
    assert 0.95 < val["ci_level"] < 1 and val["alpha"] == 0.05
    assert val["bootstrap"]["low"] > 0 and val["bootstrap"]["n_seeds"] == 3
    # the bootstrap's full-sample estimate is the seed delta: the files hold the scored confusions
    assert val["bootstrap"]["estimate"] == pytest.approx(val["mean"], abs=1e-12)
    assert deltas[("old", "val")]["bootstrap"] is None           # no files: n/a
    assert deltas[("better", "train")]["bootstrap"] is None       # training images: not resampled
    assert deltas[("better", "train")]["bootstrap_split"] is False
    cam_val = next(r for r in data["rows"] if r["group"] == {"method.name": "cam"} and r["split"] == "val")
    assert cam_val["confusions"] == [f"cells/cam-{s}/confusions/round0-cam-val.npz" for s in range(3)]
    md = (out / "bench.md").read_text()
    assert "separated" in md and "beyond spread" not in md
    assert "training seeds with the data fixed" in md
    lines = {line.split("|")[1].strip() + "/" + line.split("|")[2].strip(): line
             for line in md.splitlines() if line.startswith("| better") or line.startswith("| old")}
    assert lines["old/val"].rstrip(" |").endswith("n/a")
    assert lines["better/train"].rstrip(" |").endswith("–")
    assert f"[{100 * val['bootstrap']['low']:+.1f}, {100 * val['bootstrap']['high']:+.1f}]" in lines["better/val"]
    tex = (out / "bench.tex").read_text()
    assert r"p_\mathrm{Holm}" in tex and "separated" in tex and tex.count(r"\begin{tabular}") == 2


# -- per-image confusions of an evaluation -----------------------------------------------------

def test_per_image_confusions_sum_to_the_split_confusion(tiny_voc: Path, tmp_path: Path) -> None:
    dataset = open_split(tiny_voc, "val")
    cams = tmp_path / "cams"
    rng = np.random.default_rng(0)
    for image_id in dataset.ids:
        write_cam(cams / f"{image_id}.npz", np.array([0, 2]), rng.uniform(0, 1, (2, 32, 40)).astype(np.float32))
    plain = evaluate_cams(cams, dataset, 0.3)
    result = evaluate_cams(cams, dataset, 0.3, per_image=True)
    assert plain.per_image is None and result.ids == list(dataset.ids)
    assert result.per_image.dtype == np.int64 and result.per_image.shape == (4, 4, 4)
    np.testing.assert_array_equal(result.per_image.sum(0), result.confusion)
    np.testing.assert_array_equal(result.confusion, plain.confusion)
    relative = save_confusions(tmp_path / "run", "confusions/round0-cam-val.npz", result)
    assert relative == "confusions/round0-cam-val.npz"
    assert not list((tmp_path / "run" / "confusions").glob(".*.tmp"))    # atomic: no leftovers
    confusions, ids = load_confusions(tmp_path / "run" / relative)
    np.testing.assert_array_equal(confusions, result.per_image)
    assert ids == list(dataset.ids)
    with pytest.raises(ValueError):
        save_confusions(tmp_path / "run", "x.npz", plain)
