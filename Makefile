# Two entry points (see README): `make demo` and `make test`. Both build the venv on first use.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp

.PHONY: demo test lint bench ui clean

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -c constraints.txt -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)  ## the quick comparison matrix on the embedded MNIST digits, then the report
	$(BIN)/sparsebench run --preset quick
	$(BIN)/sparsebench report --preset quick

test: $(STAMP)  ## the whole test suite (CPU; CUDA variants run where a GPU is present)
	$(BIN)/pytest -q

lint: $(STAMP)
	$(BIN)/ruff check .

bench: $(STAMP)  ## speed and memory of the sparse layer against a dense one
	$(BIN)/python benchmarks/bench_sparse_layer.py

ui: $(STAMP)
	$(BIN)/sparsebench ui

clean:
	rm -rf $(VENV) sparsebench-runs
