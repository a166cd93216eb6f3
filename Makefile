# One entry point for setting up and checking the project on a fresh machine.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
# The CPU build of torch lies on this disk; installing it first keeps pip from pulling a CUDA build.
TORCH  ?= torch==2.13.0

.PHONY: setup test demo clean

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

setup: $(VENV)/.installed

test: setup
	$(PY) -m pytest -n 2

# The main job: train a small GateLoop language model on Shakespeare, then generate from it
# (each run gets its own runs/gateloop-<time>/; runs/latest points at the newest).
demo: setup
	$(VENV)/bin/gateloop train
	$(VENV)/bin/gateloop generate --prompt "ROMEO:" --max-new-tokens 300

clean:
	rm -rf $(VENV) runs .pytest_cache
