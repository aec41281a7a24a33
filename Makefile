# The two commands of the README: `make demo` and `make test`. Each creates
# .venv and installs what it needs; tmux, git and npm (for the real Claude
# Code CLI the tests run) are the system packages.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
# The Claude Code CLI the tests and the benchmark run, pinned: it changes often.
CLAUDE_CODE_VERSION := 2.1.197
CLAUDE_DIR   := .claude-cli
CLAUDE_STAMP := $(CLAUDE_DIR)/.installed-$(CLAUDE_CODE_VERSION)
# The other agent CLIs formulabeat drives, pinned to the versions measured
# (README "Agent drivers"), into one npm prefix.
CODEX_VERSION  := 0.171.0
GEMINI_VERSION := 0.61.0
AGENT_CLIS_DIR   := .agent-clis
AGENT_CLIS_STAMP := $(AGENT_CLIS_DIR)/.installed-codex-$(CODEX_VERSION)-gemini-$(GEMINI_VERSION)

.PHONY: setup system-deps claude-cli agent-clis demo test lint typecheck unit long sentinel chaos chaos-real bench soak compose-check clean

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
	@command -v npm >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    echo "installing npm"; apt-get update -qq && apt-get install -y -qq npm || true; \
	  else \
	    echo "npm not found (sudo apt-get install npm): the tests of the real Claude Code CLI will skip"; \
	  fi; }

$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "Python >= 3.11 is required (set PYTHON=python3.11)")'
	$(PYTHON) -m venv $(VENV) || { rm -rf $(VENV); echo "$(PYTHON) -m venv failed: install the venv module (sudo apt-get install python3-venv)"; exit 1; }
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

# Into the checkout (ignored by git), where tests/real_cli.py looks for it.
claude-cli: system-deps $(CLAUDE_STAMP)

$(CLAUDE_STAMP):
	@if ! command -v npm >/dev/null 2>&1; then echo "no npm: Claude Code CLI not installed"; exit 0; fi; \
	rm -rf $(CLAUDE_DIR) && \
	npm install --prefix $(CLAUDE_DIR) --no-audit --no-fund --loglevel=error \
	  @anthropic-ai/claude-code@$(CLAUDE_CODE_VERSION) && \
	$(CLAUDE_DIR)/node_modules/.bin/claude --version && touch $(CLAUDE_STAMP)

# Codex CLI and Gemini CLI, beside Claude Code (tests/real_cli.py looks here).
agent-clis: system-deps $(AGENT_CLIS_STAMP)

$(AGENT_CLIS_STAMP):
	@if ! command -v npm >/dev/null 2>&1; then echo "no npm: Codex and Gemini CLIs not installed"; exit 0; fi; \
	rm -rf $(AGENT_CLIS_DIR) && \
	npm install --prefix $(AGENT_CLIS_DIR) --no-audit --no-fund --loglevel=error \
	  @openai/codex@$(CODEX_VERSION) @google/gemini-cli@$(GEMINI_VERSION) && \
	$(AGENT_CLIS_DIR)/node_modules/.bin/codex --version && \
	$(AGENT_CLIS_DIR)/node_modules/.bin/gemini --version && touch $(AGENT_CLIS_STAMP)

demo: setup
	$(BIN)/formulabeat demo

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: setup
	$(BIN)/mypy

# Two test processes: most tests wait on a CLI, tmux or Redis, and one process
# left the two cores half idle; each has its own Redis, tmux socket directory
# and API stand-ins (the fixtures are per process).
unit: setup claude-cli agent-clis
	$(BIN)/pytest -q -n 2 -m "not long and not sentinel"

# Failovers of a Sentinel group (a master, two replicas, three Sentinels)
# while runs are live; not part of CI yet (README "Redis behind Sentinel").
sentinel: setup
	$(BIN)/pytest -q -m sentinel

# The scenarios make test leaves out (marked long): each CLI's one-shot run
# and the counted resume, each checked in make test by another test; not in CI.
long: setup claude-cli agent-clis
	$(BIN)/pytest -q -m long

test: lint typecheck unit

# ≥ 100 runs on three hosts while workers are killed and Redis restarts;
# REDIS=sentinel: through a Sentinel group whose master is failed over and killed.
chaos: setup
	$(BIN)/python -m tests.chaos $(if $(REDIS),--redis $(REDIS))

# ≥ 30 runs of the real Claude Code CLI through API outages and rate limits,
# CLI crashes, worker kill -9s and a Redis restart (not part of `make test`).
chaos-real: setup claude-cli
	$(BIN)/python -m tests.chaos_real

# Latency, idle cost, concurrency and throughput; writes bench/results.json.
bench: setup claude-cli agent-clis
	$(BIN)/python -m bench.bench

# 300 scripted sessions on one host for MINUTES, runs ending and starting all
# the time; fails when the worker's, tmux's or Redis's resources grow (see the
# README's Soak section, whose figures come from MINUTES=60). Writes bench/soak.json.
MINUTES ?= 10
soak: setup
	$(BIN)/python -m bench.soak --minutes $(MINUTES)

# Builds deploy/Dockerfile and runs deploy/compose.yaml for real (a run to
# done, Flower's login), then removes the stack; not part of `make test`.
# Needs root or a Docker engine (see deploy/README.md). COLD=1: no cached images.
# HA=1: with compose.ha.yaml, the master failed over while the run is live.
compose-check: setup
	$(BIN)/python deploy/compose_check.py --claude-code-version $(CLAUDE_CODE_VERSION) $(if $(COLD),--cold) $(if $(HA),--ha)

clean:
	rm -rf $(VENV) $(CLAUDE_DIR) $(AGENT_CLIS_DIR) .mypy_cache .ruff_cache .pytest_cache
