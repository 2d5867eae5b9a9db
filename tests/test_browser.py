"""The built HTML book in headless Chromium, as a reader sees it.

Every page: no console errors, no request outside the book, every formula typeset by
the book's own MathJax, nothing scrolling sideways at 1280 px (code included) or at
390 px (a phone), and static sliders that move by keyboard.

Builds the book first (cheap when the execution cache is warm), serves it on
127.0.0.1, and keeps screenshots (every slider, a formula-heavy page) and the count
of typeset formulas per page in test-artifacts/.
"""

import functools
import glob
import http.server
import json
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
FORMULA_PAGE = "chapters/02_gradient_descent.html"


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


# Counts math nodes and the ones MathJax replaced; finds TeX left in the visible text.
MATH_JS = r"""() => {
  const nodes = [...document.querySelectorAll('span.math, div.math')];
  const typeset = nodes.filter(n => n.querySelector('mjx-container'));
  const article = document.querySelector('article') || document.body;
  const copy = article.cloneNode(true);
  copy.querySelectorAll('pre, code, mjx-container, script, style').forEach(e => e.remove());
  const text = copy.textContent;
  const raw = ['\\(', '\\[', '$$'].filter(t => text.includes(t));
  const i = Math.max(text.indexOf('\\('), text.indexOf('\\['), text.indexOf('$$'));
  return {nodes: nodes.length, typeset: typeset.length, raw: raw,
          context: i >= 0 ? text.slice(Math.max(0, i - 40), i + 40) : ''};
}"""

# Elements wider than their box: the page itself, and every code block (chapter cells,
# their outputs, docstring examples in the API reference).
OVERFLOW_JS = """(withCode) => {
  const doc = document.documentElement;
  const wide = [];
  if (doc.scrollWidth > doc.clientWidth + 1) wide.push(`page ${doc.scrollWidth}px > ${doc.clientWidth}px`);
  if (withCode) {
    document.querySelectorAll('article pre').forEach(p => {
      if (p.scrollWidth > p.clientWidth + 1)
        wide.push(`code block ${p.scrollWidth}px > ${p.clientWidth}px: ${p.textContent.trim().slice(0, 50)}`);
    });
  }
  return wide;
}"""


def _typeset(page):
    """Wait for MathJax (when the page loads it) and return the math counts."""
    if page.locator("span.math, div.math").count():
        page.wait_for_function("() => window.MathJax && MathJax.startup && MathJax.startup.promise",
                               timeout=30000)
        page.evaluate("() => MathJax.startup.promise")
    return page.evaluate(MATH_JS)


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
    math_counts = {}
    for page_path in pages:
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        errors = []
        page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
        page.on("pageerror", lambda e: errors.append(str(e)))
        outside = []
        page.on("response", lambda r: errors.append(f"{r.status} {r.url}") if r.status >= 400 else None)
        page.on("request", lambda r: outside.append(r.url) if not r.url.startswith((book_url, "data:")) else None)
        # networkidle: late requests (the index.html redirect, fonts) report here, not after the sliders.
        page.goto(f"{book_url}/{page_path}", wait_until="networkidle")
        assert errors == [], f"{page_path}: console errors {errors}"
        math = _typeset(page)
        math_counts[page_path] = math["typeset"]
        assert math["typeset"] == math["nodes"], f"{page_path}: {math['nodes'] - math['typeset']} " \
            f"of {math['nodes']} formulas not typeset"
        assert math["raw"] == [], f"{page_path}: raw TeX {math['raw']} in the text: ...{math['context']}..."
        wide = page.evaluate(OVERFLOW_JS, True)
        assert wide == [], f"{page_path} at 1280 px: scrolls sideways: {wide[:3]}"
        if page_path == FORMULA_PAGE:
            page.locator("div.math").first.scroll_into_view_if_needed()
            page.screenshot(path=os.path.join(ARTIFACTS, "formulas-" + page_path.replace("/", "_") + ".png"))
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
    assert math_counts[FORMULA_PAGE] >= 20, math_counts
    with open(os.path.join(ARTIFACTS, "typeset-formulas.json"), "w") as f:
        json.dump(math_counts, f, indent=1, sort_keys=True)


def test_every_page_fits_a_phone(book_url, browser):
    # At 390 px code blocks may scroll inside their own box; the page itself must not.
    os.makedirs(ARTIFACTS, exist_ok=True)
    for stale in glob.glob(os.path.join(ARTIFACTS, "too-wide-*.png")):
        os.remove(stale)
    wide_pages = {}
    for page_path in sorted(_pages()):
        page = browser.new_page(viewport={"width": 390, "height": 844})
        page.goto(f"{book_url}/{page_path}", wait_until="networkidle")
        _typeset(page)  # typeset formulas have their final width
        wide = page.evaluate(OVERFLOW_JS, False)
        if wide:
            wide_pages[page_path] = wide
            page.screenshot(path=os.path.join(ARTIFACTS, "too-wide-" + page_path.replace("/", "_") + ".png"))
        page.close()
    assert wide_pages == {}, wide_pages


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


def test_api_reference_documents_each_object_once_and_only_documented_members(book_url):
    # Re-exports (GradStats in both backends, LRRangeResult) and inherited or bare
    # members (a Keras optimizer's build, apply...) must not appear as entries.
    import importlib
    import re

    html = urllib.request.urlopen(f"{book_url}/appendix/api.html").read().decode()
    ids = re.findall(r'<dt class="sig sig-object py" id="(gradtools[\w.]*)"', html)
    assert len(ids) > 100
    seen = {}
    for target in ids:
        module, _, name = target.rpartition(".")
        while module not in sys.modules:
            try:
                importlib.import_module(module)
            except ImportError:
                module, _, outer = module.rpartition(".")
                name = f"{outer}.{name}"
                continue
        obj = sys.modules[module]
        for part in name.split("."):
            obj = getattr(obj, part, None)  # None: an instance attribute
        if isinstance(obj, type) or callable(obj):
            assert id(obj) not in seen, f"{target} documents the same object as {seen[id(obj)]}"
            seen[id(obj)] = target
    entries = html.split('<dt class="sig sig-object py" id="')[1:]
    empty = [e.split('"')[0] for e in entries if re.search(r"</dt>\s*<dd>\s*</dd>", e.split("<dt")[0])]
    assert not empty, f"members without a docstring are listed: {empty[:5]}"
