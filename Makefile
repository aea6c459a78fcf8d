# The two commands of README.md. Each sets itself up: a virtual environment in .venv with the
# pinned torch/torchvision (constraints.txt) and the project installed editable. `make run` installs
# only what the default experiment needs (classify_images.py: pyarrow, scikit-learn, pillow);
# `make test` adds what the tests need (S3, pytest and mypy, the text examples' transformers and
# chromadb), each behind a stamp of its own.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip install --quiet --disable-pip-version-check -c constraints.txt
RUN_STAMP := $(VENV)/.installed-run
TEST_STAMP := $(VENV)/.installed-test

.PHONY: run test test-slurm typecheck bench chaos clean

$(PY):
	python3 -m venv $(VENV)

$(RUN_STAMP): setup.cfg constraints.txt pyproject.toml | $(PY)
	$(PIP) -e ".[examples]"
	touch $(RUN_STAMP)

$(TEST_STAMP): setup.cfg constraints.txt pyproject.toml | $(PY)
	$(PIP) -e ".[examples,s3,test,texts]"
	touch $(TEST_STAMP)

run: $(RUN_STAMP)  ## the default experiment (experiment.yaml)
	$(VENV)/bin/batchproc run experiment.yaml $(ARGS)

# The suite runs on one worker more than there are cores (pytest-xdist): much of its time is spent
# waiting on real multi-process jobs (timeouts, sleeps, torchrun's grace periods). Tests that share
# an expensive module fixture are marked xdist_group and stay on one worker (loadgroup). The
# longest start first (tests/conftest.py: SLOW_FIRST; --no-loadscope-reorder keeps that order).
TEST_WORKERS ?= $(shell echo $$(( $$(nproc) + 1 )))

test: typecheck  ## the type check, then the test suite
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadgroup --no-loadscope-reorder --durations=10 $(ARGS)

# examples/deploy/slurm.sbatch on a real one-node Slurm cluster (tests/test_slurm.py, ~3 min). It needs
# root and Debian's slurm-wlm and munge, installed here when missing; `make test` skips it.
SLURM_BINARIES := munged slurmctld slurmd sbatch scontrol
test-slurm: $(TEST_STAMP)  ## the Slurm cluster test (root; installs slurm-wlm and munge if missing)
	@if [ "$$(id -u)" != 0 ]; then echo "make test-slurm: needs root (it starts munged, slurmctld and slurmd); skipped"; exit 0; fi; \
	for b in $(SLURM_BINARIES); do command -v $$b >/dev/null || missing=1; done; \
	if [ -n "$$missing" ]; then apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq slurm-wlm munge; fi; \
	BATCHPROC_TEST_SLURM=1 $(PY) -m pytest -q -rs tests/test_slurm.py $(ARGS)

typecheck: $(TEST_STAMP)  ## mypy --strict over the package and the launcher (settings: setup.cfg [mypy])
	$(PY) -m mypy --strict batchproc launch

clean:
	rm -rf $(VENV) runs data
