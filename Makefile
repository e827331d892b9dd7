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
# Where pip looks for torch: empty (default) keeps pip's own index, e.g.
# make demo TORCH_INDEX=https://download.pytorch.org/whl/cpu picks the CPU wheel on any Linux.
TORCH_INDEX ?=

.PHONY: demo test test-quick bench clean

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# Pin PyTorch first. On PyPI a Linux torch==2.13.0 is the CUDA build (several GB of nvidia-*
	# packages) unless pip finds a local CPU wheel; TORCH_INDEX=https://download.pytorch.org/whl/cpu
	# asks for the CPU build.
	$(BIN)/pip install -q torch==2.13.0 $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
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
