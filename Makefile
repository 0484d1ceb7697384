# Two entry points for a newcomer:  `make repro` (set up + pull data + run the pipeline) and
# `make test` (set up + pull data + run the tests). Both create the venv and install on first use.
SHELL := /bin/bash
VENV ?= .venv
PYTHON ?= $(shell command -v python3.11 || command -v python3)
STAMP := $(VENV)/.installed
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)

.PHONY: setup data repro test clean-venv

$(STAMP): pyproject.toml requirements.lock setup.py iteralite/runtime/native/itl_step.c
	@$(PYTHON) -c 'import sys; assert sys.version_info[:2] == (3, 11), "iteralite needs Python 3.11"'
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --disable-pip-version-check -c requirements.lock -e '.[test]'
	touch $(STAMP)

setup: $(STAMP)

data: setup
	dvc pull --quiet data/raw.dvc

repro: data
	time dvc repro

test: data
	python -m pytest

clean-venv:
	rm -rf $(VENV)
