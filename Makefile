# The two commands of the README: `make run` (the main job) and `make test` (the suite).
VENV ?= .venv
BIN := $(VENV)/bin
WORKERS ?= 2  # pytest-xdist processes for `make test` (the suite is sized for 2 cores)

.PHONY: setup run test test-all test-cluster

setup:
	@VENV=$(VENV) bash scripts/setup.sh

run: setup  ## LoRA SFT of the embedded SmolLM2-135M on the shipped data, base vs tuned on the test split
	$(BIN)/tunelab-train $(ARGS)

test: setup  ## the default suite (slow tests excluded; smaller versions of them stay in), WORKERS processes
	$(BIN)/python -m pytest -q -n $(WORKERS) $(ARGS)

test-all: setup
	$(BIN)/python -m pytest -q -n $(WORKERS) -m "" $(ARGS)

test-cluster: setup  ## the study tests on real engines, long ones included: SLURM (started as root), Ray, PostgreSQL, 2 nodes
	bash scripts/setup_slurm.sh
	$(BIN)/python -m pytest -q -p no:xdist -m "" $(ARGS) tests/test_slurm.py tests/test_ray.py tests/test_multinode.py \
		tests/test_studies.py tests/test_sweeps.py
