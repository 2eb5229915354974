# The two commands of the README: `make serve` and `make test`.
# Both create .venv and install the project on first use.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.diglett-installed

.PHONY: serve test fetch-model format lint bench-accuracy clean

$(STAMP): pyproject.toml
	$(PYTHON) -c 'import sys; assert sys.version_info >= (3, 11), "Python 3.11+ needed"'
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -e '.[dev]'
	touch $(STAMP)

serve: $(STAMP)
	$(VENV)/bin/diglett serve

test: $(STAMP)
	$(PY) -m pytest -q -ra

fetch-model: $(STAMP)
	$(VENV)/bin/diglett fetch-model

format: $(STAMP)
	$(VENV)/bin/black .

lint: $(STAMP)
	$(VENV)/bin/black --check .

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
