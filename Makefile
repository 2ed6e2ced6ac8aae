# Two commands on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test venv clean

demo: $(STAMP)
	$(BIN)/seesr-export demo --out out/demo

test: $(STAMP)
	$(BIN)/python -m pytest -q

venv: $(STAMP)

# torch first, from the pinned CPU build: anything else lets pip fetch a multi-GB CUDA torch.
$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -c constraints.txt torch==2.13.0
	$(BIN)/pip install -q -c constraints.txt -e '.[dev,quant]'
	# Only its CLIP BPE vocabulary file is used (to build tokenizer fixtures offline).
	$(BIN)/pip install -q --no-deps open_clip_torch==3.3.0
	touch $(STAMP)

clean:
	rm -rf $(VENV) out
