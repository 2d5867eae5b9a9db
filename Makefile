# Taming Exploding Gradients: one entry point.
#   make book   build the HTML book into _build/html (executes every chapter)
#   make test   unit tests, browser test, and nbval on every chapter
#   make lab    JupyterLab on the book, same environment
# Everything installs itself into .venv on first use.

PYTHON     ?= python3
VENV       ?= .venv
PY         := $(VENV)/bin/python
# The PyTorch build to install before the project. The default is the CPU wheel
# on machines without a GPU; readers with one: see "GPU" in README.md.
TORCH_SPEC ?= torch==2.13.0
EXTRAS     ?= torch,keras,book,test
STAMP      := $(VENV)/.installed
PYTEST_ARGS ?=
NOTEBOOKS  ?= chapters

.PHONY: install book test unit nbval browser lab clean

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	@if [ -n "$(TORCH_SPEC)" ]; then $(PY) -m pip install -q "$(TORCH_SPEC)"; fi
	$(PY) -m pip install -q -e ".[$(EXTRAS)]"
	@touch $@

install: $(STAMP)

book: $(STAMP)
	$(PY) tools/build_book.py

unit: $(STAMP)
	$(PY) -m pytest -n 2 -m "not browser" $(PYTEST_ARGS)

browser: $(STAMP)
	$(PY) tools/ensure_chromium.py
	$(PY) -m pytest -m browser $(PYTEST_ARGS)

# Chapters run one at a time: two kernels, each with multi-threaded PyTorch and
# TensorFlow, on two cores slow each other down by more than an order of magnitude.
nbval: $(STAMP)
	$(PY) tools/check_notebooks.py
	$(PY) -m pytest -p no:cacheprovider --nbval --nbval-current-env \
	    --nbval-sanitize-with tests/nbval_sanitize.cfg --nbval-cell-timeout=180 \
	    $(NOTEBOOKS) $(PYTEST_ARGS)

test: unit browser nbval

lab: $(STAMP)
	$(VENV)/bin/jupyter lab --notebook-dir=.

clean:
	rm -rf _build .pytest_cache
