# The two fresh-machine commands: `make demo` and `make test`. Each sets up its own venv.
# On a CPU machine, torch==2.13.0 resolves to the CPU wheel (no multi-GB CUDA download);
# on a GPU machine set TORCH_SPEC=torch (or any pin) to get the CUDA build.
PY ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
BIN := $(VENV)/bin
BASE := $(VENV)/.kiln-base
TESTDEPS := $(VENV)/.kiln-test

.PHONY: setup setup-test demo test clean chromium

$(BASE): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q $(TORCH_SPEC)
	$(BIN)/pip install -q -e .
	touch $(BASE)

# Tests also install the server (FastAPI, uvicorn), the openai client and playwright (the chat page is
# tested in Debian's chromium, which `make test` installs; the test skips without it),
# the references Kiln is checked against (tiktoken, HF tokenizers and
# transformers, rustbpe, Triton for the kernel interpreter, lm-evaluation-harness for the adapter
# and prompt-agreement tests), the data-curation extras and scipy for the scaling-law fits.
$(TESTDEPS): $(BASE)
	$(BIN)/pip install -q -e ".[dev,data,ray,harness,serve,scaling]"
	touch $(TESTDEPS)

setup: $(BASE)
setup-test: $(TESTDEPS)

demo: $(BASE)
	$(BIN)/kiln demo $(ARGS)

# Triton kernels run on the CPU through Triton's interpreter (TRITON_INTERPRET=1).
# `make test` first tries to install Debian's chromium for the chat-page browser test (a machine
# where that is impossible still runs the suite: that one test then skips, saying why).
test: $(TESTDEPS)
	-@$(MAKE) --no-print-directory chromium
	TRITON_INTERPRET=1 $(BIN)/python -m pytest -n 2 -q $(ARGS)

# Debian's chromium for the chat-page browser test (playwright drives it; no browser download).
chromium:
	@command -v chromium >/dev/null || { SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -q && $$SUDO apt-get install -y -q --no-install-recommends chromium; }

clean:
	rm -rf $(VENV) runs .pytest_cache
