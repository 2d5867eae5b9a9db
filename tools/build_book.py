"""Build the HTML book: execute every chapter, warnings as errors, atomic output.

The book is built into _build/staging; only a build that succeeds replaces
_build/html, so a failed build never leaves a partial book that looks complete.
Executed notebooks are cached in _build/.jupyter_cache: a rebuild with nothing
changed re-executes nothing. Sphinx itself always starts from a fresh
environment (--all): an incremental Sphinx build only reports the warnings of
the files it re-reads, and -W must see all of them. On failure the executing
cell's traceback (from myst-nb's reports) is printed with the notebook's path.
"""

from __future__ import annotations

import argparse
import glob
import os
import shutil
import subprocess
import sys
import time

TOOLS = os.path.dirname(os.path.abspath(__file__))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", default=os.path.dirname(TOOLS), help="the book's folder (default: the repository)")
    ROOT = os.path.abspath(parser.parse_args(argv).root)
    STAGING = os.path.join(ROOT, "_build", "staging")
    FINAL = os.path.join(ROOT, "_build", "html")
    start = time.time()
    os.chdir(ROOT)
    sys.path.insert(0, TOOLS)
    import check_notebooks
    import claims_index

    problems = [p for path in sorted(glob.glob(os.path.join(ROOT, "chapters", "**", "*.ipynb"), recursive=True))
                for p in check_notebooks.check(os.path.relpath(path, ROOT))]
    if problems:
        print("\n".join(problems), file=sys.stderr)
        print("book NOT built: fix the notebooks above", file=sys.stderr)
        return 1
    claims_index.main(["--root", ROOT])  # the appendix's claims index, from the chapters' claims tables
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", TF_ENABLE_ONEDNN_OPTS="0", PYTHONWARNINGS="ignore")
    # Sphinx never deletes outputs of pages that left the book: start the HTML afresh.
    shutil.rmtree(os.path.join(STAGING, "_build", "html"), ignore_errors=True)
    jb = os.path.join(os.path.dirname(sys.executable), "jupyter-book")
    cmd = [jb, "build", ROOT, "--path-output", STAGING, "-W", "--keep-going", "--all"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, text=True, capture_output=True)
    staged = os.path.join(STAGING, "_build", "html")
    if proc.returncode != 0 or not os.path.exists(os.path.join(staged, "index.html")):
        sys.stdout.write(proc.stdout[-6000:])
        sys.stderr.write(proc.stderr[-6000:])
        for log in sorted(glob.glob(os.path.join(staged, "reports", "**", "*.err.log"), recursive=True)):
            print(f"\n===== failing notebook: {os.path.relpath(log, os.path.join(staged, 'reports'))} =====",
                  file=sys.stderr)
            with open(log, encoding="utf-8") as fh:
                print(fh.read()[-8000:], file=sys.stderr)
        print(f"\nbook NOT built (exit {proc.returncode}); _build/html was left as it was", file=sys.stderr)
        return 1
    tmp = FINAL + ".new"
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(staged, tmp)
    old = FINAL + ".old"
    shutil.rmtree(old, ignore_errors=True)
    if os.path.exists(FINAL):
        os.rename(FINAL, old)
    os.rename(tmp, FINAL)
    shutil.rmtree(old, ignore_errors=True)
    print(f"book built in {time.time() - start:.1f} s: {os.path.relpath(FINAL, ROOT)}/index.html")
    return 0


if __name__ == "__main__":
    sys.exit(main())
