# nanoebm in two commands: `make train` and `make test`. Each sets up what it needs on first use: a virtual
# environment in .venv with torch and the exact versions CI passed (constraints.txt), nanoebm installed editable.
#
#   make train                       # train on the embedded tiny Shakespeare (cpu preset without a GPU) into out/
#   make train ARGS="--max_steps 500 --output_dir out-short"
#   make test                        # the fast tests, offline (in-process; not those marked slow)
#   make test-all                    # every test: also the slow ones, which start Python processes (the README's
#                                    # commands, subprocesses, accelerate launch) or a browser; CI runs this
#   make lint                        # ruff, configured in pyproject.toml
#
# TORCH picks the torch build (`pip install torch==2.13.0` is the CPU build on this project's CI machines and the
# CUDA build from PyPI on Linux). CONSTRAINTS= (empty) resolves the newest releases instead of the locked set.

PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
CONSTRAINTS ?= constraints.txt
EXTRA ?=
ARGS ?=

BIN := $(VENV)/bin
PIN := $(if $(CONSTRAINTS),-c $(CONSTRAINTS))

.PHONY: train test test-all lint setup clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml $(CONSTRAINTS)
	$(PYTHON) -c 'import sys; sys.exit("nanoebm needs Python >= 3.10, found " + sys.version.split()[0]) if sys.version_info < (3, 10) else None'
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --disable-pip-version-check $(PIN) "$(TORCH)"
	$(BIN)/python -m pip install -q --disable-pip-version-check $(PIN) -e ".[dev]" $(EXTRA)
	$(BIN)/python -c 'import torch, transformers, accelerate, datasets; print("nanoebm set up: torch", torch.__version__, "transformers", transformers.__version__, "accelerate", accelerate.__version__, "datasets", datasets.__version__)'
	touch $@

train: $(VENV)/.installed
	$(BIN)/python run_train.py $(ARGS)

# two pytest-xdist workers, each file whole in one (its trained models made once), one torch thread each, and one for
# the processes the slow tests start too: on 2 cores a 2-thread process beside a busy worker spins (OpenMP) and runs
# several times slower (a --compare subprocess passed its 300 s timeout that way)
TEST_ENV := HF_HUB_OFFLINE=1 WANDB_MODE=offline TOKENIZERS_PARALLELISM=false OMP_NUM_THREADS=1
PYTEST := $(BIN)/python -m pytest tests -q -n 2 --dist loadfile

test: $(VENV)/.installed
	$(TEST_ENV) $(PYTEST) -m "not slow" $(ARGS)

test-all: $(VENV)/.installed
	$(TEST_ENV) $(PYTEST) $(ARGS)

lint: $(VENV)/.installed
	$(BIN)/ruff check .

clean:
	rm -rf $(VENV)
