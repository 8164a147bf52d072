# Two commands on a fresh machine:  make demo  |  make test
# Both create .venv (scripts/setup_venv.sh; CPU torch unless TORCH_SPEC says otherwise).
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: setup demo test test-unit lint bench params clean

setup:
	bash scripts/setup_venv.sh

demo: setup
	$(PY) jobs/demo.py

# Two test processes (pytest-xdist), each taking whole modules (`--dist loadfile`: a module's
# Ray cluster and fixtures stay in one process). On 2 cores the suite is CPU-bound; waits for
# Ray start-up, subprocesses and HTTP overlap with the other process's work. Modules go out in
# collection order (--no-loadscope-reorder; xdist would otherwise send the modules with the most
# tests first and leave the two longest, the end-to-end runs in tests/integration, for the end).
TEST_WORKERS ?= 2
test: setup
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder --durations=25

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
