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

test: install
	$(PY) -m pytest -q tests

# Data preparation (the embedded demo corpus), pretraining a tiny LLaMA, conversion to Hugging Face.
demo: install
	$(PY) -m llmhift.datasets.demo_data demo_runs/data
	$(PY) train.py yamls/demo/pretrain.yaml
	$(PY) -m llmhift.utils.composer_to_hf save_composer_to_hf demo_runs/demo-pretrain/checkpoints/latest-rank0.pt demo_runs/demo-pretrain/hf overwrite=true
	$(PY) -m llmhift.utils.test_composer_hf_eq demo_runs/demo-pretrain/hf demo_runs/demo-pretrain/checkpoints/latest-rank0.pt
	@echo "checkpoint: demo_runs/demo-pretrain/checkpoints/latest-rank0.pt; Hugging Face model: demo_runs/demo-pretrain/hf"

clean:
	rm -rf $(VENV) *.egg-info demo_runs
