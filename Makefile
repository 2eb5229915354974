# The two commands of the README: `make serve` and `make test`.
# Both create .venv and install the project on first use.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
PY := $(VENV)/bin/python
BASE := $(VENV)/.diglett-base
DEV := $(VENV)/.diglett-dev

$(PY):
	$(PYTHON) -c 'import sys; assert sys.version_info >= (3, 11), "Python 3.11+ needed"'
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip

# The server needs only the base install; tests (and the PyAudio client,
# built against PortAudio) need the dev extra.
$(BASE): pyproject.toml | $(PY)
	$(PY) -m pip install -e .
	touch $(BASE)

$(DEV): pyproject.toml | $(PY)
	PYTHON=$(PYTHON) bash scripts/test-packages.sh
	$(PY) -m pip install -e '.[dev]'
	touch $(BASE) $(DEV)

serve: $(BASE)
	$(VENV)/bin/diglett serve

# tests/unit: pure logic, seconds; tests/model: the real model, no Ray;
# tests/serve: one local Ray instance with the Serve app, shared; and
# tests/cluster: their own Ray (a three-node cluster, HAProxy's fixed ports,
# `diglett serve`), so they run in a pytest process of their own, after the
# suite's local Ray instance is gone.
test: $(DEV)
	$(PY) -m pytest -q -ra tests/unit tests/model tests/serve
	$(PY) -m pytest -q -ra tests/cluster

test-unit: $(DEV)
	$(PY) -m pytest -q tests/unit

test-cluster: $(DEV)
	$(PY) -m pytest -q -ra tests/cluster/test_multinode.py

fetch-model: $(BASE)
	$(VENV)/bin/diglett fetch-model

format: $(DEV)
	$(VENV)/bin/black .

lint: $(DEV)
	$(VENV)/bin/black --check .

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache

# The server image, built here with podman and tested end to end: a real
# conversation streamed through a container with diglett-client (image/test.sh;
# docs/operations.md#docker). Several minutes and ~10 GB of disk, so not part
# of `make test`. IMAGE_VARIANT=cpu needs PyTorch's CPU wheel index.
IMAGE_VARIANT ?= cuda
image-test: $(DEV)
	VARIANT=$(IMAGE_VARIANT) image/test.sh
