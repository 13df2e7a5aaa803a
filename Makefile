# The two fresh-machine commands: `make demo` and `make test`. Each sets up its own venv.
# On a CPU machine, torch==2.13.0 resolves to the CPU wheel (no multi-GB CUDA download);
# on a GPU machine set TORCH_SPEC=torch (or any pin) to get the CUDA build.
PY ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
BIN := $(VENV)/bin
BASE := $(VENV)/.kiln-base
TESTDEPS := $(VENV)/.kiln-test

.PHONY: setup setup-test demo test clean

$(BASE): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q $(TORCH_SPEC)
	$(BIN)/pip install -q -e .
	touch $(BASE)

# Tests also install the references Kiln is checked against (tiktoken, HF tokenizers and
# transformers, rustbpe, Triton for the kernel interpreter), the data-curation extras and scipy
# for the scaling-law fits.
$(TESTDEPS): $(BASE)
	$(BIN)/pip install -q -e ".[dev,data,ray,scaling]"
	touch $(TESTDEPS)

setup: $(BASE)
setup-test: $(TESTDEPS)

demo: $(BASE)
	$(BIN)/kiln demo $(ARGS)

# Triton kernels run on the CPU through Triton's interpreter (TRITON_INTERPRET=1).
test: $(TESTDEPS)
	TRITON_INTERPRET=1 $(BIN)/python -m pytest -n 2 -q $(ARGS)

clean:
	rm -rf $(VENV) runs .pytest_cache
