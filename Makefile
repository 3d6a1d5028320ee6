# Every target creates or refreshes the virtualenv itself, so a fresh machine with only
# Python 3.11 and make can run `make demo` and `make test` straight away.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The whole test toolchain (pytest, mypy, ruff, FastAPI, gunicorn, ...).
STAMP := $(VENV)/.installed
# Only the package and its own dependencies: all that `handoff simulate` runs on.
DEMO_STAMP := $(VENV)/.installed-demo

.PHONY: venv demo test lint format clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $(STAMP) $(DEMO_STAMP)

# Not after $(STAMP): `make demo` on a fresh clone must not wait for the test toolchain.
# The venv's own pip installs an editable package fine; upgrading it is left to $(STAMP).
$(DEMO_STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e .
	touch $(DEMO_STAMP)

venv: $(STAMP)

demo: $(DEMO_STAMP)
	$(BIN)/handoff simulate $(DEMO_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

test: lint
	$(BIN)/python -m pytest -q --durations=25

format: $(STAMP)
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .mypy_cache .ruff_cache
