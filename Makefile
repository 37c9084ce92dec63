# The two commands of the README: `make run` (the main job) and `make test` (the suite).
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: setup run test test-all

setup:
	@VENV=$(VENV) bash scripts/setup.sh

run: setup  ## LoRA SFT of the embedded SmolLM2-135M on the shipped data, base vs tuned on the test split
	$(BIN)/tunelab-train $(ARGS)

test: setup  ## the default suite (slow tests excluded; smaller versions of them stay in)
	$(BIN)/python -m pytest -q $(ARGS)

test-all: setup
	$(BIN)/python -m pytest -q -m "" $(ARGS)
