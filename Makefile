SHELL := bash
.SHELLFLAGS := -eu -o pipefail -c
.DELETE_ON_ERROR:
MAKEFLAGS += --no-builtin-rules

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# Nothing here ever downloads a model: tiny models are built from configs on the spot.
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1

.PHONY: demo test install man clean

# torch and torchvision come from the registry as the matched pair in constraints.txt.
$(BIN)/.installed: pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c constraints.txt -e '.[dev]'
	$(BIN)/python -c "import timm, torchvision, flamingo_cli"
	touch $@

install: $(BIN)/.installed

test: $(BIN)/.installed
	$(BIN)/python -m pytest -q

demo: $(BIN)/.installed
	$(BIN)/python examples/demo.py

# Regenerate man/flamingo*.1 from the --help texts (tests check they are current).
man: $(BIN)/.installed
	$(BIN)/python man/generate.py man

clean:
	rm -rf $(VENV) .cache .pytest_cache
