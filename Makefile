# Two entry points: `make demo` and `make test`. Both run `make setup` first when needed.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.haguard-setup

.PHONY: setup demo test lint typecheck bench clean guest

setup: $(STAMP)

$(STAMP): pyproject.toml packaging/debian-packages.txt packaging/install-host-deps.sh packaging/fetch-promtool.sh
	bash packaging/install-host-deps.sh
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test,systemd]'
	bash packaging/fetch-promtool.sh $(BIN)
	$(BIN)/haguard guest-build --quiet
	touch $(STAMP)

demo: setup
	$(BIN)/haguard demo

test: setup
	$(BIN)/ruff check .
	$(BIN)/mypy
	$(BIN)/pytest

lint: setup
	$(BIN)/ruff check .
	$(BIN)/mypy

bench: setup
	$(BIN)/python bench/migration.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .mypy_cache .ruff_cache

# Debian package (needs debhelper): build/deb/haguard_VERSION_ARCH.deb; see docs/install.md.
.PHONY: deb
deb:
	bash packaging/build-deb.sh build/deb
