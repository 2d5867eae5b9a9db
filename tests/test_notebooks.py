"""nbval really compares, and a broken chapter stops the book build with a clear error."""

import json
import os
import subprocess
import sys
import textwrap

import nbformat
import pytest

from conftest import ROOT

CHAPTER = os.path.join(ROOT, "chapters", "00_at_a_glance.ipynb")
pytestmark = pytest.mark.slow


def _nbval(path):
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--nbval", "--nbval-current-env",
         "--nbval-sanitize-with", os.path.join(ROOT, "tests", "nbval_sanitize.cfg"), str(path)],
        capture_output=True, text=True, cwd=os.path.dirname(path),
    )


def test_nbval_fails_when_a_checked_output_changes(tmp_path):
    nb = json.load(open(CHAPTER))
    changed = 0
    for cell in nb["cells"]:
        for out in cell.get("outputs", []):
            text = "".join(out.get("text", []))
            if "PyTorch diverged at step" in text:
                out["text"] = text.replace("PyTorch diverged at step 3", "PyTorch diverged at step 4")
                changed += 1
    assert changed == 1
    copy = tmp_path / "tampered.ipynb"
    copy.write_text(json.dumps(nb))
    result = _nbval(copy)
    assert result.returncode != 0, result.stdout[-2000:]
    assert "1 failed" in result.stdout and "diverged at step 4" in result.stdout


def test_check_notebooks_names_the_file(tmp_path):
    import check_notebooks

    broken = tmp_path / "broken.ipynb"
    broken.write_text('{"cells": [')
    assert any("broken.ipynb: not a readable notebook" in p for p in check_notebooks.check(str(broken)))
    empty = tmp_path / "unexecuted.ipynb"
    nbformat.write(nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell("1 + 1")]), str(empty))
    assert any("no stored outputs" in p for p in check_notebooks.check(str(empty)))


def _mini_book(root, notebook_cells):
    os.makedirs(root / "chapters")
    (root / "_config.yml").write_text(textwrap.dedent("""\
        title: mini
        only_build_toc_files: true
        execute:
          execute_notebooks: force
          allow_errors: false
          stderr_output: error
    """))
    (root / "_toc.yml").write_text("format: jb-book\nroot: intro\nchapters:\n  - file: chapters/bad\n")
    (root / "intro.md").write_text("# Mini book\n")
    cells = [nbformat.v4.new_markdown_cell("# Bad chapter")]
    for src in notebook_cells:
        cell = nbformat.v4.new_code_cell(src)
        cell.outputs = [nbformat.v4.new_output("stream", name="stdout", text="stale\n")]
        cells.append(cell)
    nb = nbformat.v4.new_notebook(cells=cells, metadata={"kernelspec": {"name": "python3", "display_name": "Python 3",
                                                                        "language": "python"}})
    nbformat.write(nb, str(root / "chapters" / "bad.ipynb"))


def test_failing_chapter_stops_the_build_and_names_the_cell(tmp_path):
    _mini_book(tmp_path, ["x = 1", "def broken():\n    return 1 / 0\nbroken()"])
    result = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "build_book.py"), "--root", str(tmp_path)],
                            capture_output=True, text=True)
    assert result.returncode == 1
    assert "failing notebook: chapters/bad.err.log" in result.stderr
    assert "ZeroDivisionError" in result.stderr and "return 1 / 0" in result.stderr  # the cell and its traceback
    assert "book NOT built" in result.stderr
    assert not (tmp_path / "_build" / "html").exists()  # nothing that looks like a finished book


def test_invalid_notebook_stops_the_build_naming_the_file(tmp_path):
    _mini_book(tmp_path, ["x = 1"])
    (tmp_path / "chapters" / "bad.ipynb").write_text("{ not json")
    result = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "build_book.py"), "--root", str(tmp_path)],
                            capture_output=True, text=True)
    assert result.returncode == 1
    assert "chapters/bad.ipynb: not a readable notebook" in result.stderr
    assert not (tmp_path / "_build").exists()
