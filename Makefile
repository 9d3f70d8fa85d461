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

# man looks in PREFIX/share/man beside a PREFIX/bin on PATH. A wheel installs the pages there;
# an editable install leaves data files out, so they are linked (and stay current).
MANPAGES := $(wildcard man/*.1 man/*.5)
$(VENV)/share/man/.linked: $(MANPAGES) | $(BIN)/.installed
	mkdir -p $(VENV)/share/man/man1 $(VENV)/share/man/man5
	for page in $(MANPAGES); do ln -sf "$(CURDIR)/$$page" "$(VENV)/share/man/man$${page##*.}/"; done
	touch $@

install: $(BIN)/.installed $(VENV)/share/man/.linked

# Two pytest workers, one per test file at a time (fixtures are per file): most tests wait on
# subprocesses pinned to one thread, so two cores run the suite in about two thirds of the time.
TEST_WORKERS ?= 2
test: install
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile

# The main job on the bundled default model (trained by examples/toy on its shapes world):
# few-shot captions by beam search, shapes ranked by likelihood; then the bundled video model
# answers a video question from four shots (only the order of the clip's frames tells).
TOY := examples/toy
VIDEO_TASK := direction
demo: install
	@echo "== flamingo encode $(TOY)/images/ | flamingo generate --shots $(TOY)/shots.jsonl" >&2
	$(BIN)/flamingo encode -q $(TOY)/images/ | $(BIN)/flamingo generate -q --shots $(TOY)/shots.jsonl \
		| $(BIN)/python $(TOY)/show.py output
	@echo "== ... | flamingo prompt --template $(TOY)/templates/shape.yaml | flamingo score" >&2
	$(BIN)/flamingo encode -q $(TOY)/images/ \
		| $(BIN)/flamingo prompt --shots $(TOY)/shots.jsonl --template $(TOY)/templates/shape.yaml \
		| $(BIN)/flamingo score -q | $(BIN)/python $(TOY)/show.py prediction
	@echo "== flamingo encode --ckpt toy-video $(TOY)/videos/ | flamingo generate --ckpt toy-video --shots $(TOY)/video_shots.jsonl --template $(TOY)/templates/$(VIDEO_TASK).yaml" >&2
	$(BIN)/flamingo encode -q --ckpt toy-video $(TOY)/videos/ \
		| $(BIN)/flamingo generate -q --ckpt toy-video --shots $(TOY)/video_shots.jsonl \
			--template $(TOY)/templates/$(VIDEO_TASK).yaml \
		| $(BIN)/python $(TOY)/show.py output

# Regenerate man/flamingo*.1 from the --help texts (tests check they are current).
man: $(BIN)/.installed
	$(BIN)/python man/generate.py man

clean:
	rm -rf $(VENV) .cache .pytest_cache
