"""The example plugin package installs like any third-party plugin and is discovered."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

EXAMPLE = Path(__file__).parents[1] / "examples" / "wsss-random-clusterer"


def install_example(tmp_path: Path) -> dict[str, str]:
    """Install the example package into a private target folder; the environment that sees it."""
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                    "--target", str(target), str(EXAMPLE)], check=True, capture_output=True)
    return {**os.environ, "PYTHONPATH": f"{target}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
            "WSSS_BENCH_DISABLE_PLUGIN_AUTOLOAD": "0"}


def test_example_plugin_installs_and_registers(tmp_path: Path) -> None:
    env = install_example(tmp_path)
    out = subprocess.run([sys.executable, "-m", "wsss_bench.cli.main", "plugins", "--json"],
                         env=env, capture_output=True, text=True, check=True).stdout
    plugins = {p["name"]: p for p in json.loads(out)}
    entry = plugins["random_clusterer"]
    assert entry["distribution"] == "wsss-random-clusterer" and entry["version"] == "0.1.0"
    assert entry["registers"] == {"clusterer": ["random"]} and not entry["builtin"]
    # ...and the autoload switch keeps it out
    env["WSSS_BENCH_DISABLE_PLUGIN_AUTOLOAD"] = "1"
    out = subprocess.run([sys.executable, "-m", "wsss_bench.cli.main", "list", "clusterers"],
                         env=env, capture_output=True, text=True, check=True).stdout
    assert "random" not in out.split()


def test_example_plugin_passes_its_own_conformance_tests(tmp_path: Path) -> None:
    """The example package's tests use wsss_bench.testing, as a third-party plugin's would."""
    env = install_example(tmp_path)
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                             str(EXAMPLE / "tests")], env=env, capture_output=True, text=True,
                            cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "2 passed" in result.stdout, result.stdout
