"""SC-CAM: sub-category labels, round structure, released-checkpoint layouts, single steps."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from wsss_bench import create_backbone, create_clusterer
from wsss_bench.cli.main import cli
from wsss_bench.engine.model import Classifier
from wsss_bench_plugins.method_subcat import (SubcatOptions, changed_since, class_k,
                                             cluster_per_class, subcategory_targets)

WIDTH = 0.0625
TINY = ["--set", "train.epochs=1", "--set", "train.crop_size=32", "--set", "train.resize_long=[32,48]",
        "--set", "cams.scales=[1.0,0.5]", "--backbone", "resnet38d",
        "--set", f"backbone.options={{width: {WIDTH}, freeze_bn: false, freeze_stem: false}}",
        "--quiet", "--device", "cpu"]


def invoke(*args: str):
    result = CliRunner().invoke(cli, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    return result


def test_targets_one_subcategory_per_present_parent() -> None:
    assignment = np.array([[2, -1, 0], [-1, 1, -1]])
    targets = subcategory_targets(assignment, 3)
    assert targets.shape == (2, 9)
    assert np.flatnonzero(targets[0]).tolist() == [0 * 3 + 2, 2 * 3 + 0]
    assert np.flatnonzero(targets[1]).tolist() == [1 * 3 + 1]


def test_clustering_per_class_uses_only_member_images() -> None:
    rng = np.random.default_rng(0)
    feats = np.concatenate([rng.normal(0, 0.1, (10, 4)), rng.normal(5, 0.1, (10, 4))]).astype(np.float32)
    labels = np.zeros((20, 2), np.float32)
    labels[:, 0] = 1
    labels[:3, 1] = 1
    assignment = cluster_per_class(feats, labels, [2, 5], create_clusterer("kmeans"), 0)
    assert (assignment[3:, 1] == -1).all() and (assignment[:3, 1] >= 0).all()
    # class 1 has 3 images but K = 5: K is clipped to the image count
    assert len(set(assignment[:3, 1])) == 3
    first, second = assignment[:10, 0], assignment[10:, 0]
    assert len(set(first)) == 1 and len(set(second)) == 1 and first[0] != second[0]


def test_changed_since_ignores_relabelling() -> None:
    previous = np.array([[0], [0], [1], [1], [2]])
    permuted = np.array([[1], [1], [2], [2], [0]])
    assert changed_since(previous, permuted) == 0
    moved = np.array([[1], [2], [2], [2], [0]])
    assert changed_since(previous, moved) == 1
    assert changed_since(None, moved) is None


def test_per_class_k() -> None:
    opts = SubcatOptions(k=10, k_per_class={"b": 3})
    assert class_k(opts, ["a", "b"]) == [10, 3]
    with pytest.raises(Exception, match="unknown classes"):
        class_k(SubcatOptions(k_per_class={"zzz": 2}), ["a", "b"])


def test_subcat_run_reports_every_round(tiny_voc: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    invoke("run", "--method", "subcat", "--data-root", tiny_voc, "--out", out, *TINY,
           "--set", "method.options={rounds: 2, k: 2, sub_head_cams: true}")
    results = json.loads((out / "results.json").read_text())
    parent_rows = [r for r in results["rows"] if r["head"] == "parent"]
    assert [(r["round"], r["split"]) for r in parent_rows] == [
        (0, "train"), (0, "val"), (1, "train"), (1, "val"), (2, "train"), (2, "val")]
    assert any(r["head"] == "sub" for r in results["rows"])
    assert [r["round"] for r in results["final"]] == [2, 2]
    clusters = results["extra"]["clusters"]
    assert set(clusters) == {"round1", "round2"} and clusters["round1"]["changed"] is None
    assert isinstance(clusters["round2"]["changed"], int)
    assignment = np.load(out / "subcategories" / "round1.npy")
    assert assignment.shape == (8, 3) and assignment.max() < 2
    state = torch.load(out / "checkpoints" / "round2.pth", weights_only=True)["state_dict"]
    assert state["heads.sub.weight"].shape[0] == 3 * 2
    assert "Sub-category clusters per round" in (out / "results.md").read_text()


def _classifier(sub: int = 0) -> Classifier:
    backbone = create_backbone("resnet38d", width=WIDTH, freeze_bn=False, freeze_stem=False)
    return Classifier(backbone, 3, sub)


def _as_original_layout(model: Classifier, heads: dict[str, str]) -> dict[str, torch.Tensor]:
    """A state dict laid out like PSA/SC-CAM files: flat backbone keys and fc8* heads."""
    state = {k[len("backbone."):]: v for k, v in model.state_dict().items() if k.startswith("backbone.")}
    for ours, theirs in heads.items():
        state[f"{theirs}.weight"] = model.heads[ours].weight.detach().clone()
    return state


@pytest.mark.parametrize("heads", [{"parent": "fc8"}, {"parent": "fc8_20", "sub": "fc8_200"}])
def test_released_checkpoint_layouts_load_and_give_the_same_cams(heads, tiny_voc: Path, tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = _classifier(sub=6 if "sub" in heads else 0).eval()
    path = tmp_path / "released.pth"
    torch.save(_as_original_layout(model, heads), path)
    out = tmp_path / "cams-run"
    invoke("cams", "--weights", path, "--data-root", tiny_voc, "--out", out, "--split", "val",
           "--set", "backbone.options={width: 0.0625}", "--backbone", "resnet38d",
           "--set", "cams.scales=[1.0]", "--set", "cams.flip=false", "--quiet", "--device", "cpu")
    from wsss_bench.data.voc import open_split
    from wsss_bench.engine.cams import image_cams

    ds = open_split(tiny_voc, "val")
    image_id = ds.ids[0]
    keys = np.flatnonzero(ds.label(image_id))
    expected = image_cams(model, ds.load_image(image_id), keys.tolist(), [1.0], False, torch.device("cpu"))
    with np.load(out / "cams" / "final" / "val" / f"{image_id}.npz") as data:
        np.testing.assert_allclose(data["cams"], expected, atol=1e-6)
        assert data["keys"].tolist() == keys.tolist()


def test_checkpoint_with_wrong_shapes_is_a_clear_error(tiny_voc: Path, tmp_path: Path) -> None:
    model = _classifier()
    state = _as_original_layout(model, {"parent": "fc8"})
    state["fc8.weight"] = torch.zeros(5, state["fc8.weight"].shape[1], 1, 1)
    torch.save(state, tmp_path / "bad.pth")
    result = CliRunner().invoke(cli, ["cams", "--weights", str(tmp_path / "bad.pth"), "--data-root", str(tiny_voc),
                                      "--out", str(tmp_path / "o")])
    assert result.exit_code == 2 and "parent head has 5 classes" in result.output
    result = CliRunner().invoke(cli, ["cams", "--weights", str(tmp_path / "missing.pth"), "--data-root",
                                      str(tiny_voc), "--out", str(tmp_path / "o")])
    assert result.exit_code == 2 and "missing.pth: weights file not found" in result.output


def test_single_steps_chain_like_the_original_readme(tiny_voc: Path, tmp_path: Path) -> None:
    out = tmp_path / "steps"
    common = ["--data-root", tiny_voc, "--out", out, *TINY]
    invoke("train", "--tag", "round0", *common)
    invoke("extract-features", "--weights", out / "checkpoints/round0.pth", "--tag", "round0", *common)
    feats = np.load(out / "features/round0.npy")
    assert feats.shape[0] == 8
    invoke("cluster", "--features", out / "features/round0.npy", "--tag", "round1", "--k", "2", *common)
    targets = out / "subcategories/round1.targets.npy"
    assert np.load(targets).shape == (8, 6)
    invoke("train", "--tag", "round1", "--targets", f"sub={targets}", "--loss-weight", "sub=5", *common)
    result = invoke("cams", "--weights", out / "checkpoints/round1.pth", "--tag", "round1", "--head", "sub", *common)
    assert "mIoU" in result.output
    assert len(list((out / "cams/round1-cam-sub/val").glob("*.npz"))) == 4
