# Every target installs what it needs into .venv on a fresh machine.
# torch is pinned to 2.13.0 and installed first: on these machines that wheel is the CPU build on disk;
# any looser request would pull gigabytes of CUDA wheels.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
EXTRAS  := $(VENV)/.installed-extras
TORCH   ?= torch==2.13.0
OUTDIR  ?= curvlab-out

FMNIST  := /usr/share/datasets/fashion-mnist

.PHONY: demo test lint bench docs install clean data

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c constraints.txt $(TORCH)
	$(BIN)/python -m pip install --quiet -c constraints.txt -e '.[test]'
	touch $(STAMP)

# The optional frameworks the integration tests exercise, and the documentation tools: torch held
# at the pinned version by constraints.txt so that no dependency can replace it.
$(EXTRAS): $(STAMP)
	$(BIN)/python -m pip install --quiet -c constraints.txt -e '.[test,lightning,transformers,tensorboard,docs,ray]'
	touch $(EXTRAS)

install: $(STAMP)

# The main job: the quick benchmark suite on shipped data into a SQLite store, then its report.
demo: $(STAMP)
	OMP_NUM_THREADS=1 $(BIN)/curvlab bench demo --out $(OUTDIR)/bench

# Fashion-MNIST from Debian's package, for the tiny-subspace reproduction and its tests; optional:
# without it (no apt, not root) those tests skip with the reason and everything else runs.
data:
	@if [ ! -d $(FMNIST) ] && command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
		(apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist >/dev/null) \
		|| echo "note: could not install dataset-fashion-mnist; its tests will skip"; \
	fi

test: $(EXTRAS) data
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest -n 2 --timeout 600 -q

# tools/check_source.py: no control characters in source, no tabs in Python.
lint: $(STAMP)
	$(BIN)/python tools/check_source.py
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

# The documentation site (Sphinx + MyST, from the docstrings): a warning fails the build.
docs: $(EXTRAS)
	$(BIN)/sphinx-build -W --keep-going -q -b html docs docs/_build/html
	@echo "docs: docs/_build/html/index.html"

bench: $(STAMP)
	OMP_NUM_THREADS=1 $(BIN)/python benchmarks/curvature_peers.py

clean:
	rm -rf $(VENV) $(OUTDIR) docs/_build .pytest_cache .ruff_cache .mypy_cache build src/*.egg-info
