"""The appendix's claims index is the chapters' claims tables, row for row (tools/claims_index.py)."""

import os
import re
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tools"))
import claims_index  # noqa: E402

PAGE = open(os.path.join(ROOT, claims_index.OUT), encoding="utf-8").read()
ROWS = [line for line in PAGE.splitlines() if line.startswith("| ") and not line.startswith("| claim |")]


def test_the_committed_index_is_up_to_date():
    assert claims_index.main(["--check"]) == 0, "run python tools/claims_index.py"


@pytest.mark.parametrize("path", claims_index.chapters())
def test_every_claim_of_every_chapter_is_in_the_index_with_its_verdict_and_link(path):
    title, rows = claims_index.claims_of(path)
    assert rows, f"{path}: an empty claims table"
    doc = "../" + path[: -len(".ipynb")]
    listed = [r for r in ROWS if r.endswith(f"<{doc}>` |")]
    assert len(listed) == len(rows), f"{path}: {len(rows)} claims in the chapter, {len(listed)} in the index"
    for row in rows:
        line = f"| {row['claim']} | {row['verdict']} | {row['measured']} | "
        assert any(r.startswith(line) for r in listed), f"{path}: missing or changed in the index: {row['claim']}"


def test_the_index_counts_and_groups_its_rows():
    total = sum(len(claims_index.claims_of(p)[1]) for p in claims_index.chapters())
    assert len(ROWS) == total
    m = re.search(r"hold (\d+) verdicts: (\d+) on claims .* and (\d+) on claims", PAGE)
    assert m and int(m.group(1)) == total == int(m.group(2)) + int(m.group(3))
    for line in ROWS:  # every row sits under its article's heading
        heading = [h for h in PAGE[:PAGE.index(line)].splitlines() if h.startswith("## ")][-1]
        article = claims_index.article_of(line[2:])
        assert (article in heading) if article != "implied" else "granted" in heading, line[:60]


def test_article_and_verdict_parsing():
    assert claims_index.article_of("002: dropout prevents explosion") == "002"
    assert claims_index.article_of("002 (implied): clipping costs nothing") == "002"
    assert claims_index.article_of("(implied by 004) k micro-batches equal a batch") == "implied"
    assert claims_index.article_of("PyTorch and Keras behave the same") == "implied"
    assert claims_index.verdict_of("**fails**: no") == "fails"
    assert claims_index.verdict_of("**holds**; and more") == "holds"
    assert claims_index.verdict_of("**holds only** with a bad init") == "conditional"
    assert claims_index.verdict_of("**holds, except** under batch norm") == "conditional"
    assert claims_index.verdict_of("**fails as stated**: x") == "fails"


def test_the_preface_and_the_toc_show_every_chapter():
    intro = open(os.path.join(ROOT, "intro.md"), encoding="utf-8").read()
    for path in claims_index.chapters():
        title, _ = claims_index.claims_of(path)
        number = title.split(".")[0]
        assert re.search(rf"^\| {number}\. ", intro, re.M), f"intro.md's chapter table lacks chapter {number}"
    assert "appendix/claims" in open(os.path.join(ROOT, "_toc.yml"), encoding="utf-8").read()
