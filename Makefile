# The two fresh-machine commands: `make demo` and `make test`. Each sets up its own venv.
# On a CPU machine, torch==2.13.0 resolves to the CPU wheel (no multi-GB CUDA download);
# on a GPU machine set TORCH_SPEC="torch" (or any pin) to get the CUDA build.
PY ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
BIN := $(VENV)/bin
STAMP := $(VENV)/.kiln-installed

.PHONY: setup demo test clean

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "$(TORCH_SPEC)"
	$(BIN)/pip install -q -e ".[dev]"
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(BIN)/kiln demo $(ARGS)

test: $(STAMP)
	$(BIN)/python -m pytest -n 2 -q $(ARGS)

clean:
	rm -rf $(VENV) runs .pytest_cache
