# The two commands of the README: `make test` and `make demo`. Both create .venv when it is missing.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: test demo install clean

install: $(VENV)/.installed

# Reinstalls when setup.py changes; the stamp keeps a warm checkout from paying ~3 min again.
$(VENV)/.installed: setup.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	touch $@

# Lint first (pyproject's ruff rules; seconds), then the tests, tests/test_layers.py's import-layer check included.
test: install
	$(PY) -m ruff check llmhift tests train.py scripts bench
	$(PY) -m pytest -q tests

# The whole pipeline in miniature (scripts/demo_pipeline.py prints every command it runs): demo data,
# pretraining, pruning with dynamic loading, post-processing, continued pretraining, HF conversion,
# HiFT, generation with transformers, and the run report.
demo: install
	$(PY) scripts/demo_pipeline.py --root demo_runs

clean:
	rm -rf $(VENV) *.egg-info demo_runs
