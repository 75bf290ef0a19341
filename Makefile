# shardq: two commands on a fresh machine with Python 3.11:
#   make run    venv + install + a local cluster with a short demo
#   make test   venv + test extras + the whole pytest suite
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: run test lint typecheck bench clean

$(STAMP): pyproject.toml
	@# The dashboard's browser tests drive Debian's headless Chromium (tests/ui).
	if [ ! -x /usr/bin/chromium ] && [ "$$(id -u)" = 0 ]; then \
		apt-get update -qq && apt-get install -y -qq chromium chromium-driver; fi
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test,bench]'
	touch $(STAMP)

run: $(STAMP)
	$(PY) -m shardq demo

test: $(STAMP)
	$(PY) -m pytest -q

lint: typecheck
	$(VENV)/bin/ruff check .

# peers side by side (installs redis-server/npm/pip peers on first use), CPU per job vs
# brokers, the broadcast scenario and the plots, into bench/results/ (about 15 minutes)
bench: $(STAMP)
	$(VENV)/bin/shardq bench all

clean:
	rm -rf $(VENV) shardq-data .pytest_cache .mypy_cache .ruff_cache

# mypy cannot follow the editable install's package-dir mapping, so it checks
# a tree of symlinks laid out like the installed package.
typecheck: $(STAMP)
	rm -rf build/mypy && mkdir -p build/mypy/shardq
	for f in shardq/*; do ln -s "$(CURDIR)/$$f" build/mypy/shardq/; done
	for d in broker router coordinator client; do ln -s "$(CURDIR)/$$d" build/mypy/shardq/$$d; done
	cd build/mypy && $(CURDIR)/$(VENV)/bin/mypy --strict --ignore-missing-imports --python-version 3.11 -p shardq
