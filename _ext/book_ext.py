"""Small fixes to the Jupyter Book 1 theme stack, so pages load without console errors.

* sphinx-thebe 0.3.1 registers its inline configuration script twice under
  Sphinx 7.4 ("Identifier 'THEBE_JS_URL' has already been declared"): keep the
  first copy of every script on a page.
* sphinx-book-theme 1.3 with pydata-sphinx-theme 0.17 leaves ``data-mode``
  empty ("Got invalid theme mode"): give the theme its default mode.
"""


def _dedupe_scripts(app, pagename, templatename, context, doctree):
    seen, unique = set(), []
    for js in context.get("script_files", []):
        # The copies differ only in filename None versus "" (both mean an inline script).
        key = (getattr(js, "filename", js) or "", (getattr(js, "attributes", None) or {}).get("body"))
        if key in seen:
            continue
        seen.add(key)
        unique.append(js)
    context["script_files"] = unique
    if not context.get("default_mode"):
        context["default_mode"] = "auto"


def setup(app):
    # Sphinx emits html-page-context with emit_firstresult: a theme handler that
    # returns a value stops later handlers, so this one runs first.
    app.connect("html-page-context", _dedupe_scripts, priority=100)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
