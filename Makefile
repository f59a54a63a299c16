# lcm_lab: `make test` and `make demo` create the virtual environment when it is missing.
VENV ?= .venv
PY := $(VENV)/bin/python
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1

.PHONY: install test test-all demo assets clean

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --disable-pip-version-check -q -e ".[dev]"
	touch $@

install: $(VENV)/.installed

# Fast suite (what CI runs); `make test-all` adds the slow tests.
test: $(VENV)/.installed
	$(PY) -m pytest -m "not slow" -q

test-all: $(VENV)/.installed
	$(PY) -m pytest -q

demo: $(VENV)/.installed
	$(VENV)/bin/lcm-lab demo --out outputs/demo

# Rebuild the embedded toy world (about 53 minutes on 2 CPU cores; resumable).
assets: $(VENV)/.installed
	$(PY) scripts/build_toy_assets.py

clean:
	rm -rf outputs .pytest_cache
