# The two set-up commands of the README: `make run` and `make test`.
PYTHON ?= python3
VENV ?= .venv
HOST ?= 127.0.0.1
PORT ?= 8000
PIP := $(VENV)/bin/python -m pip
STAMP := $(VENV)/.install-stamp

.PHONY: install run test lint format clean

install: $(STAMP)

# torch is installed first and alone, pinned to the version in constraints.txt: on a
# CPU-only machine with a local CPU wheel that keeps pip from fetching CUDA builds, and
# everything after it resolves against the torch already installed.
$(STAMP): pyproject.toml constraints.txt
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet "torch==$$(sed -n 's/^torch==//p' constraints.txt)"
	$(PIP) install --quiet -c constraints.txt -e ".[train,dev]"
	touch $@

run: install
	$(VENV)/bin/afina serve --host $(HOST) --port $(PORT)

# One pytest-xdist worker a core, at most four; a group of XDIST_GROUPS (tests/conftest.py)
# runs in one worker. Then the tests marked serial, in one process: PYTEST_ARGS may select
# none of them (exit 5), the whole suite may not.
test: install
	$(VENV)/bin/pytest -n auto --maxprocesses 4 --dist loadgroup -m "not serial" $(PYTEST_ARGS)
	$(VENV)/bin/pytest -m serial $(PYTEST_ARGS) $(if $(PYTEST_ARGS),|| [ $$? -eq 5 ])

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: install
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
