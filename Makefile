# Two entry points (see README): `make demo` and `make test`. Both build the venv on first use.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
CHROMIUM := /usr/bin/chromium
FASHION_MNIST := /usr/share/datasets/fashion-mnist
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: demo test lint bench ui clean

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -c constraints.txt -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)  ## the quick comparison matrix on the embedded MNIST digits, then the report
	$(BIN)/sparsebench run --preset quick --jobs auto
	$(BIN)/sparsebench report --preset quick

test: $(STAMP) $(CHROMIUM) $(FASHION_MNIST)  ## the whole test suite (CPU; CUDA variants run where a GPU is present)
	SPARSEBENCH_REQUIRE_BROWSER=1 $(BIN)/pytest -q -rs

# The dashboard test drives Debian's Chromium (never a browser that Playwright downloads); without
# it `make test` installs it, or stops here saying why, rather than skip that test in silence.
$(CHROMIUM):
	@command -v apt-get >/dev/null || { echo "make test: $(CHROMIUM) is missing; install Chromium (Debian: apt-get install chromium)" >&2; exit 1; }
	$(SUDO) apt-get update -qq
	DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq chromium >/dev/null
	@test -x $(CHROMIUM) || { echo "make test: apt-get did not provide $(CHROMIUM)" >&2; exit 1; }

# The Fashion-MNIST tests read Debian's dataset-fashion-mnist (full-size real data, no download);
# installed the same way, so that they run rather than skip. `-rs` above lists any test that still
# skips, and why, at the end of the run.
$(FASHION_MNIST):
	@command -v apt-get >/dev/null || { echo "make test: $(FASHION_MNIST) is missing; install Debian's dataset-fashion-mnist" >&2; exit 1; }
	$(SUDO) apt-get update -qq
	DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq dataset-fashion-mnist >/dev/null
	@test -d $(FASHION_MNIST) || { echo "make test: apt-get did not provide $(FASHION_MNIST)" >&2; exit 1; }

lint: $(STAMP)
	$(BIN)/ruff check .

bench: $(STAMP)  ## speed and memory of the sparse layer against a dense one
	$(BIN)/python benchmarks/bench_sparse_layer.py

ui: $(STAMP)
	$(BIN)/sparsebench ui

clean:
	rm -rf $(VENV) sparsebench-runs
