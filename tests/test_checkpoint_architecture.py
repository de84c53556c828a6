"""`wsss cams --weights FILE` takes the architecture from the checkpoint (PSA, SC-CAM, ours)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner, Result

from wsss_bench import create_backbone
from wsss_bench.architecture import backbone_for_checkpoint
from wsss_bench.cli.main import cli
from wsss_bench.engine.model import Classifier


def _released(path: Path, width: float, layout: str, classes: int = 3, k: int = 10) -> Path:
    """A checkpoint in a released layout: PSA's `fc8`, or SC-CAM's `fc8_20` + `fc8_200` (K = k)."""
    torch.manual_seed(0)
    backbone = create_backbone("resnet38d", width=width)
    state = dict(backbone.state_dict())
    channels = backbone.out_channels
    if layout == "psa":
        state["fc8.weight"] = torch.randn(classes, channels, 1, 1) * 0.05
    elif layout == "sccam":
        state["fc8_20.weight"] = torch.randn(classes, channels, 1, 1) * 0.05
        state["fc8_200.weight"] = torch.randn(classes * k, channels, 1, 1) * 0.05
    torch.save(state, path)
    return path


def _cams(folder: Path) -> dict[str, np.ndarray]:
    out = {}
    for f in sorted(folder.glob("*.npz")):
        with np.load(f, allow_pickle=False) as data:
            out[f.name] = {k: data[k] for k in data.files}
    return out


def _run(*args: object) -> Result:
    return CliRunner().invoke(cli, [str(a) for a in args])


@pytest.mark.parametrize("layout", ["psa", "sccam"])
def test_released_layouts_need_no_other_option(tmp_path: Path, tiny_voc: Path, layout: str) -> None:
    weights = _released(tmp_path / f"{layout}.pth", 0.25, layout)
    alone = _run("cams", "--weights", weights, "--data-root", tiny_voc, "--split", "train",
                 "--out", tmp_path / "alone", "--device", "cpu", "--quiet")
    assert alone.exit_code == 0, alone.output
    spelled = _run("cams", "--weights", weights, "--data-root", tiny_voc, "--split", "train",
                   "--out", tmp_path / "spelled", "--device", "cpu", "--quiet", "--backbone", "resnet38d",
                   "--set", "backbone.options={width: 0.25}", "--set", "cams.scales=[1.0,0.5,1.5,2.0]",
                   "--set", "cams.flip=true", "--set", "cams.precision=fp32")
    assert spelled.exit_code == 0, spelled.output
    a, b = _cams(tmp_path / "alone" / "cams" / "final" / "train"), _cams(tmp_path / "spelled" / "cams" / "final" / "train")
    assert a and a.keys() == b.keys()
    for name in a:
        for key in a[name]:
            assert np.array_equal(a[name][key], b[name][key]), (name, key)


def test_backbone_only_file_is_one_line_naming_its_use(tmp_path: Path, tiny_voc: Path) -> None:
    weights = _released(tmp_path / "trunk.pth", 0.0625, "none")
    result = _run("cams", "--weights", weights, "--data-root", tiny_voc, "--split", "train",
                  "--out", tmp_path / "out", "--device", "cpu", "--quiet")
    assert result.exit_code == 2
    assert "without a classifier head" in result.output and "train.init_weights" in result.output
    assert "Traceback" not in result.output


def test_inference_does_not_need_training_only_files(tmp_path: Path, tiny_voc: Path) -> None:
    weights = _released(tmp_path / "psa.pth", 0.0625, "psa")
    result = _run("cams", "--weights", weights, "--data-root", tiny_voc, "--split", "train", "--no-eval",
                  "--out", tmp_path / "out", "--device", "cpu", "--quiet",
                  "--set", "train.init_weights=weights/ilsvrc-cls_rna-a1_cls1000_ep-0001.params")
    assert result.exit_code == 0, result.output


def test_our_checkpoints_record_their_backbone() -> None:
    state = {"backbone.conv_stem.weight": torch.zeros(1)}
    meta = {"backbone": {"name": "efficientnet_lite", "options": {"variant": "lite1", "pretrained": True}}}
    choice = backbone_for_checkpoint(state, meta, "resnet38d", {"width": 0.125})
    assert (choice.name, choice.source) == ("efficientnet_lite", "recorded")
    assert choice.options == {"variant": "lite1", "pretrained": False}  # weights come from the file


def test_plugins_read_their_own_layouts() -> None:
    lite = Classifier(create_backbone("efficientnet_lite", variant="lite0", pretrained=False), 3)
    choice = backbone_for_checkpoint(lite.state_dict(), {}, "resnet38d", {"width": 0.125})
    assert (choice.name, choice.options["variant"], choice.source) == ("efficientnet_lite", "lite0", "inferred")
    res = Classifier(create_backbone("resnet38d", width=0.25), 3)
    choice = backbone_for_checkpoint(res.state_dict(), {}, "resnet38d", {"width": 0.125, "freeze_bn": False})
    assert choice.options == {"width": 0.25, "freeze_bn": False} and choice.source == "inferred"
    unknown = backbone_for_checkpoint({"conv.weight": torch.zeros(1)}, {}, "resnet38d", {"width": 0.5})
    assert (unknown.name, unknown.options, unknown.source) == ("resnet38d", {"width": 0.5}, "configured")


@pytest.mark.slow
def test_full_width_released_checkpoint(tmp_path: Path, tiny_voc: Path) -> None:
    weights = _released(tmp_path / "sccam.pth", 1.0, "sccam")
    result = _run("cams", "--weights", weights, "--data-root", tiny_voc, "--split", "val",
                  "--out", tmp_path / "out", "--device", "cpu", "--quiet")
    assert result.exit_code == 0, result.output
    assert len(_cams(tmp_path / "out" / "cams" / "final" / "val")) == 4


def test_voc_tree_without_train_aug_says_what_it_is(tmp_path: Path) -> None:
    from conftest import write_voc_tree

    root = write_voc_tree(tmp_path / "VOC2012", {"train": ["a", "b"], "val": ["c"]})
    result = _run("run", "--method", "cam", "--data-root", root, "--out", tmp_path / "out", "--device", "cpu")
    assert result.exit_code == 2
    assert "SBD-augmented" in result.output and "dataset.train_split=train" in result.output
    devkit = _run("data", "check", "--data-root", tmp_path, "--split", "train")
    assert devkit.exit_code == 2 and "VOC2012 folder itself" in devkit.output


def test_readme_reproduction_commands_run_on_a_small_tree(tmp_path: Path, tiny_voc: Path) -> None:
    """The README's "Reproduce the paper's CAM table" block, as written, on a VOC-layout tree."""
    import re
    import shlex

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = readme.split("### Reproduce the paper's CAM table", 1)[1]
    block = re.search(r"```bash\n(.*?)```", section, re.S).group(1)
    files = {"res38_cls.pth": _released(tmp_path / "res38_cls.pth", 0.0625, "psa"),
             "sccam_round3.pth": _released(tmp_path / "sccam_round3.pth", 0.0625, "sccam")}
    commands = [line.split("#", 1)[0].strip() for line in block.splitlines() if line.strip()]
    assert len(commands) == 3 and all(c.startswith("wsss ") for c in commands)
    for command in commands:
        for name, path in files.items():
            command = command.replace(name, str(path))
        command = command.replace("VOCdevkit/VOC2012", str(tiny_voc)).replace("runs/", f"{tmp_path}/runs/")
        result = _run(*shlex.split(command)[1:], *(["--device", "cpu"] if " cams " in f" {command} " else []))
        assert result.exit_code == 0, (command, result.output)
    printed = result.output
    assert "mIoU" in printed
    assert len(_cams(tmp_path / "runs" / "sccam" / "cams" / "final" / "val")) == 4


def test_newcomer_errors_are_one_line(tmp_path: Path, tiny_voc: Path) -> None:
    folder = tmp_path / "ckpts"
    folder.mkdir()
    as_dir = _run("cams", "--weights", folder, "--data-root", tiny_voc, "--out", tmp_path / "o", "--device", "cpu")
    assert as_dir.exit_code == 2 and "is a directory" in as_dir.output
    (tmp_path / "a.yaml").write_text("seed: 1\n")
    (tmp_path / "b.yaml").write_text("seed: 2\n")
    twice = _run("run", "--dry-run", "--config", tmp_path / "a.yaml", "--config", tmp_path / "b.yaml")
    assert twice.exit_code == 2 and "--config given 2 times" in twice.output
    import shutil

    unmasked = tmp_path / "unmasked"
    shutil.copytree(tiny_voc, unmasked)
    shutil.rmtree(unmasked / "SegmentationClassAug")
    (unmasked / "cls_labels.json").write_text('{"img_000": [0], "img_001": [1], "img_002": [2], "img_003": [0]}')
    check = _run("data", "check", "--data-root", unmasked, "--split", "train")
    assert check.exit_code == 0 and "no masks: not scorable" in check.output
    bench = tmp_path / "bench.yaml"
    bench.write_text("name: ../../escape\nmatrix: {seed: [0]}\n")
    escaped = _run("bench", bench, "--dry-run")
    assert escaped.exit_code == 2 and "names a folder" in escaped.output
