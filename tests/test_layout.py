"""The repository's contract: layout, light import, one version, consistent environments."""

import glob
import json
import os
import re
import subprocess
import sys
import tomllib

import yaml

from conftest import ROOT


def test_layout():
    for path in ["_config.yml", "_toc.yml", "README.md", "chapters", "gradtools", "tests", "environment.yml",
                 "pyproject.toml", "Makefile", ".ci/run", "references.bib", "intro.md"]:
        assert os.path.exists(os.path.join(ROOT, path)), path


def test_import_is_light():
    code = ("import sys, time; t = time.perf_counter(); import gradtools, gradtools.policies, gradtools.maths, "
            "gradtools.data, gradtools.models; print(time.perf_counter() - t); "
            "print(sorted(m for m in ('torch', 'tensorflow', 'keras', 'matplotlib', 'sklearn') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split("\n")
    assert out[1] == "[]", out


def test_version_in_one_place():
    pyproject = tomllib.load(open(os.path.join(ROOT, "pyproject.toml"), "rb"))
    assert "version" not in pyproject["project"] and "version" in pyproject["project"]["dynamic"]
    import gradtools

    assert re.fullmatch(r"\d+\.\d+\.\d+", gradtools.__version__)
    from importlib.metadata import version

    assert version("gradtools") == gradtools.__version__


def _requirement_names(reqs):
    return {re.split(r"[<>=!~\[ ;@]", r, maxsplit=1)[0].lower(): r.replace(" ", "") for r in reqs}


def test_environment_yml_matches_pyproject():
    pyproject = tomllib.load(open(os.path.join(ROOT, "pyproject.toml"), "rb"))
    env = yaml.safe_load(open(os.path.join(ROOT, "environment.yml")))
    deps = env["dependencies"]
    assert "python=3.11" in deps
    pip_section = next(d["pip"] for d in deps if isinstance(d, dict))
    extras = pyproject["project"]["optional-dependencies"]
    # The pip section installs the repository itself with every extra...
    local = [p for p in pip_section if p.startswith("-e .")]
    assert local and set(re.search(r"\[(.*)\]", local[0]).group(1).split(",")) == set(extras)
    # ...and pins the same packages with the same bounds as pyproject.toml.
    expected = _requirement_names(pyproject["project"]["dependencies"] + [r for rs in extras.values() for r in rs])
    listed = _requirement_names([p for p in pip_section if not p.startswith("-")])
    assert listed == expected
    # ...at the versions of the lock, as `make install` does.
    assert "-c requirements/lock.txt" in pip_section


def _lock():
    pins = {}
    for line in open(os.path.join(ROOT, "requirements", "lock.txt")):
        line = line.split("#")[0].strip()
        if line:
            name, _, version = line.partition("==")
            assert version and "+" not in version, f"lock line {line!r} is not name==public-version"
            pins[re.sub(r"[-_.]+", "-", name).lower()] = version
    return pins


def test_lock_pins_every_dependency_within_the_ranges_of_pyproject():
    from packaging.requirements import Requirement

    pyproject = tomllib.load(open(os.path.join(ROOT, "pyproject.toml"), "rb"))
    reqs = pyproject["project"]["dependencies"] + [
        r for rs in pyproject["project"]["optional-dependencies"].values() for r in rs]
    pins = _lock()
    assert "gradtools" not in pins
    for text in reqs:
        req = Requirement(text)
        name = re.sub(r"[-_.]+", "-", req.name).lower()
        assert name in pins, f"{req.name} is a dependency but not in requirements/lock.txt"
        assert req.specifier.contains(pins[name], prereleases=True), \
            f"lock pins {name}=={pins[name]}, outside pyproject.toml's {text!r}"
    # The Makefile installs PyTorch at the locked version and everything through the lock.
    makefile = open(os.path.join(ROOT, "Makefile")).read()
    assert f"TORCH_SPEC ?= torch=={pins['torch']}" in makefile
    assert "LOCK       ?= requirements/lock.txt" in makefile and "$(CONSTRAINT) -e" in makefile


def test_readme_names_the_versions_the_outputs_were_computed_with():
    readme = open(os.path.join(ROOT, "README.md")).read()
    pins = _lock()
    for name, shown in [("torch", "PyTorch"), ("tensorflow", "TensorFlow"), ("keras", "Keras"),
                        ("numpy", "NumPy"), ("scikit-learn", "scikit-learn")]:
        assert f"{shown} {pins[name]}" in readme, f"README does not say {shown} {pins[name]}"


def test_toc_lists_every_chapter():
    toc = yaml.safe_load(open(os.path.join(ROOT, "_toc.yml")))
    files = {c["file"] for part in toc["parts"] for c in part["chapters"]}
    chapters = {os.path.splitext(os.path.relpath(p, ROOT))[0] for p in glob.glob(os.path.join(ROOT, "chapters", "*.ipynb"))}
    assert chapters and chapters <= files


def test_every_chapter_installs_gradtools_from_the_configured_repository():
    config = yaml.safe_load(open(os.path.join(ROOT, "_config.yml")))
    url = config["repository"]["url"]
    for path in glob.glob(os.path.join(ROOT, "chapters", "*.ipynb")):
        nb = json.load(open(path))
        first = next(c for c in nb["cells"] if c["cell_type"] == "code")
        src = "".join(first["source"])
        assert "import gradtools" in src and "except ImportError" in src, path
        assert f"git+{url}" in src, f"{path}: Colab install cell does not use {url}"
        setup = [c for c in nb["cells"] if c["cell_type"] == "code"][1]
        assert "setup(" in "".join(setup["source"]), f"{path}: second code cell must call gradtools.runtime.setup"


def test_bibliography_has_the_required_papers():
    bib = open(os.path.join(ROOT, "references.bib")).read()
    for key in ["pascanu2013", "glorot2010", "he2015", "kingma2015", "smith2017", "goyal2017", "zhang2020",
                "cohen2021", "brock2021", "seetharaman2020", "kumar2025zclip"]:
        assert key in bib, key


def test_docstring_examples_fit_80_columns():
    # The API reference shows them as code blocks; longer lines scroll sideways at 1280 px.
    import ast

    long = []
    for path in glob.glob(os.path.join(ROOT, "gradtools", "**", "*.py"), recursive=True):
        for node in ast.walk(ast.parse(open(path).read())):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node) or ""
                lines = doc.splitlines()
                for i, line in enumerate(lines):
                    in_example = line.lstrip().startswith((">>>", "..."))
                    # the expected output right after an example line is shown too
                    shown = in_example or (i and lines[i - 1].lstrip().startswith(">>>") and line.strip())
                    if shown and len(line.strip()) > 80:
                        long.append(f"{os.path.relpath(path, ROOT)}: {line.strip()[:60]}")
    assert not long, long
