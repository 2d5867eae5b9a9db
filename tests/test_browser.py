"""The built HTML book in headless Chromium: no console errors, static sliders move by keyboard.

Builds the book first (cheap when the execution cache is warm), serves it on
127.0.0.1, and keeps a screenshot of every page with a slider in test-artifacts/.
"""

import functools
import http.server
import os
import shutil
import subprocess
import sys
import threading
import urllib.request

import pytest

from conftest import ROOT

pytestmark = pytest.mark.browser

CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--no-first-run", "--disable-quic", "--disable-sync"]
ARTIFACTS = os.path.join(ROOT, "test-artifacts")
FAILED_REQUESTS = []


@pytest.fixture(scope="module")
def book_url():
    result = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "build_book.py")], capture_output=True,
                            text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def log_request(self, code="-", size="-"):
            # The server sees requests Playwright does not report (the browser's own favicon fetch).
            if isinstance(code, int) and code >= 400:
                FAILED_REQUESTS.append(f"{code} {self.path}")

    handler = functools.partial(Quiet, directory=os.path.join(ROOT, "_build", "html"))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


@pytest.fixture(scope="module")
def browser():
    chromium = shutil.which("chromium")
    if chromium is None:
        pytest.fail("chromium is not on PATH: run `python tools/ensure_chromium.py` (make test does)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)
        yield b
        b.close()


def _pages():
    html = os.path.join(ROOT, "_build", "html")
    for dirpath, _, files in os.walk(html):
        if "_static" in dirpath or "_sources" in dirpath:
            continue
        for f in files:
            if f.endswith(".html") and f not in {"search.html", "genindex.html", "py-modindex.html"}:
                yield os.path.relpath(os.path.join(dirpath, f), html)


def test_every_page_loads_without_console_errors_and_sliders_move(book_url, browser):
    os.makedirs(ARTIFACTS, exist_ok=True)
    pages = sorted(_pages())
    assert "chapters/00_at_a_glance.html" in pages
    sliders_seen = 0
    for page_path in pages:
        page = browser.new_page(viewport={"width": 1200, "height": 900})
        errors = []
        page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
        page.on("pageerror", lambda e: errors.append(str(e)))
        outside = []
        page.on("response", lambda r: errors.append(f"{r.status} {r.url}") if r.status >= 400 else None)
        page.on("request", lambda r: outside.append(r.url) if not r.url.startswith((book_url, "data:")) else None)
        # networkidle: late requests (the index.html redirect, fonts) report here, not after the sliders.
        page.goto(f"{book_url}/{page_path}", wait_until="networkidle")
        assert errors == [], f"{page_path}: console errors {errors}"
        for k, root in enumerate(page.locator(".gradtools-slider").all()):
            sliders_seen += 1
            root.scroll_into_view_if_needed()
            visible = root.locator(".gts-frame:not([hidden])")
            assert visible.count() == 1
            before_html = visible.inner_html()
            ranges = root.locator("input[type=range]")
            for r in range(ranges.count()):
                rng = ranges.nth(r)
                value = rng.input_value()
                rng.focus()
                page.keyboard.press("ArrowRight" if int(value) < int(rng.get_attribute("max")) else "ArrowLeft")
                assert rng.input_value() != value, f"{page_path}: slider {k} knob {r} did not move"
                after = root.locator(".gts-frame:not([hidden])")
                assert after.count() == 1
                assert after.inner_html() != before_html, f"{page_path}: slider {k} figure did not change"
                before_html = after.inner_html()
            root.screenshot(path=os.path.join(ARTIFACTS, f"{page_path.replace('/', '_')}-slider{k}.png"))
        page.close()
        assert errors == [], f"{page_path}: console errors after moving sliders {errors}"
        assert outside == [], f"{page_path}: requests outside the book {outside[:5]}"
        assert FAILED_REQUESTS == [], f"{page_path}: the server answered {FAILED_REQUESTS}"
    assert sliders_seen >= 1


def test_root_redirects_to_the_preface_and_serves_a_favicon(book_url, browser):
    # Chromium asks for /favicon.ico on pages without <link rel="icon"> (the redirect page);
    # Playwright does not report that request, so check it over HTTP.
    with urllib.request.urlopen(f"{book_url}/favicon.ico") as r:
        assert r.status == 200 and len(r.read()) > 100
    page = browser.new_page()
    page.goto(f"{book_url}/", wait_until="networkidle")
    assert page.url.endswith("/intro.html")
    assert "Taming Exploding Gradients" in page.title()
    page.close()
