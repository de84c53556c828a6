"""``wsss report`` in a real browser: headless Chromium loads the page without console errors,
decodes every image and shows the numbers of results.json.

Skipped unless ``chromium`` (or ``chromium-browser``) is on PATH; on Debian/Ubuntu CI:
``apt-get update && apt-get install -y chromium``.
"""
from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from test_report import invoke, make_run, parse   # same folder; pytest puts it on sys.path
from wsss_bench.evaluation.tables import pct

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="needs chromium on PATH "
                                "(apt-get install -y chromium)")

# Appended to a *copy* of the report only (the report itself has no scripts): after the load
# event, record how many images decoded into the DOM, then log a marker.  The marker proves the
# console is being captured, so "no other console line" really means "no console error".
PROBE = """<script>
window.addEventListener("load", function () {
  var imgs = Array.prototype.slice.call(document.images);
  var ok = imgs.filter(function (i) { return i.complete && i.naturalWidth > 0; }).length;
  var out = document.createElement("pre");
  out.id = "probe";
  out.textContent = JSON.stringify({images: imgs.length, decoded: ok});
  document.body.appendChild(out);
  console.log("probe-done");
});
</script>"""
CONSOLE = re.compile(r":CONSOLE[:(]\d*\)?\]? ?(.*)")


def chromium(profile: Path, *args: str) -> subprocess.CompletedProcess:
    """Headless Chromium, isolated from the network and from any user profile."""
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           f"--user-data-dir={profile}", "--enable-logging=stderr", "--v=0",
           "--virtual-time-budget=10000", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=180)


def console_lines(stderr: str) -> list[str]:
    return [m.group(1) for line in stderr.splitlines() if (m := CONSOLE.search(line))]


def test_report_renders_in_chromium(tiny_voc: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    results = make_run(tiny_voc, run)
    result = invoke("report", run)
    assert result.exit_code == 0, result.output
    page = run / "report.html"
    expected_images = len(parse(page).images)

    # 1. the page as shipped: a screenshot, and not one console message
    shot = run / "report-screenshot.png"
    done = chromium(tmp_path / "profile1", f"--screenshot={shot}", "--window-size=1200,3000", page.as_uri())
    assert done.returncode == 0, done.stderr[-2000:]
    assert console_lines(done.stderr) == [], done.stderr[-2000:]
    with Image.open(shot) as image:
        pixels = np.asarray(image.convert("L"), np.float32)
    assert pixels.shape == (3000, 1200)
    assert pixels.std() > 10      # text, tables and plots, not a blank page
    print(f"\nscreenshot: {shot}")

    # 2. a probed copy: every image decoded, the console carries only the probe's marker
    probed = tmp_path / "probed.html"
    probed.write_text(page.read_text(encoding="utf-8").replace("</body>", PROBE + "</body>"), encoding="utf-8")
    done = chromium(tmp_path / "profile2", "--dump-dom", probed.as_uri())
    assert done.returncode == 0, done.stderr[-2000:]
    messages = [line.split(", source:")[0] for line in console_lines(done.stderr)]
    assert messages == ['"probe-done"'], done.stderr[-2000:]
    found = re.search(r'<pre id="probe">([^<]*)</pre>', done.stdout)
    assert found, done.stdout[-2000:]
    probe = json.loads(found.group(1))
    assert probe == {"images": expected_images, "decoded": expected_images}

    # 3. the rendered DOM holds every row's mIoU as the report formats it
    dom = tmp_path / "dom.html"
    dom.write_text(done.stdout, encoding="utf-8")
    table = parse(dom).tables["results"]
    fixed = table[0].index(f"fixed mIoU (%) @ {results['threshold']}")
    assert [cells[fixed] for cells in table[1:]] == [pct(r["miou"]) for r in results["rows"]]
