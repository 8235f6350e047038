# clsp: `make synth train eval` runs the whole pipeline on the embedded default (scikit-learn's digits);
# `make test` runs the tests. Every target builds .venv first, so each works from a fresh clone.
SHELL := bash
.SHELLFLAGS := -eu -o pipefail -c

PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
CLSP   := $(VENV)/bin/clsp
STAMP  := $(VENV)/.installed

# The embedded default run. Override on the command line, e.g.
# `make synth SOURCE=cifar10:/data/cifar MODEL=google/ddpm-cifar10-32`: another source gets runs/ of its own
# (runs/cifar10) and the paper's settings (below) instead of the embedded preset.
SOURCE ?= digits
RUN    ?= runs/$(firstword $(subst :, ,$(SOURCE)))
PRESET ?= $(if $(filter digits,$(SOURCE)),--preset embedded,)
# Another source trains and scores with the paper's settings: SimCLR's CIFAR-10 schedule (--preset paper-cifar10: 1000
# epochs, batch 1024; other methods take their own defaults) and the authors' 100-epoch probe (--preset paper).
PAPER_TRAIN = $(if $(filter simclr,$(METHOD)),--preset paper-cifar10,)
TRAIN_PRESET ?= $(if $(filter digits,$(SOURCE)),--preset embedded,$(PAPER_TRAIN))
EVAL_PRESET ?= $(if $(filter digits,$(SOURCE)),,--preset paper)
# The embedded generator ships with the project (its card.json says how it was made and what it scores);
# `make generator` retrains it from scratch into $(RUN)/generator, and
# `make synth train eval MODEL=runs/digits/generator RUN=runs/digits-retrained` uses that one (in folders of its own).
SHIPPED := generators/digits-16px
MODEL  ?= $(SHIPPED)
SHARDS ?= $(RUN)/shards
METHOD ?= simclr
POSITIVES ?= synthetic
TRAIN_OUT ?= $(RUN)/train/$(METHOD)-$(POSITIVES)-seed0

.PHONY: setup generator synth train eval sweep study test bench bench-gpu clean

setup: $(STAMP)

# torch is pinned to the build that installs offline on CPU machines; a GPU user installs the torch build
# for their CUDA first and then `pip install -e .` (README). Where pip's index offers only the default torch build
# (with its CUDA packages), `make setup TORCH_INDEX=https://download.pytorch.org/whl/cpu` takes the small CPU one.
TORCH_INDEX ?=
$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt $(if $(TORCH_INDEX),--extra-index-url $(TORCH_INDEX)) -e '.[test]'
	touch $(STAMP)

# About 46 min on one CPU thread. Float sums depend on the CPU, the thread count and the versions, so the weights match
# the shipped ones bit for bit only where those match its card (one thread, as here); the last line compares.
generator: setup
	OMP_NUM_THREADS=1 $(CLSP) diffusion train digits --out $(RUN)/generator --preset embedded --resume
	$(CLSP) diffusion eval $(RUN)/generator
	$(PY) -c 'import json, sys; a, b = (json.load(open(f + "/card.json"))["weights_sha256"] for f in sys.argv[1:]); \
	print("weights sha256: retrained", a[:16], "shipped", b[:16], "(identical)" if a == b else "(differ)")' \
	$(RUN)/generator $(SHIPPED)

synth: setup
	$(CLSP) synth run $(SOURCE) --model $(MODEL) --out $(SHARDS) $(PRESET)
	$(CLSP) shards verify $(SHARDS)

train: setup
	$(CLSP) train run $(SHARDS) --out $(TRAIN_OUT) --method $(METHOD) --positives $(POSITIVES) $(TRAIN_PRESET) --resume

eval: setup
	$(CLSP) eval all $(TRAIN_OUT) --shards $(SHARDS) --source $(SOURCE) --out $(RUN)/report $(EVAL_PRESET)

# SimCLR x positives none/augment/synthetic x seeds 0-4, each scored by 5-fold over every labelled image (about 40 min
# on 2 CPU cores once the shards exist, README "Measured"); `make study STUDY_METHODS=simclr,moco` adds MoCo v2+
# (twice the time).
STUDY_METHODS ?= simclr
STUDY_JOBS ?= 2
# another source: `clsp train run`'s defaults for every method (set the schedule with --train-option) and the paper's
# probe, the study's form of the paper's settings
STUDY_PRESET ?= $(if $(filter digits,$(SOURCE)),,--preset paper)
# Class agreement against hardness of the positives for w in {0, 0.05, 0.1, 0.2, 0.5, 1} x 16 and 50 DDIM steps.
sweep: setup
	$(CLSP) eval sweep $(MODEL) --source $(SOURCE) --out $(RUN)/sweep --anchors 64 --steps 16,50

study: setup
	$(CLSP) synth run $(SOURCE) --model $(MODEL) --out $(SHARDS) $(PRESET)
	$(CLSP) eval study $(SHARDS) --source $(SOURCE) --out $(RUN)/study --methods $(STUDY_METHODS) $(STUDY_PRESET) \
		--jobs $(STUDY_JOBS)

test: setup
	$(PY) -m pytest -q

bench: setup
	$(PY) -m clsp.synth.bench
	$(PY) -m clsp.train.bench

# The README's GPU figures, on a CUDA machine, in the environment that holds your CUDA torch and clsp (not .venv, whose
# torch is the CPU build): `make bench-gpu GPU_PY=python`. Each command writes its JSON under $(GPU_RESULTS); the last
# line fills the README's tables from those files. Each measurement is also a target of its own
# (`make bench-gpu-sampler-compiled GPU_PY=python`, a few minutes each), to run them one at a time.
GPU_PY      ?= python3
GPU_RESULTS ?= bench/results/gpu
SAMPLER_GPU := -m clsp.synth.bench --model ddpm-cifar10 --device cuda --steps 100 --batch 1024 --k 8 --repeats 1
TRAINER_GPU := -m clsp.train.bench --device cuda --batch 512 --steps 20 --anchors 8192 --repeats 2
GPU_BENCHES := bench-gpu-sampler-eager bench-gpu-sampler-compiled bench-gpu-trainer-eager bench-gpu-trainer-compiled
.PHONY: $(GPU_BENCHES)
bench-gpu:  # one after another, also under make -j: measurements that share the GPU would spoil each other
	$(foreach bench,$(GPU_BENCHES),$(MAKE) --no-print-directory $(bench) &&) true
	$(GPU_PY) -m clsp.bench_report
bench-gpu-sampler-eager:
	$(GPU_PY) $(SAMPLER_GPU) --out $(GPU_RESULTS)/sampler-eager.json
bench-gpu-sampler-compiled:
	$(GPU_PY) $(SAMPLER_GPU) --compile --out $(GPU_RESULTS)/sampler-compiled.json
bench-gpu-trainer-eager:
	$(GPU_PY) $(TRAINER_GPU) --out $(GPU_RESULTS)/trainer-eager.json
bench-gpu-trainer-compiled:
	$(GPU_PY) $(TRAINER_GPU) --compile --out $(GPU_RESULTS)/trainer-compiled.json

# Removes the environment and caches only: generators, shards and runs under runs/ cost hours and are kept.
clean:
	rm -rf $(VENV) .pytest_cache
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
