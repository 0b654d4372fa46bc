# Two commands do all set-up on a fresh machine:  make demo  (the tiny end-to-end pipeline)  and  make test.
VENV ?= .venv
PY := $(VENV)/bin/python
# The CPU build is enough for the demo and the tests; on a GPU machine: make setup TORCH_SPEC=torch
TORCH_SPEC ?= torch==2.13.0

.PHONY: setup demo test lint clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

demo: setup
	$(VENV)/bin/snakemake --cores all --profile profiles/local
	$(VENV)/bin/snakemake --cores 1 --report results/tiny_demo/report.html

test: setup
	$(VENV)/bin/pytest -q

lint: setup
	$(VENV)/bin/ruff check src tests benchmarks
	$(VENV)/bin/ruff format --check src tests benchmarks
	$(VENV)/bin/snakefmt --check Snakefile
	$(VENV)/bin/snakemake --lint

clean:
	rm -rf results checkpoints/tiny .snakemake
