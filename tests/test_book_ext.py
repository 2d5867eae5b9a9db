"""The book's Sphinx extension: scripts deduplicated in place, MathJax served by the book."""

import os
import sys
import types

import pytest

from conftest import ROOT

sys.path.insert(0, os.path.join(ROOT, "_ext"))
import book_ext  # noqa: E402


class Js(str):
    def __new__(cls, filename, body=None):
        s = super().__new__(cls, filename or "")
        s.filename, s.attributes = filename, ({"body": body} if body else {})
        return s


def test_dedupe_keeps_the_pages_own_list_so_later_handlers_still_add_mathjax():
    thebe = "const THEBE_JS_URL = 1"
    scripts = [Js("a.js"), Js(None, thebe), Js("", thebe), Js("b.js")]
    context = {"script_files": scripts}
    book_ext._dedupe_scripts(None, "p", "page.html", context, None)
    assert context["script_files"] is scripts          # edited in place, not replaced
    assert [s.filename for s in scripts] == ["a.js", None, "b.js"]
    scripts.append(Js("mathjax/tex-chtml.js"))        # what sphinx.ext.mathjax does afterwards
    assert "mathjax/tex-chtml.js" in context["script_files"]
    assert context["default_mode"] == "auto"


def test_mathjax_path_must_point_at_the_books_copy():
    with pytest.raises(Exception, match=r"mathjax_path must be 'mathjax/tex-chtml.js'.*cdn"):
        book_ext._check_mathjax_path(None, types.SimpleNamespace(mathjax_path="https://cdn/x.js"))
    book_ext._check_mathjax_path(None, types.SimpleNamespace(mathjax_path="mathjax/tex-chtml.js"))


def test_mathjax_copy_holds_the_files_tex_chtml_loads(tmp_path):
    app = types.SimpleNamespace(outdir=str(tmp_path), builder=types.SimpleNamespace(format="html"))
    book_ext._copy_mathjax(app, None)
    static = tmp_path / "_static" / "mathjax"
    assert (static / "tex-chtml.js").stat().st_size > 100_000
    assert list((static / "output" / "chtml" / "fonts" / "woff-v2").glob("*.woff"))
    assert (static / "input" / "tex" / "extensions").is_dir()
    assert not (static / "tex-svg-full.js").exists()   # builds the book does not load stay out
