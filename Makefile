# clsp: `make synth train eval` runs the whole pipeline on the embedded default (scikit-learn's digits);
# `make test` runs the tests. Every target builds .venv first, so each works from a fresh clone.
SHELL := bash
.SHELLFLAGS := -eu -o pipefail -c

PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
CLSP   := $(VENV)/bin/clsp
STAMP  := $(VENV)/.installed

# The embedded default run. Override on the command line, e.g. `make synth SOURCE=cifar10:/data/cifar MODEL=google/ddpm-cifar10-32`.
SOURCE ?= digits
RUN    ?= runs/digits
MODEL  ?= $(RUN)/generator
SHARDS ?= $(RUN)/shards
METHOD ?= simclr
POSITIVES ?= synthetic
TRAIN_OUT ?= $(RUN)/train/$(METHOD)-$(POSITIVES)-seed0

.PHONY: setup synth train eval study test bench clean

setup: $(STAMP)

# torch/torchvision are pinned to the builds that install offline on CPU machines; a GPU user installs the torch build
# for their CUDA first and then `pip install -e .` (README).
$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt -e '.[test]'
	touch $(STAMP)

$(MODEL)/model_index.json: | setup
	$(CLSP) diffusion train $(SOURCE) --out $(MODEL) --preset embedded --resume

synth: $(MODEL)/model_index.json
	$(CLSP) synth run $(SOURCE) --model $(MODEL) --out $(SHARDS) --preset embedded
	$(CLSP) shards verify $(SHARDS)

train: setup
	$(CLSP) train run $(SHARDS) --out $(TRAIN_OUT) --method $(METHOD) --positives $(POSITIVES) --preset embedded --resume

eval: setup
	$(CLSP) eval all $(TRAIN_OUT) --shards $(SHARDS) --source $(SOURCE) --out $(RUN)/report

# SimCLR x positives none/augment/synthetic x seeds 0-4, each scored by 5-fold over every labelled image (about 50 min
# on 2 CPU cores once the shards exist); `make study STUDY_METHODS=simclr,moco` adds MoCo v2+ (twice the time).
STUDY_METHODS ?= simclr
study: $(MODEL)/model_index.json
	$(CLSP) synth run $(SOURCE) --model $(MODEL) --out $(SHARDS) --preset embedded
	$(CLSP) eval study $(SHARDS) --source $(SOURCE) --out $(RUN)/study --methods $(STUDY_METHODS)

test: setup
	$(PY) -m pytest -q

bench: setup
	$(PY) -m synth.bench
	$(PY) -m train.bench

# Removes the environment and caches only: generators, shards and runs under runs/ cost hours and are kept.
clean:
	rm -rf $(VENV) .pytest_cache
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
