# Taming Exploding Gradients: one entry point.
#   make book   build the HTML book into _build/html (executes every chapter)
#   make test   unit tests, browser test, and nbval on every chapter
#   make lab    JupyterLab on the book, same environment
# Everything installs itself into .venv on first use, at the exact versions of
# requirements/lock.txt (the ones the committed outputs were computed with).

PYTHON     ?= python3
VENV       ?= .venv
PY         := $(VENV)/bin/python
# The PyTorch build to install before the project. The default is the CPU wheel
# on machines without a GPU; readers with one: see "GPU" in README.md.
TORCH_SPEC ?= torch==2.13.0
EXTRAS     ?= torch,keras,book,test
# Exact versions of everything make installs; LOCK= installs from the ranges in
# pyproject.toml instead (what `pip install gradtools` does).
LOCK       ?= requirements/lock.txt
CONSTRAINT := $(if $(LOCK),-c $(LOCK))
STAMP      := $(VENV)/.installed
PYTEST_ARGS ?=
NOTEBOOKS  ?= chapters

.PHONY: install book test unit nbval nbval-native nbval-alt browser lab lock clean

$(STAMP): pyproject.toml $(LOCK)
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	@if [ -n '$(TORCH_SPEC)' ]; then $(PY) -m pip install -q $(CONSTRAINT) $(TORCH_SPEC); fi
	$(PY) -m pip install -q $(CONSTRAINT) -e ".[$(EXTRAS)]"
	@touch $@

install: $(STAMP)

book: $(STAMP)
	$(PY) tools/build_book.py

unit: $(STAMP)
	$(PY) -m pytest -n 2 -m "not browser and not exhaustive" $(PYTEST_ARGS)

browser: $(STAMP)
	$(PY) tools/ensure_chromium.py
	$(PY) -m pytest -m browser $(PYTEST_ARGS)

# Chapters run one at a time: two kernels, each with multi-threaded PyTorch and
# TensorFlow, on two cores slow each other down by more than an order of magnitude.
# nbval runs twice against the same stored outputs: once with this machine's
# defaults, once under another numeric configuration (portable ATen kernels
# instead of AVX2/AVX-512, one thread everywhere, TensorFlow's oneDNN switched
# on where setup() switches it off). A checked figure must survive both, as it
# must survive a reader's laptop or Colab.
NUMERIC_ALT := ATEN_CPU_CAPABILITY=default OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 \
	OPENBLAS_NUM_THREADS=1 TF_NUM_INTRAOP_THREADS=1 TF_NUM_INTEROP_THREADS=1 \
	TF_ENABLE_ONEDNN_OPTS=1
NBVAL := -m pytest -p no:cacheprovider --nbval --nbval-current-env \
	--nbval-sanitize-with tests/nbval_sanitize.cfg --nbval-cell-timeout=180

nbval: nbval-native nbval-alt

nbval-native: $(STAMP)
	$(PY) tools/check_notebooks.py
	@echo "=== nbval, this machine's numeric defaults"
	$(PY) $(NBVAL) $(NOTEBOOKS) $(PYTEST_ARGS)

nbval-alt: $(STAMP)
	@echo "=== nbval, second numeric configuration: $(NUMERIC_ALT)"
	env $(NUMERIC_ALT) $(PY) $(NBVAL) $(NOTEBOOKS) $(PYTEST_ARGS)

test: unit browser nbval

lab: $(STAMP)
	$(VENV)/bin/jupyter lab --notebook-dir=.

# Rewrite requirements/lock.txt from what is installed in .venv (after changing
# a range in pyproject.toml: make install LOCK=, re-run the chapters, make lock).
lock: $(STAMP)
	$(PY) tools/lock.py requirements/lock.txt

clean:
	rm -rf _build .pytest_cache
