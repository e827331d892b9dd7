# Two entry points, each creating .venv and installing what it needs.
#   make demo  -> trains the default comparison (Loss-Free vs auxiliary loss) on the built-in corpus;
#                 ARGS passes options and overrides through, e.g. make demo ARGS="--seeds 3 train.threads=1";
#                 run it again after an interruption to continue where it stopped
#   make test  -> runs the test suite
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
OUT ?= runs/demo
ARGS ?=

.PHONY: demo test test-quick bench clean

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# Pin the CPU build of PyTorch first: a looser requirement pulls a several-GB CUDA build.
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/moebalance compare --out $(OUT) $(ARGS)

test: $(STAMP)
	$(BIN)/python -m pytest -q

test-quick: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow and not distributed"

bench: $(STAMP)
	$(BIN)/python benchmarks/run.py

clean:
	rm -rf $(VENV) runs build src/*.egg-info
