# shardq: two commands on a fresh machine with Python 3.11:
#   make run    venv + install + a local cluster with a short demo
#   make test   venv + test extras + the whole pytest suite
#   make check  the quick tier: ruff, mypy, unit tests (under a minute)
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: run test test-node check lint typecheck bench clean

$(STAMP): pyproject.toml
	@# The dashboard's browser tests drive Debian's headless Chromium (tests/ui).
	if [ ! -x /usr/bin/chromium ] && [ "$$(id -u)" = 0 ]; then \
		apt-get update -qq && apt-get install -y -qq chromium chromium-driver; fi
	@# The partition test makes network namespaces (tests/netns.py, iproute2).
	if ! command -v ip >/dev/null && [ "$$(id -u)" = 0 ]; then \
		apt-get update -qq && apt-get install -y -qq iproute2; fi
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test,bench]'
	touch $(STAMP)

run: $(STAMP)
	$(PY) -m shardq demo

test: $(STAMP) test-node
	$(PY) -m pytest -q --durations=25

# The quick tier while editing (under a minute on a quiet 2-core box): ruff,
# mypy --strict and tests/unit (no process, no socket) with a fifth of the
# hypothesis examples (tests/props.py). `make test` runs everything in full.
check: $(STAMP)
	$(VENV)/bin/ruff check .
	$(MAKE) --no-print-directory typecheck
	SHARDQ_QUICK=1 $(PY) -m pytest -q -p no:cacheprovider tests/unit

# The Node client (clients/node) against real brokers from this venv: npm ci
# from the lockfile when node_modules is missing or older than it, then tsc and
# `node --test`. Skipped, saying so, only where node is not installed.
NODE_DIR := clients/node
test-node: $(STAMP)
ifeq ($(shell command -v node),)
	@echo "test-node: SKIPPED: node is not installed (the Node client needs Node 20+)"
else
	@cd $(NODE_DIR) && if [ ! -f node_modules/.package-lock.json ] \
		|| [ package-lock.json -nt node_modules/.package-lock.json ]; then \
		npm ci --no-audit --no-fund; fi
	cd $(NODE_DIR) && npm test
endif

lint: typecheck
	$(VENV)/bin/ruff check .

# peers side by side (installs redis-server/npm/pip peers on first use), CPU per job vs
# brokers, the broadcast scenario and the plots, into bench/results/ (about 15 minutes)
bench: $(STAMP)
	$(VENV)/bin/shardq bench all

clean:
	rm -rf $(VENV) shardq-data .pytest_cache .mypy_cache .ruff_cache $(NODE_DIR)/node_modules $(NODE_DIR)/dist

# mypy cannot follow the editable install's package-dir mapping, so it checks
# a tree of symlinks laid out like the installed package.
typecheck: $(STAMP)
	rm -rf build/mypy && mkdir -p build/mypy/shardq
	for f in shardq/*; do ln -s "$(CURDIR)/$$f" build/mypy/shardq/; done
	for d in broker router coordinator client; do ln -s "$(CURDIR)/$$d" build/mypy/shardq/$$d; done
	cd build/mypy && $(CURDIR)/$(VENV)/bin/mypy --strict --ignore-missing-imports --python-version 3.11 -p shardq
