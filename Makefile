# `make test` and `make demo` each create .venv if it is missing, install the pinned set, and run.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1
export WANDB_MODE ?= offline
export TOKENIZERS_PARALLELISM := false

.PHONY: install test demo tiny clean

$(STAMP): requirements.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt
	$(PY) -m pip install -q --no-deps -e .
	$(PY) -c "import torch, torchaudio, transformers, pytorch_lightning, peft, xllm"
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q tests

# Tiny random models + a generated shapes data set (the embedded default until the real-weights demo lands).
tiny: $(STAMP)
	$(PY) -m xllm.data.tiny --out .cache/tiny

demo: tiny
	$(PY) train.py fit --config configs/tiny_stage0.yaml
	$(PY) train.py fit --config configs/tiny_stage1.yaml
	$(PY) train.py fit --config configs/tiny_stage2.yaml
	$(PY) evaluate.py --adapter runs/tiny_stage2/adapter --data .cache/tiny/data/test_yesno.jsonl \
		--media_root .cache/tiny/data --output runs/tiny_stage2/eval.json

clean:
	rm -rf runs .cache lightning_logs wandb
