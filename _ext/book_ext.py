"""Small fixes to the Jupyter Book 1 theme stack, and MathJax served by the book itself.

* sphinx-thebe 0.3.1 registers its inline configuration script twice under
  Sphinx 7.4 ("Identifier 'THEBE_JS_URL' has already been declared"): keep the
  first copy of every script on a page. The page's list is edited in place:
  ``sphinx.ext.mathjax`` appends its script to that same list later in the
  event, and a new list would lose it (the book once shipped no typeset formula).
* sphinx-book-theme 1.3 with pydata-sphinx-theme 0.17 leaves ``data-mode``
  empty ("Got invalid theme mode"): give the theme its default mode.
* MathJax 3 comes from the ``sphinx-mathjax-offline`` package on PyPI, not a CDN:
  the book reads with no network. ``mathjax_path`` in ``_config.yml`` points at
  ``_static/mathjax/tex-chtml.js``; the files it loads (fonts, TeX extensions
  loaded on demand, the accessibility menu) are copied next to it.
"""

import importlib.util
import pathlib
import shutil

from sphinx.errors import ExtensionError

MATHJAX_PACKAGE = "sphinx-mathjax-offline"
# What tex-chtml.js loads at run time; the other combined builds are left out.
_MATHJAX_KEEP = ("tex-chtml.js", "a11y", "adaptors", "input/tex", "output/chtml", "sre", "ui")


def _dedupe_scripts(app, pagename, templatename, context, doctree):
    seen, unique = set(), []
    scripts = context.get("script_files")
    for js in scripts or []:
        # The copies differ only in filename None versus "" (both mean an inline script).
        key = (getattr(js, "filename", js) or "", (getattr(js, "attributes", None) or {}).get("body"))
        if key in seen:
            continue
        seen.add(key)
        unique.append(js)
    if scripts is not None:
        scripts[:] = unique  # in place: later handlers (MathJax) append to this list
    if not context.get("default_mode"):
        context["default_mode"] = "auto"


def mathjax_source() -> pathlib.Path:
    """The directory of the MathJax 3 distribution installed from PyPI."""
    spec = importlib.util.find_spec(MATHJAX_PACKAGE)
    if spec is None or spec.origin is None:
        raise ExtensionError(f"MathJax is not installed: pip install {MATHJAX_PACKAGE} "
                             "(part of the book extra; `make book` installs it)")
    return pathlib.Path(spec.origin).parent / "static" / "mathjax"


def _check_mathjax_path(app, config):
    expected = "mathjax/tex-chtml.js"
    if config.mathjax_path != expected:
        raise ExtensionError(f"mathjax_path must be {expected!r} (served from the book), "
                             f"got {config.mathjax_path!r}")
    mathjax_source()


def _copy_mathjax(app, exception):
    if exception is not None or app.builder.format != "html":
        return
    src, dst = mathjax_source(), pathlib.Path(app.outdir) / "_static" / "mathjax"
    for part in _MATHJAX_KEEP:
        if (src / part).is_dir():
            shutil.copytree(src / part, dst / part, dirs_exist_ok=True)
        else:
            (dst / part).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src / part, dst / part)


def setup(app):
    # Sphinx emits html-page-context with emit_firstresult: a theme handler that
    # returns a value stops later handlers, so this one runs first.
    app.connect("html-page-context", _dedupe_scripts, priority=100)
    app.connect("config-inited", _check_mathjax_path)
    app.connect("build-finished", _copy_mathjax)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
