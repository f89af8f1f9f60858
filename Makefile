# loraflow: `make run` sets up and runs the default pipeline; `make test` sets up and runs the suite.
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
# The CPU build of torch; on a GPU machine use e.g. `make setup TORCH=torch==2.13.0` from a CUDA index.
TORCH  ?= torch==2.13.0
ARGS   ?=

.PHONY: setup run test test-fast clean docs

$(STAMP): pyproject.toml
	@test -x $(PY) || python3 -m venv $(VENV)
	@echo "==> installing loraflow into $(VENV) (first time: a few minutes)"
	$(VENV)/bin/pip install -q --disable-pip-version-check "$(TORCH)"
	$(VENV)/bin/pip install -q --disable-pip-version-check -e '.[test]'
	@touch $(STAMP)

setup: $(STAMP)

run: setup
	$(VENV)/bin/loraflow run $(ARGS)

test: setup
	$(PY) -m pytest -q $(ARGS)

test-fast: setup
	$(PY) -m pytest -q -m "not slow" $(ARGS)

clean:
	rm -rf outputs data/prepared reports/*.json reports/*.jsonl reports/*.csv reports/*.txt

docs: setup
	$(PY) -m loraflow.readme
