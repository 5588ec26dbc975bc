# `make run`: create .venv, install, reproduce the pipeline on the active profile (params.yaml) with MLflow lineage
#             (`cyclepref repro` = `dvc repro` + a parent run), then register the reward model it trained.
# `make test`: create .venv, install, run the tests.
# `make bench`: every CPU benchmark, five processes each (about 10 minutes) -> bench/results.json, bench/RESULTS.md.
# `make scale`: the scale run (about two hours of CPU): configs/scale.yaml's pairs, then tasks.scale_ablation
#               -> reports/scale/; the active profile and the workspace's outputs are restored afterwards.
# `make clean`: remove the pipeline's outputs and work store, keeping the MLflow registry (mlflow.db, mlruns/).
# `make clean-all`: `make clean`, and the MLflow registry with its runs, models and aliases.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
# The torch pin is passed to every pip call so that no dependency pulls another build (override on GPU machines).
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
STAMP := $(VENV)/.installed

export PATH := $(abspath $(VENV))/bin:$(PATH)
export HF_HUB_OFFLINE ?= 1
export TRANSFORMERS_OFFLINE ?= 1
export HF_DATASETS_OFFLINE ?= 1
export HF_HUB_DISABLE_TELEMETRY := 1
export TOKENIZERS_PARALLELISM := false
export DVC_NO_ANALYTICS := 1
export GX_ANALYTICS_ENABLED := false
export MLFLOW_DISABLE_TELEMETRY := true
export DO_NOT_TRACK := true
export PREFECT_SERVER_ANALYTICS_ENABLED := false

.PHONY: run test install bench report scale clean clean-all

run: $(STAMP)
	cyclepref repro
	cyclepref register

test: $(STAMP)
	python -m pytest

report: $(STAMP)
	cyclepref report

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install -q --upgrade pip $(TORCH_SPEC)
	$(VENV)/bin/python -m pip install -q $(TORCH_SPEC) -e ".[test]"
	touch $@

bench: $(STAMP)
	python bench/run_all.py

scale: $(STAMP)
	cp params.yaml .before-scale.params.yaml && cp dvc.lock .before-scale.dvc.lock
	cyclepref profile use scale
	dvc repro gate@pairs && python -m tasks.scale_ablation; status=$$?; \
	  mv .before-scale.params.yaml params.yaml && mv .before-scale.dvc.lock dvc.lock && dvc checkout -q; exit $$status

clean:
	rm -rf data/world/inputs data/zoo data/prepared data/work data/i2t data/t2i data/pairs data/export data/reward data/downstream

clean-all: clean
	rm -rf mlruns mlflow.db
