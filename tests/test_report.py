import pytest

from gradtools.report import claims_table


def test_claims_table_renders_markdown_and_text():
    t = claims_table([("a | b", "exp\n  long", "1.0", "**holds**"), ("c", "d", "2", "fails")])
    md = t._repr_markdown_().splitlines()
    assert md[0] == "| claim | experiment | measured | verdict |"
    assert md[1] == "|---|---|---|---|"
    assert md[2] == "| a \\| b | exp long | 1.0 | **holds** |"
    assert len(md) == 4
    assert str(t).splitlines()[1] == "claim: c | experiment: d | measured: 2 | verdict: fails"


@pytest.mark.parametrize("rows, match", [([], "at least one"), ([("a", "b", "c")], r"rows\[0\] must have 4")])
def test_claims_table_rejects_bad_rows(rows, match):
    with pytest.raises(ValueError, match=match):
        claims_table(rows)


def test_median_ratio_alternates_and_validates():
    import time

    from gradtools.timing import median_ratio

    calls = []
    ratio, base, cand = median_ratio(lambda: calls.append("b"), lambda: (calls.append("c"), time.sleep(0.002)),
                                     rounds=4)
    assert calls[:2] == ["b", "c"] and len(calls) == 10      # one warm-up each, then 4 rounds
    assert calls[2:4] == ["c", "b"] and calls[4:6] == ["b", "c"]  # the order alternates
    assert ratio > 1 and cand >= 0.002 > base
    with pytest.raises(ValueError, match="rounds must be a positive integer, got 0"):
        median_ratio(lambda: None, lambda: None, rounds=0)
