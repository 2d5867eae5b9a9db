"""Fail early, naming the file, if a chapter is not a valid notebook or is missing its outputs.

Usage: python tools/check_notebooks.py [paths...]  (default: chapters/*.ipynb)
"""

from __future__ import annotations

import glob
import sys

import nbformat


def check(path: str) -> list[str]:
    try:
        nb = nbformat.read(path, as_version=4)
    except Exception as exc:  # JSON errors, wrong schema version, ...
        return [f"{path}: not a readable notebook: {type(exc).__name__}: {exc}"]
    problems = []
    try:
        nbformat.validate(nb)
    except nbformat.ValidationError as exc:
        problems.append(f"{path}: invalid notebook: {exc.message}")
    code = [c for c in nb.cells if c.cell_type == "code"]
    if code and not any(c.get("outputs") for c in code):
        problems.append(f"{path}: no stored outputs, so nbval would check nothing; execute and save it")
    for i, cell in enumerate(code):
        tags = cell.get("metadata", {}).get("tags", [])
        for out in cell.get("outputs", []):
            if out.get("output_type") == "error" and "raises-exception" not in tags:
                problems.append(f"{path}: code cell {i} stores an error ({out.get('ename')}: {out.get('evalue')})")
            if out.get("output_type") == "stream" and out.get("name") == "stderr":
                problems.append(f"{path}: code cell {i} stores stderr output (log noise): {out.get('text', '')[:120]!r}")
    return problems


def main(argv: list[str]) -> int:
    paths = argv or sorted(glob.glob("chapters/**/*.ipynb", recursive=True))
    problems = [p for path in paths for p in check(path)]
    for p in problems:
        print(p, file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
