"""The wheel carries the core, the built-in plugins and the presets, with their entry points."""
from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).parents[1]


def test_wheel_contains_plugins_configs_and_entry_points(tmp_path: Path) -> None:
    # Built from a copy of the sources: setuptools' build/ folder in a checkout keeps files of
    # earlier builds, which would hide a package missing from setup.cfg.
    source = tmp_path / "src"
    for name in ("wsss_bench", "plugins", "configs"):
        shutil.copytree(ROOT / name, source / name, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("setup.cfg", "pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                    "-q", "-w", str(tmp_path), str(source)], check=True, capture_output=True)
    wheel = next(tmp_path.glob("wsss_bench-*.whl"))
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
        entry_points = next(zf.read(n).decode() for n in names if n.endswith("entry_points.txt"))
    for module in ("method_cam", "method_subcat", "backbone_resnet38d", "backbone_timm",
                   "clusterers_sklearn", "dataset_synthetic", "dataset_voc"):
        assert f"wsss_bench_plugins/{module}.py" in names
    # Every module of the package, subpackages included (a package missing from setup.cfg's list
    # works in an editable install and is absent from the wheel).
    modules = {str(p.relative_to(ROOT)) for p in (ROOT / "wsss_bench").rglob("*.py")}
    assert modules <= names, sorted(modules - names)
    assert "wsss_bench_configs/base.yaml" in names
    assert "wsss_bench_configs/presets/smoke.yaml" in names
    assert "wsss_bench_configs/bench/methods.yaml" in names
    assert "[wsss_bench]" in entry_points and "subcat = wsss_bench_plugins.method_subcat" in entry_points
    assert "wsss = wsss_bench.cli.main:main" in entry_points
    assert not any(n.startswith(("tests/", "plugins/", "configs/")) for n in names)
