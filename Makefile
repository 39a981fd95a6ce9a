# pytest-epics-multiarch: set-up, demo, tests, lint.
#
#   make setup   the virtual environment and everything the tests need (scripts/setup.sh all)
#   make demo    the sample IOC's image tests on linux/amd64, linux/ppc64le (the PowerPC guest under
#                QEMU) and rtems/powerpc (skips without an RTEMS developer image)
#   make test    the project's own tests (what CI runs, through .ci/run)
#   make lint    ruff and mypy
#   make clean   remove the virtual environment

SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
# The install is redone only when pyproject.toml changes: this file marks the last one.
VENV_STAMP := $(VENV)/.installed

# Ryuk (testcontainers' reaper) is an image from Docker Hub, which these machines can't reach;
# the plugin removes its own containers.
export TESTCONTAINERS_RYUK_DISABLED := true

.PHONY: $(VENV) setup demo test lint clean

$(VENV): $(VENV_STAMP)

$(VENV_STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -e '.[dev]'
	touch $@

setup: $(VENV)
	bash scripts/setup.sh all

demo: setup
	$(VENV)/bin/python -m pytest sample_iocs --arch=linux/amd64,linux/ppc64le,rtems/powerpc -v

test: setup
	$(VENV)/bin/python -m pytest tests sample_iocs/ppc_guest/tests -v -ra

lint: $(VENV)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy

clean:
	rm -rf $(VENV)
