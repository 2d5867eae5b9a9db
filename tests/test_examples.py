"""Every code example a user can copy runs: the docstrings' (doctest) and the README's.

The README's Python blocks each run in a fresh interpreter, without the book's
``setup()``, exactly as a reader pastes them into their own script: that is how an
import-time side effect would show.
"""

import doctest
import importlib
import os
import pkgutil
import re
import subprocess
import sys

import pytest

import gradtools

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODULES = sorted(m.name for m in pkgutil.walk_packages(gradtools.__path__, "gradtools."))
README_BLOCKS = re.findall(r"```python\n(.*?)```", open(os.path.join(ROOT, "README.md")).read(), re.S)


def _examples(module):
    finder = doctest.DocTestFinder(exclude_empty=True)
    return [t for t in finder.find(module, module.__name__) if t.examples]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples_run(name):
    module = importlib.import_module(name)
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    for test in _examples(module):
        report = []
        failed = runner.run(test, out=report.append).failed
        assert failed == 0, f"{test.name}: an example fails:\n" + "".join(report)[-3000:]


def test_readme_has_python_examples():
    assert len(README_BLOCKS) >= 2


@pytest.mark.parametrize("index", range(len(README_BLOCKS)))
def test_readme_examples_run_in_a_fresh_interpreter(index, tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("TF_")}
    env["TF_CPP_MIN_LOG_LEVEL"] = "3"
    proc = subprocess.run([sys.executable, "-c", README_BLOCKS[index]], capture_output=True, text=True, env=env,
                          timeout=300, cwd=tmp_path)  # they write checkpoints
    assert proc.returncode == 0, f"README example {index} fails:\n{proc.stderr[-3000:]}"
