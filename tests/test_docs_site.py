"""The built docs site (``make docs`` -> site/) in headless Chromium: the home page, a guide and
an API page render, with no console errors, and a screenshot of each is saved.

The site is served over HTTP from 127.0.0.1 (as a browser sees a published site: over file://
Chromium refuses the search worker). The screenshots go to ``$ARTIFACTS`` (CI keeps them) or the
test's temporary directory. The test skips, saying why, only when no Chromium/Chrome binary is
installed (.ci/run installs the Debian package ``chromium``) or the site has not been built.
It reuses the browser helpers of the HTML report's browser test (tests/landscape/test_browser.py).
"""

import functools
import html
import http.server
import os
import pathlib
import re
import threading

import pytest

from tests.landscape.test_browser import _browser, _console_lines, _run

ROOT = pathlib.Path(__file__).resolve().parents[1]
SITE = ROOT / "site"

# page, text its <h1> must hold, markup only its rendered content has
PAGES = {
    "home": ("index.html", "Getting started", 'id="first-steps"'),
    "guide": ("guides/hessian/index.html", "Hessian spectra",
              'id="transformers-and-language-models"'),
    "api": ("api/analysis/index.html", "analysis", 'id="analysis.top_eigenpairs"'),
}


@pytest.fixture(scope="module")
def chromium():
    return _browser() or pytest.skip(
        "no Chromium/Chrome binary on PATH (install the Debian package 'chromium'; .ci/run "
        "does) - the docs site was not checked in a browser")


class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):  # no request log on stderr
        pass


@pytest.fixture(scope="module")
def site():
    if not (SITE / "index.html").is_file():
        pytest.skip(f"the docs site is not built ({SITE}/index.html missing): run `make docs`")
    server = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), functools.partial(_Quiet, directory=str(SITE)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/"
    server.shutdown()
    server.server_close()
    thread.join()


def _dom(chromium, tmp_path, url, name):
    res = _run(chromium, tmp_path / f"profile-{name}", url, "--virtual-time-budget=10000",
               "--dump-dom")
    assert res.returncode == 0, res.stderr[-2000:]
    return res


@pytest.mark.slow
def test_console_errors_are_seen(chromium, tmp_path):
    """The check below can fail: a page that logs an error shows up in Chromium's log."""
    page = tmp_path / "bad.html"
    page.write_text("<html><body><script>console.error('docs-probe-error');"
                    "undefined_function();</script></body></html>")
    res = _run(chromium, tmp_path / "profile-bad", page.as_uri(), "--virtual-time-budget=5000",
               "--dump-dom")
    lines = _console_lines(res.stderr)
    assert any("docs-probe-error" in ln for ln in lines), res.stderr[-2000:]
    assert any("undefined_function" in ln for ln in lines), res.stderr[-2000:]


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(PAGES))
def test_docs_page_renders_without_console_errors(name, chromium, site, tmp_path):
    path, title, marker = PAGES[name]
    assert (SITE / path).is_file(), f"{path} is not in the built site"
    url = site + path
    res = _dom(chromium, tmp_path, url, name)
    assert _console_lines(res.stderr) == [], f"{url}: console output"
    dom = res.stdout
    h1 = re.search(r"<h1[^>]*>(.*?)</h1>", dom, re.S)
    assert h1 and title in html.unescape(re.sub(r"<[^>]+>", "", h1.group(1))), (url, h1)
    assert marker in dom, f"{url}: {marker} missing from the rendered page"
    # the theme's JavaScript ran: its bundle marks <html> (the built file does not have it)
    assert "js-focus-visible" not in (SITE / path).read_text()
    assert re.search(r"<html[^>]*js-focus-visible", dom), f"{url}: the theme's script did not run"

    artifacts = pathlib.Path(os.environ.get("ARTIFACTS") or tmp_path)
    artifacts.mkdir(parents=True, exist_ok=True)
    shot = artifacts / f"docs-{name}.png"
    if shot.exists():
        shot.unlink()
    res = _run(chromium, tmp_path / f"profile-{name}-shot", url, "--virtual-time-budget=10000",
               f"--screenshot={shot}", "--window-size=1280,1600")
    assert res.returncode == 0, res.stderr[-2000:]
    assert _console_lines(res.stderr) == [], f"{url}: console output"
    assert shot.exists() and shot.stat().st_size > 10_000
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
