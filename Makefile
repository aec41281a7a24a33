# The two commands of the README: `make demo` and `make test`. Each creates
# .venv and installs what it needs; tmux and git are the only system packages.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp

.PHONY: setup system-deps demo test lint typecheck unit chaos bench clean

setup: system-deps $(STAMP)

system-deps:
	@missing=""; for tool in tmux git; do command -v $$tool >/dev/null 2>&1 || missing="$$missing $$tool"; done; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    echo "installing$$missing"; apt-get update -qq && apt-get install -y -qq $$missing; \
	  else \
	    echo "missing system packages:$$missing — install them (sudo apt-get install$$missing)"; exit 1; \
	  fi; \
	fi

$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "Python >= 3.11 is required (set PYTHON=python3.11)")'
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

demo: setup
	$(BIN)/formulabeat demo

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: setup
	$(BIN)/mypy

unit: setup
	$(BIN)/pytest -q

test: lint typecheck unit

# ≥ 100 runs on three hosts while workers are killed and Redis restarts.
chaos: setup
	$(BIN)/python -m tests.chaos

# Latency, idle cost, concurrency and throughput; writes bench/results.json.
bench: setup
	$(BIN)/python -m bench.bench

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache
