# `make run` starts a cluster, loads a demo table, queries it and shows where its partitions
# live (the main job); `make test` runs the whole suite. Both create .venv on first use.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: run sim test lint bench bench-tpch clean

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test,bench]'
	touch $@

run: $(BIN)/.installed
	$(BIN)/dcluster status >/dev/null 2>&1 || $(BIN)/dcluster up --cores 3 --oversubscribe
	$(BIN)/dcluster demo
	$(BIN)/dcluster status

sim: $(BIN)/.installed
	$(BIN)/python -m chaos.sim --seeds 1..20 --nodes 5 --verbose

test: $(BIN)/.installed
	$(BIN)/python -m pytest -q -n 2
	$(BIN)/ruff check .
	$(BIN)/mypy

bench: $(BIN)/.installed
	$(BIN)/python -m benchmarks.raft_core
	$(BIN)/python -m benchmarks.transport
	$(BIN)/python -m benchmarks.raft
	$(BIN)/python -m benchmarks.ingest

# TPC-H sf 1 on a 2-worker cluster beside DuckDB; the data is generated once and cached.
bench-tpch: $(BIN)/.installed
	$(BIN)/python -m benchmarks.tpch --sf 1

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache .mypy_cache .ruff_cache
