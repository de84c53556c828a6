"""`wsss run` with stages after the CAMs: refined and segmentation rows, caching, resume, --force,
and the `stage` / `cam_method` fields (legacy rows migrate)."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from wsss_bench.cli.main import cli
from wsss_bench.config import load_config
from wsss_bench.errors import ConfigError
from wsss_bench.evaluation.masks import evaluate_masks
from wsss_bench.evaluation.rows import migrate_results, migrate_row
from wsss_bench.data.voc import open_split

TINY = ["backbone.options={width: 0.0625, freeze_bn: false, freeze_stem: false}",
        "train.epochs=2", "train.crop_size=32", "train.resize_long=[32,48]", "cams.scales=[1.0]",
        "cams.flip=false", "eval.policies=[fixed]", "eval.curves=false",
        "refine.options={backbone: resnet38d, backbone_options: {width: 0.0625}, logt: 4, radius: 2, "
        "train: {epochs: 1, batch_size: 4, crop_size: 32, crf: off}}",
        "segment.options={epochs: 2, batch_size: 4, crop_size: 32}"]


def run_args(root: Path, out: Path, stages: str, *extra: str) -> list[str]:
    args = ["run", "--method", "cam", "--backbone", "resnet38d", "--data-root", str(root), "--out", str(out),
            "--device", "cpu", "--quiet", "--stages", stages]
    for item in TINY:
        args += ["--set", item]
    return [*args, *extra]


def invoke(args: list[str]) -> None:
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output + repr(result.exception)


def manifest_stages(run: Path) -> dict[str, bool]:
    return {s["name"]: s["reused"] for s in json.loads((run / "manifest.json").read_text())["stages"]}


@pytest.fixture(scope="module")
def piped(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    from tests.conftest import write_voc_tree

    base = tmp_path_factory.mktemp("pipeline")
    ids = [f"img_{i:03d}" for i in range(12)]
    root = write_voc_tree(base / "voc", {"train_aug": ids[:8], "train": ids[:4], "val": ids[8:]})
    run = base / "run"
    invoke(run_args(root, run, "cam,refine,segment"))
    return root, run


def test_rows_carry_stage_and_cam_method(piped: tuple[Path, Path]) -> None:
    _, run = piped
    results = json.loads((run / "results.json").read_text())
    stages = [(r["split"], r["stage"]) for r in results["rows"]]
    assert stages == [("train", "cam"), ("val", "cam"), ("train", "refined:affinity-rw"),
                      ("val", "refined:affinity-rw"), ("train", "seg"), ("val", "seg")]
    for r in results["rows"]:
        assert r["protocol"]["stage"] == r["stage"] and r["protocol"]["cam_method"] == "cam"
    refined = [r for r in results["rows"] if r["stage"].startswith("refined")]
    for r in refined:
        p = r["protocol"]
        assert p["ignore_policy"] == "background" and 0 <= p["coverage"] <= 1 and p["crf"] == "absent"
        assert (run / r["masks"]).is_dir() and len(list((run / r["masks"]).glob("*.png"))) == r["num_images"]
        assert {"precision", "recall"} <= set(r["per_class"][0])
    seg = {r["split"]: r for r in results["rows"] if r["stage"] == "seg"}
    # `train` lies inside the segmentation network's training split (train_aug): marked seen
    assert seg["train"]["protocol"]["seen"] is True and seg["val"]["protocol"]["seen"] is False
    assert set(results["miou_by_stage"]) == {"cam", "refined:affinity-rw", "seg"}
    assert results["stages"] == ["cam", "refine", "segment"]
    # one manifest entry per stage: the segmentation network (segment:fit) is not the
    # predictions on the split named train (segment:train)
    names = [s["name"] for s in json.loads((run / "manifest.json").read_text())["stages"]]
    assert len(names) == len(set(names)), names
    # the same evaluator as `wsss eval --masks`: an independent re-score of the folder agrees
    root = piped[0]
    again = evaluate_masks(run / refined[1]["masks"], open_split(root, "val"))
    assert again.miou == pytest.approx(refined[1]["miou"])
    table = (run / "results.md").read_text()
    assert "refined:affinity-rw" in table and "seg (seen)" in table or "seg" in table
    assert (run / "refine" / "affinity-rw.pth").is_file() and (run / "segment" / "segment.pth").is_file()
    # the training split's CAMs (AffinityNet's and the segmentation's input) are a cached stage
    assert "cams:round0:train_aug" in manifest_stages(run)


def test_rerun_reuses_every_stage_and_force_refine_refits(piped: tuple[Path, Path], tmp_path: Path) -> None:
    root, run = piped
    copy = tmp_path / "copy"
    shutil.copytree(run, copy)
    invoke(run_args(root, copy, "cam,refine,segment", "--resume"))
    stages = manifest_stages(copy)
    assert stages["refine:fit"] is True and stages["refine:val"] is True
    assert stages["segment:fit"] is True and stages["segment:train"] is True   # the network; train's predictions
    before = json.loads((run / "results.json").read_text())["miou_by_stage"]
    assert json.loads((copy / "results.json").read_text())["miou_by_stage"] == before
    invoke(run_args(root, copy, "cam,refine", "--resume", "--force", "refine"))
    stages = manifest_stages(copy)
    assert stages["refine:fit"] is False and stages["train:round0"] is True
    # refitting with the same seed gives the same AffinityNet, hence the same refined scores
    after = json.loads((copy / "results.json").read_text())["miou_by_stage"]
    assert after["refined:affinity-rw"] == before["refined:affinity-rw"] and "seg" not in after


def test_half_written_refinement_resumes(piped: tuple[Path, Path], tmp_path: Path) -> None:
    root, run = piped
    copy = tmp_path / "copy"
    shutil.copytree(run, copy)
    folder = copy / "refined" / "affinity-rw" / "val"
    kept = sorted(folder.glob("*.png"))
    kept[0].unlink()   # as if killed after the first masks
    invoke(run_args(root, copy, "cam,refine", "--resume"))
    assert (folder / kept[0].name).is_file()
    assert np.array_equal(np.array(_png(folder / kept[0].name)), np.array(_png(run / "refined/affinity-rw/val" / kept[0].name)))


def test_refine_sweep_takes_each_splits_value_from_its_selection_split(piped: tuple[Path, Path],
                                                                        tmp_path: Path) -> None:
    root, run = piped
    copy = tmp_path / "copy"
    shutil.copytree(run, copy)
    invoke(run_args(root, copy, "cam,refine,segment", "--resume", "--set", "refine.sweep={alpha: [1, 4, 32]}"))
    stages = manifest_stages(copy)
    assert stages["refine:fit"] is True           # fitted once, with the configured options
    assert {f"refine:{s}:alpha={a}" for s in ("train", "val") for a in (1, 4, 32)} <= set(stages)
    results = json.loads((copy / "results.json").read_text())
    refined = {r["split"]: r for r in results["rows"] if r["stage"] == "refined:affinity-rw"}
    for split, other in (("train", "val"), ("val", "train")):
        sweep = refined[split]["protocol"]["sweep"]
        assert sweep["selection_split"] == other and set(sweep["miou"]) == {"1", "4", "32"}
        best = max(sweep["selection_miou"].items(), key=lambda kv: kv[1])[0]
        assert str(sweep["value"]) == best and float(best) == refined[split]["protocol"]["alpha"]
        # the row is that value's folder, and the other split's sweep scored this split's folders
        assert refined[split]["masks"] == f"refined/affinity-rw/alpha={best}/{split}"
        assert refined[split]["miou"] == sweep["miou"][best]
        assert refined[other]["protocol"]["sweep"]["selection_miou"] == sweep["miou"]
    chosen = results["refine"]["sweep"]["chosen"]
    assert {s: v for s, v in chosen.items() if s != "train_aug"} == {
        s: refined[s]["protocol"]["sweep"]["value"] for s in refined}
    # the segmentation network trains on the training split's masks of the value chosen on its
    # selection split (train, the first evaluation split that is not train_aug)
    on_train = refined["train"]["protocol"]["sweep"]["miou"]
    assert str(chosen["train_aug"]) == max(on_train.items(), key=lambda kv: kv[1])[0]
    assert results["segment"]["masks"] == f"refined/affinity-rw/alpha={chosen['train_aug']}/train_aug"


@pytest.mark.parametrize("sweep", ["{alpha: [1], beta: [2]}", "{alpha: []}", "{alpha: [4, 4]}"])
def test_bad_sweeps_are_one_line(sweep: str) -> None:
    with pytest.raises(ConfigError, match="sweep"):
        load_config(sets=[f"refine.sweep={sweep}"])


def test_sweep_values_are_checked_before_any_work(tmp_path: Path, tiny_voc: Path) -> None:
    result = CliRunner().invoke(cli, ["run", "--data-root", str(tiny_voc), "--out", str(tmp_path / "r"),
                                      "--stages", "cam,refine", "--set", "refine.sweep={alpha: [4, -1]}",
                                      "--dry-run"])
    assert result.exit_code != 0 and "alpha" in result.output and "Traceback" not in result.output
    assert not (tmp_path / "r").exists()


def _png(path: Path):
    from PIL import Image

    with Image.open(path) as image:
        return image.copy()


@pytest.mark.parametrize("stages", [["refine"], ["cam", "cam"], ["cam", "segment", "refine"]])
def test_bad_stage_lists_are_one_line(stages: list[str]) -> None:
    with pytest.raises(ConfigError, match="stages"):
        load_config(sets=[f"stages={json.dumps(stages)}"])


def test_unknown_refiner_fails_before_any_work(tmp_path: Path, tiny_voc: Path) -> None:
    result = CliRunner().invoke(cli, ["run", "--data-root", str(tiny_voc), "--out", str(tmp_path / "r"),
                                      "--stages", "cam,refine", "--set", "refine.name=nope", "--dry-run"])
    assert result.exit_code != 0 and "nope" in result.output and "Traceback" not in result.output
    assert not (tmp_path / "r").exists()


def test_legacy_rows_migrate() -> None:
    legacy = {"split": "val", "miou": 0.5, "protocol": {"stage": "gradcam", "threshold": 0.15}}
    row = migrate_row(legacy)
    assert row["stage"] == "cam" and row["protocol"]["cam_method"] == "gradcam" and row["protocol"]["stage"] == "cam"
    current = {"split": "val", "stage": "seg", "protocol": {"stage": "seg", "cam_method": "cam"}}
    assert migrate_row(current) == current
    assert migrate_results({"rows": [legacy], "final": [legacy]})["final"][0]["protocol"]["cam_method"] == "gradcam"


def test_bench_reads_legacy_cells() -> None:
    from wsss_bench.orchestration.bench import aggregate

    class Cell:
        values = {"method": "cam", "seed": 0}

    rows = [{"split": "val", "miou": 0.4, "protocol": {"stage": "cam", "threshold": 0.15}},
            {"split": "val", "miou": 0.3, "protocol": {"stage": "gradcam", "threshold": 0.15}}]
    records = [{"cell": Cell(), "results": {"rows": rows, "seed": 0},
                "meta": {"seconds": 1.0, "peak_rss_mb": 1.0}}]
    out = aggregate({"matrix": {"method": ["cam"]}}, records)
    assert [(r["cam_method"], r["stage"]) for r in out] == [("cam", "cam"), ("gradcam", "cam")]


def test_report_shows_refined_and_segmentation_columns(piped: tuple[Path, Path], tmp_path: Path) -> None:
    _, run = piped
    out = tmp_path / "report.html"
    result = CliRunner().invoke(cli, ["report", str(run), "--out", str(out), "--examples", "1"])
    assert result.exit_code == 0, result.output
    html = out.read_text()
    # image | ground truth | CAMs | pseudo mask | refined mask | segmentation, per example row
    assert "refined: affinity-rw (mIoU" in html and "segmentation (mIoU" in html
    assert html.index("refined: affinity-rw (mIoU") < html.index("segmentation (mIoU")
