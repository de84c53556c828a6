"""The example plugin package installs like any third-party plugin and is discovered."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

EXAMPLE = Path(__file__).parents[1] / "examples" / "wsss-random-clusterer"


def test_example_plugin_installs_and_registers(tmp_path: Path) -> None:
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                    "--target", str(target), str(EXAMPLE)], check=True, capture_output=True)
    env = {**os.environ, "PYTHONPATH": f"{target}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
           "WSSS_BENCH_DISABLE_PLUGIN_AUTOLOAD": "0"}
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
