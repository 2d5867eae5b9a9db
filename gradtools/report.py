"""Tables a chapter computes from its measurements: the "claims checked" table.

A chapter ends with one row per source-article claim: the claim, the experiment,
the measured figure and the verdict. Building the table from a list keeps each
row on short source lines (no 300-character f-string) and renders it as a
Markdown table in JupyterLab and in the HTML book, with a plain-text form that
nbval compares.

:func:`outcome` runs a snippet and says how it ended, in one line, for a
chapter that shows what a source article's code really does.

Example:
    >>> from gradtools.report import claims_table, outcome
    >>> outcome(lambda: int("ten"))
    "ValueError: invalid literal for int() with base 10: 'ten'"
    >>> t = claims_table([("GD is stable", "bisection", "2/λmax", "fails")])
    >>> print(t)
    claim: GD is stable | experiment: bisection | measured: 2/λmax | verdict: fails
"""

from __future__ import annotations

__all__ = ["ClaimsTable", "claims_table", "outcome"]

COLUMNS = ("claim", "experiment", "measured", "verdict")


def _cell(text: str) -> str:
    # A "|" would end the Markdown cell early, a newline the row.
    return " ".join(str(text).split()).replace("|", "\\|")


class ClaimsTable:
    """A Markdown table of claims; displays as a table, prints one line per row."""

    def __init__(self, rows, columns=COLUMNS):
        self.columns = tuple(columns)
        if not self.columns or not all(isinstance(c, str) and c for c in self.columns):
            raise ValueError(f"columns must be non-empty strings, got {columns!r}")
        self.rows = []
        for k, row in enumerate(rows):
            row = tuple(row)
            if len(row) != len(self.columns):
                raise ValueError(f"rows[{k}] must have {len(self.columns)} entries "
                                 f"({', '.join(self.columns)}), got {len(row)}: {row!r}")
            self.rows.append(tuple(_cell(v) for v in row))
        if not self.rows:
            raise ValueError("rows must hold at least one claim, got none")

    def markdown(self) -> str:
        lines = ["| " + " | ".join(self.columns) + " |",
                 "|" + "---|" * len(self.columns)]
        lines += ["| " + " | ".join(r) + " |" for r in self.rows]
        return "\n".join(lines)

    def _repr_markdown_(self) -> str:
        return self.markdown()

    def __str__(self) -> str:
        return "\n".join(" | ".join(f"{c}: {v}" for c, v in zip(self.columns, r))
                         for r in self.rows)

    __repr__ = __str__


def claims_table(rows, columns=COLUMNS) -> ClaimsTable:
    """A claims-checked table from ``(claim, experiment, measured, verdict)`` rows.

    Args:
        rows: iterable of tuples, one per claim, each with one entry per column.
            Entries may hold Markdown (bold verdicts, ``{cite}`` roles); runs of
            whitespace are collapsed and ``|`` is escaped.
        columns: the column headings (default: claim, experiment, measured, verdict).

    Returns:
        A :class:`ClaimsTable`, which Jupyter and the book render as a table.
    """
    return ClaimsTable(rows, columns)


def outcome(fn, width: int = 76) -> str:
    """Call ``fn()`` and say how it ended: ``"ran"``, or the exception's type and first line.

    For showing which error a program raises without a traceback in the
    book (no paths, no noise). The line is cut to ``width`` characters.
    """
    if not callable(fn):
        raise TypeError(f"fn must be callable, got {type(fn).__name__}")
    from gradtools import _checks

    width = _checks.integer("width", width, minimum=8)
    try:
        fn()
    except Exception as exc:  # the point is to report any error
        first = (str(exc).splitlines() or [""])[0]
        text = f"{type(exc).__name__}: {first}" if first else type(exc).__name__
        return text if len(text) <= width else text[: width - 3] + "..."
    return "ran"
