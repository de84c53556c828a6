"""`wsss bench`: matrix expansion, shared stages, skipping finished cells, tables."""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from wsss_bench.orchestration.bench import expand, load_bench
from wsss_bench.cli.main import cli
from wsss_bench.errors import ConfigError


def bench_file(tmp_path: Path, root: Path, matrix: str) -> Path:
    path = tmp_path / "bench.yaml"
    path.write_text(f"""
name: tiny
preset: smoke
base:
  device: cpu
  dataset: {{name: null, root: {root}}}
  backbone: {{name: resnet38d, options: {{width: 0.0625, freeze_bn: false, freeze_stem: false}}}}
  train: {{epochs: 1, crop_size: 32, resize_long: [32, 48]}}
  cams: {{scales: [1.0]}}
matrix:
{matrix}
""")
    return path


def test_expand_validates_every_cell(tmp_path: Path, tiny_voc: Path) -> None:
    spec = load_bench(bench_file(tmp_path, tiny_voc, "  method.name: [cam]\n  seed: [0, 1]\n"))
    cells = expand(spec)
    assert [c.values for c in cells] == [{"method.name": "cam", "seed": 0}, {"method.name": "cam", "seed": 1}]
    assert cells[0].slug == "method-cam__seed-0"
    bad = bench_file(tmp_path, tiny_voc, "  train.epochs: [0]\n")
    with pytest.raises(ConfigError, match="train.epochs"):
        expand(load_bench(bad))
    # Plugin options are checked before any cell runs, and a component given as a mapping does
    # not inherit the options of the base config's (different) component.
    typo = bench_file(tmp_path, tiny_voc, "  backbone: [{name: resnet38d, options: {widht: 0.5}}]\n")
    with pytest.raises(ConfigError, match="widht"):
        expand(load_bench(typo))
    other = bench_file(tmp_path, tiny_voc, "  backbone: [{name: 'timm:resnet18', options: {output_stride: 16}}]\n")
    assert expand(load_bench(other))[0].config["backbone"]["options"] == {"output_stride": 16}


def test_component_labels_name_cells_and_stay_out_of_the_config(tmp_path: Path, tiny_voc: Path) -> None:
    from wsss_bench.orchestration.bench import _show

    matrix = ("  method:\n    - {name: subcat, options: {rounds: 1}}\n"
              "    - {name: subcat, label: subcat-two, options: {rounds: 2}}\n")
    cells = expand(load_bench(bench_file(tmp_path, tiny_voc, matrix)))
    assert [c.slug for c in cells] == ["method-subcat", "method-subcat-two"]
    assert "label" not in cells[1].config["method"]
    assert cells[1].config["method"]["options"]["rounds"] == 2
    assert _show(cells[1].values["method"]) == "subcat-two"
    clash = "  method:\n    - {name: subcat, options: {rounds: 1}}\n    - {name: subcat, options: {rounds: 2}}\n"
    with pytest.raises(ConfigError, match="distinct names or labels"):
        expand(load_bench(bench_file(tmp_path, tiny_voc, clash)))


def test_unknown_bench_key(tmp_path: Path) -> None:
    path = tmp_path / "b.yaml"
    path.write_text("matrix: {seed: [0]}\nbogus: 1\n")
    with pytest.raises(ConfigError, match="bogus"):
        load_bench(path)


def test_bench_runs_shares_and_skips(tmp_path: Path, tiny_voc: Path) -> None:
    path = bench_file(tmp_path, tiny_voc, "  method: [{name: cam}, {name: subcat, options: {rounds: 1, k: 2}}]\n"
                      "  seed: [0, 1]\n")
    out = tmp_path / "out"
    runner = CliRunner()
    result = runner.invoke(cli, ["bench", str(path), "--out", str(out)])
    assert result.exit_code == 0, result.output
    for name in ("bench.md", "bench.csv", "bench.json", "bench.tex"):
        assert (out / name).is_file()
    data = json.loads((out / "bench.json").read_text())
    final_cam = [r for r in data["rows"] if r["group"] == {"method": {"name": "cam"}} and r["split"] == "val"]
    assert final_cam and final_cam[0]["n"] == 2 and len(final_cam[0]["mious"]) == 2
    # the subcat cells reuse the round-0 classifier of the cam cells with the same seed
    manifest = json.loads((out / "cells/method-subcat__seed-0/manifest.json").read_text())
    train0 = next(s for s in manifest["stages"] if s["name"] == "train:round0")
    assert train0["reused"] is True
    cam_val = json.loads((out / "cells/method-cam__seed-0/results.json").read_text())["miou"]["val"]
    sub_rows = json.loads((out / "cells/method-subcat__seed-0/results.json").read_text())["rows"]
    assert next(r["miou"] for r in sub_rows if r["round"] == 0 and r["split"] == "val") == pytest.approx(cam_val)
    # Every scored split kept its per-image confusions; they sum exactly to the confusion the
    # reported mIoU came from (re-scoring the same CAM files).
    from wsss_bench.data.voc import open_split
    from wsss_bench.evaluation.evaluate import evaluate_cams, load_confusions
    from wsss_bench.evaluation.miou import scores_from_confusion

    for r in sub_rows:
        per_image, ids = load_confusions(out / "cells/method-subcat__seed-0" / r["confusions"])
        dataset = open_split(tiny_voc, r["split"])
        assert ids == dataset.ids and per_image.shape[0] == r["num_images"]
        rescored = evaluate_cams(out / "cells/method-subcat__seed-0" / r["cams"], dataset,
                                 r["protocol"]["threshold"], stage=r["protocol"]["stage"])
        np.testing.assert_array_equal(per_image.sum(0), rescored.confusion)
        assert scores_from_confusion(per_image.sum(0))["miou"] == pytest.approx(r["miou"], abs=1e-12)
    # the tables carry the seed intervals and, on val, the per-image bootstrap
    deltas = {(d["split"], d["round"]): d for d in data["deltas"]}
    assert deltas, data["deltas"]
    for d in deltas.values():
        assert d["separated"] in ("yes", "no") and len(d["ci"]) == 2 and 0 <= d["p_holm"] <= 1
        assert (d["bootstrap"] is not None) == (d["split"] == "val")
    assert "separated" in (out / "bench.md").read_text()
    # Peak memory is the cell's own (VmHWM), not the bench process's high-water mark that
    # Linux carries into a child's ru_maxrss: a cell reports it, and it varies between cells.
    import sys

    metas = [json.loads(p.read_text()) for p in sorted((out / "cells").glob("*/cell.json"))]
    if sys.platform.startswith("linux"):
        assert {m["peak_rss_source"] for m in metas} == {"VmHWM"}
    assert all(50 < m["peak_rss_mb"] < 20_000 for m in metas)
    assert not list(out.rglob(".peak-rss-kb"))
    # a second invocation skips every finished cell
    again = runner.invoke(cli, ["bench", str(path), "--out", str(out)])
    assert again.exit_code == 0 and again.output.count("done, skipped") == 4


def test_parallel_cells_give_the_same_tables(tmp_path: Path, tiny_voc: Path) -> None:
    # --jobs 2: two seeds at once, one thread each; a seed's first cell finishes before the
    # seed's next one starts, so the subcat cell reuses (not retrains) the cam cell's classifier.
    path = bench_file(tmp_path, tiny_voc, "  method: [{name: cam}, {name: subcat, options: {rounds: 1, k: 2}}]\n"
                      "  seed: [0, 1]\n")
    out = tmp_path / "parallel"
    result = CliRunner().invoke(cli, ["bench", str(path), "--out", str(out), "--jobs", "2"])
    assert result.exit_code == 0, result.output
    for seed in (0, 1):
        manifest = json.loads((out / f"cells/method-subcat__seed-{seed}/manifest.json").read_text())
        train0 = next(s for s in manifest["stages"] if s["name"] == "train:round0")
        assert train0["reused"] is True
        assert manifest["environment"]["threads"] == max(1, (os.cpu_count() or 1) // 2)
    data = json.loads((out / "bench.json").read_text())
    assert {r["n"] for r in data["rows"]} == {2}
    assert CliRunner().invoke(cli, ["bench", str(path), "--out", str(out), "--jobs", "0"]).exit_code == 2


def test_cells_of_one_seed_side_by_side_match_a_serial_run(tmp_path: Path, tiny_voc: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    # --jobs 3, one seed: after the cam cell, the two post-hoc cells run at once from the stored
    # classifier.  One thread everywhere, so the tables must equal a serial run's exactly.
    path = bench_file(tmp_path, tiny_voc, "  method: [{name: cam}, {name: gradcam}, {name: gradcampp}]\n"
                      "  seed: [0]\n")
    side_by_side = CliRunner().invoke(cli, ["bench", str(path), "--out", str(tmp_path / "p"), "--jobs", "3"])
    assert side_by_side.exit_code == 0, side_by_side.output
    monkeypatch.setenv("OMP_NUM_THREADS", "1")   # the serial cells inherit it
    serial = CliRunner().invoke(cli, ["bench", str(path), "--out", str(tmp_path / "s")])
    assert serial.exit_code == 0, serial.output
    for method in ("gradcam", "gradcampp"):
        manifest = json.loads((tmp_path / f"p/cells/method-{method}__seed-0/manifest.json").read_text())
        assert next(s for s in manifest["stages"] if s["name"] == "train:round0")["reused"] is True
    rows = [json.loads((tmp_path / out / "bench.json").read_text())["rows"] for out in ("p", "s")]
    assert [(r["group"], r["split"], r["mious"]) for r in rows[0]] == \
        [(r["group"], r["split"], r["mious"]) for r in rows[1]]


def test_cells_of_a_seed_wait_for_its_first_cell_then_run_side_by_side() -> None:
    from wsss_bench.orchestration.bench import Cell, next_startable

    def cell(method: str, seed: int) -> Cell:
        return Cell({"method": method, "seed": seed}, {"method": {"name": method}, "seed": seed})

    pending = [cell("gradcam", 0), cell("subcat", 0), cell("cam", 1)]
    # seed 0's first cell is running: its other cells wait, another seed's cell may start
    assert next_startable(pending, running_seeds={0}, finished_seeds=set()) == 2
    assert next_startable(pending[:2], running_seeds={0}, finished_seeds=set()) is None
    # once one cell of seed 0 has finished, its stages are stored: the next may start beside it
    assert next_startable(pending, running_seeds={0}, finished_seeds={0}) == 0
    assert next_startable(pending, running_seeds=set(), finished_seeds=set()) == 0
    assert next_startable([], running_seeds=set(), finished_seeds=set()) is None


def test_paired_deltas_pair_by_seed_and_flag_separation() -> None:
    from wsss_bench.orchestration.bench import paired_deltas

    def row(group: str, mious: list[float], seeds: list[int]) -> dict:
        arr = np.array(mious)
        return {"group": {"m": group}, "split": "val", "round": 0, "stage": "cam", "mious": mious,
                "seeds": seeds, "miou_mean": float(arr.mean()), "miou_std": float(arr.std(ddof=1))}

    base = row("base", [0.30, 0.20, 0.25], [0, 1, 2])
    same = row("same", [0.30, 0.20, 0.25], [0, 1, 2])              # identical: left out
    shifted = row("up", [0.34, 0.24, 0.29], [0, 1, 2])            # +4 points every seed
    noisy = row("noisy", [0.40, 0.10, 0.25], [2, 1, 0])           # seeds in another order
    deltas = {d["row"]["group"]["m"]: d for d in paired_deltas([base, same, shifted, noisy])}
    assert set(deltas) == {"up", "noisy"}
    assert deltas["up"]["mean"] == pytest.approx(0.04) and deltas["up"]["std"] == pytest.approx(0.0, abs=1e-12)
    # A constant +4 points is smaller than the baseline's own 5-point spread: not "beyond spread".
    assert deltas["up"]["beyond_spread"] is False
    # Paired by seed, not by position: seed 0 → 0.25-0.30, seed 1 → 0.10-0.20, seed 2 → 0.40-0.25.
    assert deltas["noisy"]["mean"] == pytest.approx((-0.05 - 0.10 + 0.15) / 3)
    far = row("far", [0.90, 0.85, 0.88], [0, 1, 2])
    assert paired_deltas([base, far])[0]["beyond_spread"] is True


def test_quick_look_overrides_are_layered_marked_and_kept_apart(tmp_path: Path, tiny_voc: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    from wsss_bench.orchestration.bench import apply_overrides

    path = bench_file(tmp_path, tiny_voc, "  method.name: [cam]\n  seed: [0, 1, 2]\n")
    spec = apply_overrides(load_bench(path), seeds=[5], sets=("train.epochs=2",))
    cells = expand(spec)
    assert [c.values["seed"] for c in cells] == [5]
    assert cells[0].config["train"]["epochs"] == 2  # --set lies over base...
    with pytest.raises(ConfigError, match="matrix axis 'method.name'"):  # ...and under the axes
        apply_overrides(load_bench(path), sets=("method.name=subcat",))
    assert apply_overrides(load_bench(path))["overrides"] is None

    monkeypatch.chdir(tmp_path)
    args = ["bench", str(path), "--seeds", "0", "--set", "cams.flip=false"]
    first = CliRunner().invoke(cli, args)
    assert first.exit_code == 0, first.output
    folders = [p for p in (tmp_path / "runs").iterdir() if p.name.startswith("bench-tiny-")]
    assert len(folders) == 1  # its own folder, named by the overrides' hash
    out = folders[0]
    record = json.loads((out / "bench.json").read_text())
    assert record["overrides"] == {"preset": None, "seeds": [0], "set": ["cams.flip=false"]}
    assert "quick look: seeds [0], --set cams.flip=false" in (out / "bench.md").read_text()
    assert "% quick look" in (out / "bench.tex").read_text()
    other = CliRunner().invoke(cli, ["bench", str(path), "--seeds", "1", "--out", str(out)])
    assert other.exit_code == 2 and "other overrides" in other.output
    forced = CliRunner().invoke(cli, ["bench", str(path), "--seeds", "0", "--set", "cams.flip=false",
                                      "--out", str(out)])
    assert forced.exit_code == 0, forced.output  # the same overrides resume the same folder


def test_a_failed_cell_does_not_stop_the_bench(tmp_path: Path, tiny_voc: Path) -> None:
    """One cell that fails at run time and one whose config is rejected: the good cell still
    runs, every table marks the other two, the summary names their logs, the exit is non-zero;
    `--dry-run` reports the rejected cell before anything starts."""
    (tmp_path / "garbage.pth").write_bytes(os.urandom(2048))  # exists: fails only when loaded
    matrix = (f"  method.name: [cam]\n  train.init_weights: [null, {tmp_path / 'garbage.pth'}, "
              f"{tmp_path / 'missing.pth'}]\n  seed: [0]\n")
    path = bench_file(tmp_path, tiny_voc, matrix)
    dry = CliRunner().invoke(cli, ["bench", str(path), "--dry-run"])
    assert dry.exit_code == 2, dry.output
    assert "missing.pth: train.init_weights file not found" in dry.output
    assert "1 of 3 bench cells would be rejected" in dry.output

    out = tmp_path / "out"
    result = CliRunner().invoke(cli, ["bench", str(path), "--out", str(out)])
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    last = result.output.strip().splitlines()[-1]
    assert last.startswith("Error: 2 of 3 bench cells failed") and "cell.log" in last, last
    record = json.loads((out / "bench.json").read_text())
    status = {c["values"]["train.init_weights"]: c["status"] for c in record["cells"]}
    assert status == {None: "done", str(tmp_path / "garbage.pth"): "failed",
                      str(tmp_path / "missing.pth"): "invalid"}
    failed = next(c for c in record["cells"] if c["status"] == "failed")
    assert "garbage.pth" in failed["reason"] and (out / failed["log"]).is_file()
    assert {r["group"]["train.init_weights"] for r in record["rows"]} == {None}  # only the good cell scored
    md = (out / "bench.md").read_text()
    assert "## Failed and missing cells" in md and md.count("no result (seed 0 ") == 2
    assert "0 of 1" in (out / "bench.csv").read_text() or "0:failed" in (out / "bench.csv").read_text()
    assert "no result" in (out / "bench.tex").read_text()
    # A re-run skips the finished cell and tries the failed one again (it is not "done").
    again = CliRunner().invoke(cli, ["bench", str(path), "--out", str(out)])
    assert again.exit_code == 2
    assert "init_weights-None__seed-0: done, skipped" in again.output
    assert "garbage.pth__seed-0: done" not in again.output
