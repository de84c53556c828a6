"""``wsss report``: a self-contained HTML page for a run or a bench folder."""
from __future__ import annotations

import base64
import io
import json
import shutil
from html.parser import HTMLParser
from pathlib import Path
from typing import Optional

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from wsss_bench.orchestration.bench import Cell, write_tables
from wsss_bench.cli import cmd_report
from wsss_bench.cli.common import WsssGroup
from wsss_bench.cli.main import cli as main_cli
from wsss_bench.evaluation.tables import pct
from wsss_bench.data.voc import voc_palette
from wsss_bench.orchestration.report.scores import ImageScore, image_miou, pick_examples

# The smallest SC-CAM run (as in test_subcat.py): one epoch, 32-pixel crops, a 1/16-width ResNet-38.
TINY = ["--set", "train.epochs=1", "--set", "train.crop_size=32", "--set", "train.resize_long=[32,48]",
        "--set", "cams.scales=[1.0]", "--backbone", "resnet38d",
        "--set", "backbone.options={width: 0.0625, freeze_bn: false, freeze_stem: false}",
        "--quiet", "--device", "cpu"]


def report_cli():
    """A group holding only the report command: tests it without main.py's registration."""
    group = WsssGroup(name="wsss")
    cmd_report.register(group)
    return group


def invoke(*args: object):
    return CliRunner().invoke(report_cli(), [str(a) for a in args])


def make_run(voc: Path, out: Path) -> dict:
    result = CliRunner().invoke(main_cli, [str(a) for a in (
        "run", "--method", "subcat", "--data-root", voc, "--out", out, *TINY,
        "--set", "method.options={rounds: 1, k: 2}")])
    assert result.exit_code == 0, result.output
    return json.loads((out / "results.json").read_text())


class PageParser(HTMLParser):
    """Collects image sources, table cells by table id, scripts and external references."""

    def __init__(self) -> None:
        super().__init__()
        self.images: list[str] = []
        self.tables: dict[str, list[list[str]]] = {}
        self.scripts = 0
        self.external: list[str] = []
        self._table: Optional[str] = None
        self._cell: Optional[list[str]] = None

    def handle_starttag(self, tag: str, attrs: list) -> None:
        a = dict(attrs)
        if tag == "img":
            self.images.append(a.get("src") or "")
        if tag == "script":
            self.scripts += 1
        for key in ("href", "src"):
            value = a.get(key) or ""
            if value and not value.startswith(("data:", "#")):
                self.external.append(value)
        if tag == "table" and a.get("id"):
            self._table = a["id"]
            self.tables[self._table] = []
        if tag == "tr" and self._table:
            self.tables[self._table].append([])
        if tag in ("td", "th") and self._table:
            self._cell = []

    def handle_endtag(self, tag: str) -> None:
        if tag in ("td", "th") and self._table and self._cell is not None:
            self.tables[self._table][-1].append("".join(self._cell).strip())
            self._cell = None
        if tag == "table":
            self._table = None

    def handle_data(self, data: str) -> None:
        if self._cell is not None:
            self._cell.append(data)


def parse(path: Path) -> PageParser:
    parser = PageParser()
    parser.feed(path.read_text(encoding="utf-8"))
    return parser


def decode(uri: str) -> Image.Image:
    assert uri.startswith(("data:image/png;base64,", "data:image/jpeg;base64,")), uri[:40]
    image = Image.open(io.BytesIO(base64.b64decode(uri.split(",", 1)[1], validate=True)))
    image.load()
    return image


def test_run_report(tiny_voc: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    results = make_run(tiny_voc, run)
    result = invoke("report", run)
    assert result.exit_code == 0, result.output
    page = run / "report.html"
    assert f"report: {page}" in result.output
    parsed = parse(page)

    # self-contained: every image is an embedded, decodable PNG/JPEG; no scripts, no links out
    assert parsed.scripts == 0 and parsed.external == []
    assert len(parsed.images) >= 10
    for uri in parsed.images:
        image = decode(uri)
        assert image.width > 0 and image.height > 0
    # thumbnails stay small (plots are the only large pictures)
    photos = [decode(u) for u in parsed.images if u.startswith("data:image/jpeg")]
    assert photos and max(max(p.size) for p in photos) <= 128

    # the results table holds every row's numbers, formatted as in the report
    table = parsed.tables["results"]
    header, body = table[0], table[1:]
    assert len(body) == len(results["rows"])
    fixed = header.index(f"fixed mIoU (%) @ {results['threshold']}")
    for cells, row in zip(body, results["rows"]):
        assert cells[header.index("split")] == row["split"]
        assert cells[fixed] == pct(row["miou"])
        oracle = row["policies"]["oracle"]
        assert cells[header.index("oracle thr. mIoU (%, upper bound)")] == \
            f"{pct(oracle['miou'])} (t={oracle['threshold']:.2f})"
    per_class = parsed.tables["per-class"]
    assert [c[0] for c in per_class[1:]] == [c["class"] for c in results["final"][0]["per_class"]]
    sizes = parsed.tables["cluster-sizes"]
    assert sizes[0] == ["class", "round1"] and len(sizes) == 1 + 3
    text = page.read_text()
    for section in ("Examples", "Same images across rounds", "Sub-category gallery", "Rounds"):
        assert f">{section}</h2>" in text
    assert "skipped" not in text
    for name in ("per_class_iou", "miou_per_round", "curves_final"):
        assert (run / "plots" / f"{name}.png").is_file()

    # --out elsewhere; a run whose dataset is gone still reports its numbers, with a note
    shutil.move(str(tiny_voc), str(tmp_path / "moved"))
    other = tmp_path / "elsewhere" / "r.html"
    result = invoke("report", run, "--out", other, "--examples", "1")
    assert result.exit_code == 0, result.output
    text = other.read_text()
    assert "examples skipped" in text and "data root does not exist" in text
    assert parse(other).tables["results"] == table


def test_bench_report(tmp_path: Path) -> None:
    spec = {"name": "tiny", "matrix": {"method.name": ["cam", "subcat"], "seed": [0, 1]},
            "labels": {"method.name": "method"}}
    records = []
    for method, seed, miou in (("cam", 0, 0.40), ("cam", 1, 0.44), ("subcat", 0, 0.50), ("subcat", 1, 0.52)):
        rows = [{"split": split, "round": 1 if method == "subcat" else "", "miou": miou - d,
                 "protocol": {"stage": "cam", "threshold_policy": "fixed", "threshold": 0.15,
                              "ignore_index": 255, "mean_over": "classes present in ground truth"}}
                for split, d in (("train", 0.0), ("val", 0.05))]
        records.append({"cell": Cell({"method.name": method, "seed": seed}, {}),
                        "results": {"rows": rows, "seed": seed},
                        "meta": {"seconds": 12.0, "peak_rss_mb": 800.0}})
    out = tmp_path / "bench"
    out.mkdir()
    aggregated = write_tables(spec, records, out)["rows"]
    result = invoke("report", out)
    assert result.exit_code == 0, result.output
    parsed = parse(out / "report.html")
    table = parsed.tables["bench"]
    assert table[0][0] == "method" and len(table) == 1 + len(aggregated)
    for cells, row in zip(table[1:], aggregated):
        assert f"{pct(row['miou_mean'])} ± {pct(row['miou_std'])}" in cells
    assert len(parsed.images) == 1 and decode(parsed.images[0]).width > 100
    assert (out / "plots" / "bench_miou.png").is_file()


@pytest.mark.parametrize("setup, message", [
    ("missing", "folder does not exist"),
    ("file", "not a folder"),
    ("empty", "not a run or bench folder"),
    ("unfinished", "results.json missing"),
    ("broken", "not valid JSON"),
    ("unfinished-bench", "bench.json missing"),
])
def test_bad_folders(tmp_path: Path, setup: str, message: str) -> None:
    target = tmp_path / "target"
    if setup == "file":
        target.write_text("x")
    elif setup != "missing":
        target.mkdir()
    if setup == "unfinished":
        (target / "config.yaml").write_text("seed: 0\n")
    if setup == "broken":
        (target / "results.json").write_text("{not json")
    if setup == "unfinished-bench":
        (target / "bench.yaml").write_text("name: x\n")
    result = invoke("report", target)
    assert result.exit_code == 2, result.output
    assert message in result.output and "Traceback" not in result.output
    assert len(result.output.strip().splitlines()) == 1
    assert not (tmp_path / "target" / "report.html").exists()


def test_image_miou_and_example_choice() -> None:
    truth = np.array([[0, 0, 1, 1], [0, 0, 1, 255]], np.uint8)
    assert image_miou(truth.copy(), truth, 2) == 1.0
    pred = np.zeros_like(truth)   # all background: IoU bg = 4/7, class 1 = 0
    assert image_miou(pred, truth, 2) == pytest.approx((4 / 7 + 0) / 2)
    assert np.isnan(image_miou(pred, np.full_like(truth, 255), 2))
    scores = [ImageScore(f"i{n}", v) for n, v in enumerate([0.9, 0.1, 0.5, float("nan"), 0.7, 0.3])]
    picks = pick_examples(scores, 2, seed=0)
    assert [(k, s.image_id) for k, s in picks[:4]] == [("best", "i0"), ("best", "i4"), ("worst", "i1"), ("worst", "i5")]
    assert [k for k, _ in picks[4:]] == ["random"] and picks[4][1].image_id == "i2"
    assert voc_palette()[1].tolist() == [128, 0, 0] and voc_palette()[255].tolist() == [224, 224, 192]
