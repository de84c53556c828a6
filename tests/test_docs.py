"""The documentation runs: Python API doctests, plugin-guide examples, a section per hook."""
from __future__ import annotations

import doctest
import inspect
import re
import types
from pathlib import Path

import torch
from click.testing import CliRunner

import wsss_bench
from wsss_bench import hookspecs
from wsss_bench.plugins import register_plugin, unregister_plugin

DOCS = Path(__file__).parents[1] / "docs"
GUIDE = (DOCS / "plugin-guide.md").read_text()


def _sections(text: str) -> dict[str, str]:
    """``### `hook(args)``` sections of the guide, keyed by hook name."""
    parts = re.split(r"^### `(\w+)\(([^)]*)\)`\s*$", text, flags=re.M)
    return {parts[i]: f"({parts[i + 1]})\n{parts[i + 2]}" for i in range(1, len(parts) - 2, 3)}


def _python_blocks(text: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", text, flags=re.S)


def test_every_hook_has_a_guide_section_with_its_signature_and_an_example() -> None:
    sections = _sections(GUIDE)
    names = hookspecs.hook_names()
    assert names  # the spec module really defines hooks
    for name in names:
        assert name in sections, f"hook {name} has no section in docs/plugin-guide.md"
        params = ", ".join(inspect.signature(getattr(hookspecs, name)).parameters)
        assert sections[name].startswith(f"({params})"), f"{name}: documented signature is stale"
        blocks = _python_blocks(sections[name])
        assert any(re.search(rf"def {name}\(", b) for b in blocks), f"{name}: no example implementation"
    assert set(sections) <= set(names), f"guide documents hooks that do not exist: {set(sections) - set(names)}"
    assert "docs/plugin-guide.md" in (DOCS.parent / "README.md").read_text()


def _load_example(hook: str) -> types.ModuleType:
    block = next(b for b in _python_blocks(_sections(GUIDE)[hook]) if f"def {hook}(" in b)
    module = types.ModuleType(f"guide_{hook}")
    exec(compile(block, f"plugin-guide.md:{hook}", "exec"), module.__dict__)
    return module


def _with_plugin(hook: str):
    module = _load_example(hook)
    register_plugin(module, f"guide-{hook}")
    return module


def test_guide_backbone_example_works() -> None:
    _with_plugin("register_backbones")
    try:
        net = wsss_bench.create_backbone("tinynet", width=8)
        assert net(torch.zeros(1, 3, 32, 32)).shape == (1, 8, 8, 8)
        assert (net.out_channels, net.stride) == (8, 4)
    finally:
        unregister_plugin("guide-register_backbones")


def test_guide_clusterer_example_works() -> None:
    import numpy as np

    _with_plugin("register_clusterers")
    try:
        labels = wsss_bench.create_clusterer("round-robin").fit_predict(np.zeros((5, 2)), 2, 0)
        assert labels.tolist() == [0, 1, 0, 1, 0]
    finally:
        unregister_plugin("guide-register_clusterers")


def test_guide_method_and_dataset_examples_register(tmp_path: Path) -> None:
    _with_plugin("register_methods")
    _with_plugin("register_datasets")
    try:
        assert "plain-cam" in wsss_bench.list_methods()
        assert hasattr(wsss_bench.create_method("plain-cam"), "run")
        dataset = wsss_bench.create_dataset("voc-mirror", path=str(tmp_path))
        assert dataset.prepare(None, tmp_path / "cache") == tmp_path
    finally:
        unregister_plugin("guide-register_methods")
        unregister_plugin("guide-register_datasets")


def test_guide_refiner_example_works(tmp_path: Path) -> None:
    import numpy as np
    from PIL import Image

    from wsss_bench.data.voc import open_split
    from wsss_bench.evaluation.camfiles import write_cam
    from wsss_bench.refinement import refine_folder
    from tests.conftest import write_voc_tree

    _with_plugin("register_refiners")
    try:
        root = write_voc_tree(tmp_path / "voc", {"train": ["a"]})
        ramp = np.tile(np.linspace(0, 1, 40, dtype=np.float32), (32, 1))[None]
        write_cam(tmp_path / "cams" / "a.npz", np.array([1]), ramp)
        refine_folder("band", {"low": 0.25, "high": 0.75}, tmp_path / "cams", open_split(root, "train"),
                      tmp_path / "out", show_progress=False)
        labels = np.array(Image.open(tmp_path / "out" / "a.png"))
        assert set(np.unique(labels)) == {0, 2, 255}
        assert labels[0, 0] == 0 and labels[0, -1] == 2 and labels[0, 20] == 255
    finally:
        unregister_plugin("guide-register_refiners")


def test_guide_launcher_example_passes_the_kit() -> None:
    from wsss_bench.testing import check_launcher

    _with_plugin("register_launchers")
    try:
        check_launcher("niced", timeout=60)
    finally:
        unregister_plugin("guide-register_launchers")


def test_guide_command_example_works(tmp_path: Path) -> None:
    import click

    module = _load_example("register_commands")
    group = click.Group("wsss")
    module.register_commands(cli=group)
    split = tmp_path / "train.txt"
    split.write_text("a\nb\nc\n")
    assert CliRunner().invoke(group, ["count-ids", str(split)]).output.strip() == "3"


def test_python_api_page_doctests(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    text = (DOCS / "python-api.md").read_text()
    parser, runner = doctest.DocTestParser(), doctest.DocTestRunner(optionflags=doctest.ELLIPSIS)
    test = parser.get_doctest(text, {}, "python-api.md", str(DOCS / "python-api.md"), 0)
    assert len(test.examples) >= 15
    runner.run(test)
    assert runner.failures == 0, f"{runner.failures} doctest failure(s) in docs/python-api.md (see output)"
