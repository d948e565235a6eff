# pccl — the two commands a fresh machine needs: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: venv test demo clean chromium

venv: $(STAMP)

# torch is pinned: an unpinned torch pulls GBs of CUDA wheels here.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH_SPEC)"
	$(PY) -m pip install --quiet -e ".[dev,plot]"
	touch $(STAMP)

# The status page's browser test (tests/pccl/test_status_browser.py) drives Debian's
# chromium; install it where we may (root with apt-get), else that test skips.
chromium:
	@if [ ! -x /usr/bin/chromium ] && [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	  export DEBIAN_FRONTEND=noninteractive; \
	  apt-get install -y --no-install-recommends chromium \
	  || { apt-get update && apt-get install -y --no-install-recommends chromium; } \
	  || echo "chromium could not be installed: the status page browser test will be skipped"; \
	fi

test: $(STAMP) chromium
	$(PY) -m mypy transport collectives pccl training stress examples
	$(PY) -m pytest -q tests

demo: $(STAMP)
	$(VENV)/bin/pccl demo

clean:
	rm -rf $(VENV) build *.egg-info

# The long chaos run (README, "Chaos testing"); `make test` runs a one-minute one.
.PHONY: soak
soak: $(STAMP)
	$(PY) -m stress.chaos --peers 6 --duration 600 --faults kill,stop,join,proxy --report soak.json
