"""The HTML report in a real browser: headless Chromium loads it offline, every plotly figure
renders (an SVG with data), nothing is written to the console, and a screenshot is saved.

The screenshot goes to ``$ARTIFACTS`` (CI uploads it) or the test's temporary directory. The test
skips, saying why, only when no Chromium/Chrome binary is installed (.ci/run installs the Debian
package ``chromium``).
"""

import json
import os
import pathlib
import re
import shutil
import subprocess

import pytest

from landscape import write_report

BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable", "chrome")
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-extensions",
    "--disable-dev-shm-usage",
    "--hide-scrollbars",
    "--enable-logging=stderr",
    "--v=0",
]

# Injected into a COPY of the report: records errors and, once loaded, writes what rendered into
# an attribute of <body>, which --dump-dom then shows.
PROBE_HEAD = """<script>
window.__errors = [];
window.addEventListener('error', function (e) { window.__errors.push('error: ' + e.message); });
window.addEventListener('unhandledrejection', function (e) {
  window.__errors.push('unhandledrejection: ' + e.reason); });
(function () { var orig = console.error; console.error = function () {
  window.__errors.push('console.error: ' + Array.prototype.join.call(arguments, ' '));
  return orig.apply(console, arguments); }; })();
</script>"""
PROBE_TAIL = """<script>
window.addEventListener('load', function () { setTimeout(function () {
  var divs = Array.prototype.slice.call(document.querySelectorAll('.plotly-graph-div'));
  var figs = divs.map(function (d) {
    // _fullData: the traces after plotly decoded them (data may hold base64 typed arrays)
    var points = (d._fullData || []).reduce(function (n, t) {
      return n + ((t.x && t.x.length) || 0) + ((t.z && t.z.length) || 0); }, 0);
    return {id: d.id, svg: d.querySelectorAll('svg.main-svg').length,
            traces: (d.data || []).length, points: points,
            drawn: d.querySelectorAll('.scatterlayer path, .contourlayer path, .trace path').length};
  });
  document.body.setAttribute('data-probe', JSON.stringify(
    {plotly: typeof Plotly !== 'undefined', figures: figs, errors: window.__errors}));
}, 300); });
</script>"""


def _browser() -> str | None:
    for name in BROWSERS:
        path = shutil.which(name)
        if path:
            return path
    return None


@pytest.fixture(scope="module")
def browser():
    path = _browser()
    if path is None:
        pytest.skip("no Chromium/Chrome binary on PATH (install the Debian package 'chromium'; "
                    ".ci/run does) - the report was not checked in a browser")
    return path


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    from tests.landscape.test_report import build_entries

    out = tmp_path_factory.mktemp("report") / "report.html"
    return write_report(build_entries(), out, title="browser test report")


def _run(browser: str, profile: pathlib.Path, url: str, *extra: str) -> subprocess.CompletedProcess:
    cmd = [browser, *FLAGS, f"--user-data-dir={profile}", *extra, url]
    env = {**os.environ, "HOME": str(profile)}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=180, env=env)


def _console_lines(stderr: str) -> list[str]:
    return [ln for ln in stderr.splitlines() if ":CONSOLE" in ln or "Uncaught" in ln]


@pytest.mark.slow
def test_report_renders_in_headless_chromium(browser, report, tmp_path):
    html = report.read_text()
    probed = tmp_path / "probed.html"
    probed.write_text(html.replace("<head>", "<head>" + PROBE_HEAD, 1)
                      .replace("</body>", PROBE_TAIL + "</body>", 1))
    res = _run(browser, tmp_path / "profile-1", probed.as_uri(),
               "--virtual-time-budget=15000", "--dump-dom")
    assert res.returncode == 0, res.stderr[-2000:]
    m = re.search(r"data-probe=\"([^\"]*)\"", res.stdout)
    assert m, "the page did not finish loading: " + res.stdout[:500]
    probe = json.loads(m.group(1).replace("&quot;", '"').replace("&amp;", "&")
                       .replace("&lt;", "<").replace("&gt;", ">"))
    assert probe["plotly"], "plotly.js did not load (it must be embedded: no network here)"
    assert probe["errors"] == []
    assert _console_lines(res.stderr) == []
    expected = len(re.findall(r'class="plotly-graph-div"', html))
    assert expected >= 4 and len(probe["figures"]) == expected
    for fig in probe["figures"]:
        assert fig["svg"] >= 1, f"{fig['id']} has no rendered SVG"
        assert fig["traces"] >= 1 and fig["points"] > 0, f"{fig['id']} has no data"
        assert fig["drawn"] >= 1, f"{fig['id']} drew no paths"


@pytest.mark.slow
def test_report_screenshot_and_clean_console(browser, report, tmp_path):
    """The unmodified page: console clean, and a screenshot for the CI artifacts."""
    artifacts = pathlib.Path(os.environ.get("ARTIFACTS") or tmp_path)
    artifacts.mkdir(parents=True, exist_ok=True)
    shot = artifacts / "report-screenshot.png"
    if shot.exists():
        shot.unlink()
    res = _run(browser, tmp_path / "profile-2", report.as_uri(), "--virtual-time-budget=15000",
               f"--screenshot={shot}", "--window-size=1280,2400")
    assert res.returncode == 0, res.stderr[-2000:]
    assert _console_lines(res.stderr) == []
    assert shot.exists() and shot.stat().st_size > 10_000
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
