"""Declared true sub-types: the file format, AMI / purity diagnostics, clusterer metadata, oracle."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from wsss_bench import clustering, create_clusterer
from wsss_bench.cli.main import cli
from wsss_bench.data.subtypes import SUBTYPE_FORMAT, read_subtype_truth
from wsss_bench.errors import ConfigError, DataError, PluginError
from wsss_bench.evaluation.subtype_scores import class_scores, subtype_scores
from wsss_bench_plugins.method_subcat import chosen_ks, class_metadata, cluster_per_class


def test_relabelled_truth_scores_one_and_noise_scores_near_zero():
    truth = np.repeat([0, 1, 2], 30)
    ami, purity = class_scores(truth, (truth + 1) % 3)  # same partition, other names
    assert ami == pytest.approx(1.0) and purity == pytest.approx(1.0)
    noise = np.random.default_rng(0).integers(0, 3, truth.size)
    ami, purity = class_scores(truth, noise)
    assert abs(ami) < 0.05 and purity < 0.6


def test_purity_by_hand():
    # clusters {0,0,1} {1,1} {2}: majorities 2 + 2 + 1 = 5 of 6 images
    truth = np.array([0, 0, 1, 1, 1, 2])
    clusters = np.array([0, 0, 0, 1, 1, 2])
    assert class_scores(truth, clusters)[1] == pytest.approx(5 / 6)


def test_classes_with_one_true_subtype_are_not_averaged():
    truth = np.array([[0, 0], [1, 0], [0, 0], [1, -1]])
    assignment = np.array([[1, 0], [0, 1], [1, 0], [0, -1]])
    scores = subtype_scores(assignment, truth, ["a", "b"])
    assert scores["ami"]["per_class"]["b"] is None and scores["classes_scored"] == 1
    assert scores["ami"]["mean"] == pytest.approx(1.0)


def _write_truth(root: Path, labels: dict, counts=(2, 3)) -> None:
    (root / "subtype_labels.json").write_text(json.dumps(
        {"format": SUBTYPE_FORMAT, "num_subtypes": list(counts), "labels": labels}))


def test_truth_file_is_validated(tmp_path):
    assert read_subtype_truth(tmp_path, 2) is None
    _write_truth(tmp_path, {"a": [0, 2], "b": [1, -1]})
    truth = read_subtype_truth(tmp_path, 2)
    assert truth.matrix(["b", "a"]).tolist() == [[1, -1], [0, 2]]
    with pytest.raises(DataError, match="no sub-types declared for 'c'"):
        truth.matrix(["c"])
    _write_truth(tmp_path, {"a": [2, 0]})  # class 0 has only 2 sub-types
    with pytest.raises(DataError, match="sub-types of 'a'"):
        read_subtype_truth(tmp_path, 2)
    (tmp_path / "subtype_labels.json").write_text("{not json")
    with pytest.raises(DataError, match="cannot read"):
        read_subtype_truth(tmp_path, 2)


class _OffByOne:
    def fit_predict(self, features, k, seed):
        return np.arange(len(features)) % k + 1


class _Legacy:
    """A third-party clusterer written against the original three-argument contract."""

    def fit_predict(self, features, k, seed):
        return np.zeros(len(features), np.int64)


def test_clusterer_labels_are_checked():
    with pytest.raises(PluginError, match=r"_OffByOne broke its contract: labels must lie in \[0, 3\)"):
        clustering.fit_predict(_OffByOne(), np.zeros((5, 2)), 3, 0)


def test_metadata_reaches_only_clusterers_that_take_it():
    meta = {"class_index": 0, "class_name": "a", "image_ids": ["x"], "subtypes": np.array([0]),
            "num_subtypes": 1}
    assert clustering.fit_predict(_Legacy(), np.zeros((1, 2)), 2, 0, meta).tolist() == [0]
    assert not clustering.accepts_metadata(_Legacy())
    assert clustering.accepts_metadata(create_clusterer("oracle"))


def test_oracle_returns_the_truth_and_sizes_k_from_it():
    labels = np.array([[1, 0], [1, 1], [1, 1], [0, 1]], np.float32)
    ids = ["a", "b", "c", "d"]
    from wsss_bench.data.subtypes import SubtypeTruth

    truth = SubtypeTruth([2, 3], None, {"a": [1, -1], "b": [0, 2], "c": [1, 0], "d": [-1, 2]})
    meta = class_metadata(labels, ids, ["p", "q"], truth)
    oracle = create_clusterer("oracle")
    ks = chosen_ks([10, 10], oracle, meta)
    assert ks == [2, 3]
    assignment = cluster_per_class(np.zeros((4, 3)), labels, ks, oracle, 0, meta)
    assert assignment.tolist() == [[1, -1], [0, 2], [1, 0], [-1, 2]]
    # the built-in k-means ignores the metadata and keeps the configured K
    assert chosen_ks([10, 10], create_clusterer("kmeans"), meta) == [10, 10]


def test_oracle_without_declared_subtypes_is_one_clear_error():
    meta = class_metadata(np.ones((2, 1), np.float32), ["a", "b"], ["p"], None)
    with pytest.raises(ConfigError, match="declares none"):
        chosen_ks([3], create_clusterer("oracle"), meta)


@pytest.mark.parametrize("clusterer", ["oracle", "kmeans"])
def test_subcat_round_reports_subtype_ami_and_purity(tmp_path, clusterer):
    tiny = ["--set", "dataset.options={n_train_aug: 24, n_train: 6, n_val: 6, n_select: 0, image_size: 48}",
            "--set", "train.epochs=1", "--set", "train.crop_size=32", "--set", "train.resize_long=[32,48]",
            "--set", "cams.scales=[1.0]", "--set", "cams.flip=false", "--set", "eval.policies=[fixed]",
            "--backbone", "resnet38d", "--set", "backbone.options={width: 0.0625}", "--quiet", "--device", "cpu",
            "--set", "method.options.rounds=1", "--set", f"method.options.clusterer.name={clusterer}"]
    result = CliRunner().invoke(cli, ["run", "--method", "subcat", "--out", str(tmp_path / "run"), *tiny])
    assert result.exit_code == 0, result.output
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    ami = results["subtype_ami"]["round1"]
    purity = results["subtype_purity"]["round1"]
    assert set(ami["per_class"]) == set(results["extra"]["k_per_class"])
    if clusterer == "oracle":
        assert ami["mean"] == pytest.approx(1.0) and purity["mean"] == pytest.approx(1.0)
        assert set(results["extra"]["k_per_class"].values()) == {3}  # the synthetic set's 3 sub-types
    else:
        assert -1 <= ami["mean"] <= 1 and 0 < purity["mean"] <= 1
    row = next(r for r in results["rows"] if r["round"] == 1)
    assert row["subtype_ami"] == ami["mean"]
    assert "Sub-categories against the true sub-types" in (tmp_path / "run" / "results.md").read_text()


def test_report_shows_the_subtype_table():
    from wsss_bench.orchestration.report.run_sections import subtype_table

    assert subtype_table({}) is None
    results = {"subtype_ami": {"round1": {"mean": 0.25, "per_class": {"duck": 0.25, "cow": None}}},
               "subtype_purity": {"round1": {"mean": 0.7, "per_class": {"duck": 0.7, "cow": None}}}}
    html = subtype_table(results)
    assert "subtype-scores" in html and "0.250" in html and "0.700" in html and "n/a" in html
