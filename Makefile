# The two commands of the README: `make run` (the main job) and `make test` (the suite).
VENV ?= .venv
BIN := $(VENV)/bin
WORKERS ?= 2  # pytest-xdist processes for `make test` (the suite is sized for 2 cores)

.PHONY: setup run test test-all

setup:
	@VENV=$(VENV) bash scripts/setup.sh

run: setup  ## LoRA SFT of the embedded SmolLM2-135M on the shipped data, base vs tuned on the test split
	$(BIN)/tunelab-train $(ARGS)

test: setup  ## the default suite (slow tests excluded; smaller versions of them stay in), WORKERS processes
	$(BIN)/python -m pytest -q -n $(WORKERS) $(ARGS)

test-all: setup
	$(BIN)/python -m pytest -q -n $(WORKERS) -m "" $(ARGS)
