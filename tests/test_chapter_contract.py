"""What a reader sees in every chapter: short lines, hidden table sources, named exercises.

The chapter contract (README, "Adding a chapter") asks for code a reader can read
without scrolling sideways (the code column of the HTML book holds 80 characters
at 1280 px; tests/test_browser.py measures it), claims tables whose generating source stays one click
away, and exercises that do not carry book-wide numbers.
"""

import glob
import json
import os
import re

import pytest

from conftest import ROOT

CHAPTERS = sorted(glob.glob(os.path.join(ROOT, "chapters", "*.ipynb")))
MAX_LINE = 80


def _cells(path, kind="code"):
    nb = json.load(open(path))
    return [(i, c) for i, c in enumerate(nb["cells"]) if c["cell_type"] == kind]


def _name(path):
    return os.path.relpath(path, ROOT)


@pytest.mark.parametrize("path", CHAPTERS, ids=_name)
def test_code_and_printed_lines_fit_the_code_column(path):
    long = []
    for i, cell in _cells(path):
        for line in "".join(cell["source"]).splitlines():
            if len(line) > MAX_LINE:
                long.append(f"cell {i} source ({len(line)}): {line[:60]}")
        for out in cell.get("outputs", []):
            if out["output_type"] == "stream":
                for line in "".join(out["text"]).splitlines():
                    if len(line) > MAX_LINE:
                        long.append(f"cell {i} output ({len(line)}): {line[:60]}")
    assert not long, f"{_name(path)}: lines over {MAX_LINE} characters:\n" + "\n".join(long)


@pytest.mark.parametrize("path", CHAPTERS, ids=_name)
def test_claims_tables_hide_their_source(path):
    tables = 0
    for i, cell in _cells(path):
        src = "".join(cell["source"])
        assert "|---|" not in src, f"{_name(path)} cell {i}: build tables with claims_table"
        if "claims_table(" in src:
            tables += 1
            assert "hide-input" in cell["metadata"].get("tags", []), f"{_name(path)} cell {i}"
            assert any("text/markdown" in o.get("data", {}) for o in cell["outputs"]), \
                f"{_name(path)} cell {i}: the table has no stored Markdown output"
    assert tables == 1, f"{_name(path)}: expected one claims table, found {tables}"


@pytest.mark.parametrize("path", CHAPTERS, ids=_name)
def test_exercises_are_named_not_numbered_across_the_book(path):
    text = "\n".join("".join(c["source"]) for _, c in _cells(path, "markdown"))
    exercises = re.findall(r"```\{exercise\}(.*)\n((?::[^\n]*\n)*)", text)
    assert exercises, f"{_name(path)} has no exercise"
    for title, options in exercises:
        assert title.strip(), f"{_name(path)}: an exercise has no title"
        assert ":nonumber:" in options, f"{_name(path)}: exercise {title.strip()!r} is numbered"


def test_chapter0_exercise_answer_is_what_the_solution_says():
    # The solution states it: thresholds 1, 3 and 10 stay finite for 40 steps at lr 1.0,
    # and 30 stops being finite at step 6.
    from gradtools.runtime import setup

    setup(seed=0, frameworks=("torch",))
    import gradtools.torch as gt
    from gradtools.data import digits
    from gradtools.maths import divergence_step
    from gradtools.models import init_mlp

    x, y = digits(one_hot=True)
    weights = init_mlp([64] + [64] * 8 + [10], init="he", seed=0)
    steps = {c: divergence_step(gt.train_full_batch(gt.mlp(weights), x, y, lr=1.0, steps=40, clip_norm=c))
             for c in (1.0, 3.0, 10.0, 30.0)}
    assert steps == {1.0: None, 3.0: None, 10.0: None, 30.0: 6}
    text = " ".join(" ".join(c["source"]) for _, c in _cells(CHAPTERS[0], "markdown"))
    text = " ".join(text.split())
    assert "Thresholds 1, 3 and 10 stay finite for all 40 steps; at 30 the loss stops being finite at step 6" \
        in text
