"""Tables a chapter computes from its measurements: the "claims checked" table.

A chapter ends with one row per source-article claim: the claim, the experiment,
the measured figure and the verdict. Building the table from a list keeps each
row on short source lines (no 300-character f-string) and renders it as a
Markdown table in JupyterLab and in the HTML book, with a plain-text form that
nbval compares.

Example:
    >>> from gradtools.report import claims_table
    >>> t = claims_table([("GD is stable", "bisection", "2/λmax", "fails")])
    >>> print(t)
    claim: GD is stable | experiment: bisection | measured: 2/λmax | verdict: fails
"""

from __future__ import annotations

__all__ = ["ClaimsTable", "claims_table"]

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
