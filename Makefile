# Two commands on a fresh machine:  make demo  |  make test
# Both create .venv (scripts/setup_venv.sh; CPU torch unless TORCH_SPEC says otherwise).
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: setup demo test test-unit lint bench params clean

setup:
	bash scripts/setup_venv.sh

demo: setup
	$(PY) jobs/demo.py

test: setup
	$(PY) -m pytest -q --durations=25

test-unit: setup
	$(PY) -m pytest -q tests/unit

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

params: setup
	$(PY) jobs/count_params.py --preset preview

bench: setup
	$(PY) benchmarks/moe_layer.py

clean:
	rm -rf outputs .pytest_cache
