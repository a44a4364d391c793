# engram-mem: `make demo` runs the whole story on an embedded local cluster; `make test` runs the tests.
# Both create .venv and install what they need (torch is pinned to 2.13.0, CPU build where no GPU).

PY ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup demo test test-unit test-integration proto bench clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e '.[dev]'
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(BIN)/engram-demo $(ARGS)

test: $(STAMP)
	$(BIN)/python -m pytest -q tests $(ARGS)

test-unit: $(STAMP)
	$(BIN)/python -m pytest -q tests/unit $(ARGS)

test-integration: $(STAMP)
	$(BIN)/python -m pytest -q tests/integration $(ARGS)

proto: $(STAMP)
	$(BIN)/python proto/generate.py

bench: $(STAMP)
	$(BIN)/python bench/bench_memory.py
	$(BIN)/python bench/bench_tiers.py
	$(BIN)/python bench/bench_prefill.py
	$(BIN)/python bench/bench_decode.py
	$(BIN)/python bench/bench_train_step.py
	$(BIN)/python bench/bench_serving.py

clean:
	rm -rf $(VENV) runs .pytest_cache
