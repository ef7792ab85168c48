# Two entry points (see README): `make run` and `make test`. Both bootstrap what they need and are idempotent.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
FMNIST := /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz
FORTUNES := /usr/share/games/fortunes/computers
CHROMIUM := /usr/bin/chromium
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
CONFIG ?= examples/default.yaml
export HF_HUB_OFFLINE := 1
export WANDB_MODE ?= offline

.PHONY: run test install bytecode data browser lint bench clean

install: $(STAMP)

$(STAMP): requirements.lock pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check -r requirements.lock setuptools==84.2.1
	$(BIN)/pip install --quiet --disable-pip-version-check --no-deps --no-build-isolation -e .
	touch $@

# the editable install's own modules compiled ahead, as pip compiles an installed package's: a process then reads
# bytecode instead of compiling the sources at every start (where PYTHONDONTWRITEBYTECODE is set, Python never
# writes it; about 0.13 s of each `cl` process here). Only changed files are compiled again.
bytecode: install
	$(BIN)/python -m compileall -q cl scenarios strategies

data: $(FMNIST) $(FORTUNES)

$(FMNIST) $(FORTUNES):
	$(SUDO) apt-get update -qq
	$(SUDO) apt-get install -y -qq dataset-fashion-mnist fortunes

# headless Chromium renders the HTML report in tests/cl/test_report.py
browser: $(CHROMIUM)

$(CHROMIUM):
	$(SUDO) apt-get update -qq
	$(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium

# ends by writing RUN/report.html (the dashboard: `cl report`) and printing its path
run: bytecode data
	$(BIN)/cl run $(CONFIG) --report

test: bytecode data browser
	$(BIN)/python -m pytest -q; rc=$$?; if [ $$rc -eq 5 ]; then echo "pytest: no tests collected"; rc=0; fi; exit $$rc

lint: install
	$(BIN)/ruff check .

bench: bytecode data
	$(BIN)/python -m benchmarks.run_all

clean:
	rm -rf $(VENV) runs .pytest_cache
