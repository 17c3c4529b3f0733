# Two commands on a fresh machine:  make demo  (install + pre-train on generated data)
#                                   make test  (install + run the test suite)
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp

.PHONY: demo test lint bench clean

$(STAMP): setup.cfg pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/beit-lightning experiment=smoke

test: $(STAMP)
	$(BIN)/python -m pytest -q

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks

bench: $(STAMP)
	$(BIN)/python benchmarks/masking.py
	$(BIN)/python benchmarks/data_throughput.py
	$(BIN)/python benchmarks/pretrain_step.py

clean:
	rm -rf $(VENV) outputs multirun .pytest_cache
