# dyngate make targets. `make demo` and `make test` work on a fresh machine (they run `make setup` first).
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
DYNGATE := $(BIN)/dyngate
# Data: ../shared/data when it exists (SST-2, CoNLL-2003); override with DATA=folder or DATA=hf:<datasets id>.
DATA ?= $(if $(DYNGATE_DATA),$(DYNGATE_DATA),$(wildcard ../shared/data))
DATA_FLAG := $(if $(DATA),--data $(DATA),)
# `make demo PRESETS="distilbert-6l vit-tiny deberta-tiny"` serves the 6-layer preset (trained once, then cached).
PRESETS ?= distilbert-tiny vit-tiny deberta-tiny
TECHNIQUES ?= fp32,torchscript
REPOSITORY ?= model_repository
HTTP_PORT ?= 8000
GRPC_PORT ?= 8001
METRICS_PORT ?= 8002
GATEWAY_PORT ?= 7860
PYTEST_ARGS ?=

.PHONY: setup browser demo build serve gateway test bench report clean distclean triton-container

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]'
	touch $@

# Debian's Chromium for the browser tests (never a downloaded browser build).
browser:
	@command -v chromium >/dev/null || (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver)

BUILD = $(DYNGATE) build $(foreach p,$(PRESETS),--model $(p)) --techniques $(TECHNIQUES) --repository $(REPOSITORY) $(DATA_FLAG)
build: setup
	$(BUILD)

serve: setup
	$(DYNGATE) serve --repository $(REPOSITORY) --http-port $(HTTP_PORT) --grpc-port $(GRPC_PORT) --metrics-port $(METRICS_PORT)

gateway: setup
	$(DYNGATE) gateway --repository $(REPOSITORY) --triton 127.0.0.1:$(GRPC_PORT) --triton-http 127.0.0.1:$(HTTP_PORT) --port $(GATEWAY_PORT) \
	  --metrics-url http://127.0.0.1:$(METRICS_PORT)/metrics

# Builds the presets' variants unless the repository has them all, built alike (`make build` rebuilds), then starts
# Triton and the gateway; both stop on Ctrl-C or when Triton cannot be kept serving.
DEMO_ENV = REPOSITORY=$(REPOSITORY) HTTP_PORT=$(HTTP_PORT) GRPC_PORT=$(GRPC_PORT) METRICS_PORT=$(METRICS_PORT) \
	GATEWAY_PORT=$(GATEWAY_PORT) DYNGATE=$(DYNGATE)
demo: setup
	$(DEMO_ENV) bash scripts/demo.sh --check-ports
	$(BUILD) --skip-existing
	$(DEMO_ENV) bash scripts/demo.sh

test: setup browser
	DYNGATE_DATA=$(DATA) $(BIN)/python -m pytest -q $(PYTEST_ARGS)

# PyTorch eager / ONNX Runtime FP32 / ONNX Runtime INT8 baselines and every built variant (in process and
# through Triton gRPC), batch 1 and 8, interleaved, BENCH_REPEATS runs; plus the DistilBERT-base architecture
# section (BENCH_BASE=0 skips it). BENCH_THREADS: in-process intra-op threads (1: on small hosts torch's pool
# collapses beside Triton's processes; 0 = library default). Writes $(BENCH_OUT)/bench.md and bench.json.
BENCH_REQUESTS ?= 100
BENCH_REPEATS ?= 3
BENCH_BASE ?= 1
BENCH_BASE_REQUESTS ?= 30
BENCH_THREADS ?= 1
BENCH_OUT ?= reports
# The model of DistilBERT's depth the bench builds first (trained once, 28 min measured on a busy 2-core machine, then reused from the
# cache) and the variants it compares there; BENCH_MODEL= (empty) measures the repository as it is.
BENCH_MODEL ?= distilbert-6l
BENCH_TECHNIQUES ?= fp32,int8-dynamic,int8-static,smoothquant,zeroquant-w8a8,zeroquant-w4a8,early-exit,stacked
bench: setup
	$(if $(BENCH_MODEL),$(DYNGATE) build --model $(BENCH_MODEL) --techniques $(BENCH_TECHNIQUES) --repository $(REPOSITORY) $(DATA_FLAG) --threads $(BENCH_THREADS),)
	$(DYNGATE) bench --repository $(REPOSITORY) $(DATA_FLAG) --requests $(BENCH_REQUESTS) \
	  --repeats $(BENCH_REPEATS) --threads $(BENCH_THREADS) --out $(BENCH_OUT) \
	  $(if $(filter 1,$(BENCH_BASE)),--base --base-requests $(BENCH_BASE_REQUESTS),)
	@grep '^\*\*Headline' $(BENCH_OUT)/bench.md || true

# Every built variant through Triton gRPC at batch 1 and 8 with accuracy, size, server CPU/RSS: reports/ (md, json, png).
REPORT_DIR ?= reports
REPORT_REQUESTS ?= 100
BUDGET_PT ?= 1.0
report: setup
	$(DYNGATE) report --repository $(REPOSITORY) $(DATA_FLAG) --requests $(REPORT_REQUESTS) --budget-pt $(BUDGET_PT) --out $(REPORT_DIR)

# NVIDIA's tritonserver container on a GPU host, same repository (needs Docker with the NVIDIA runtime).
triton-container:
	REPOSITORY=$(abspath $(REPOSITORY)) HTTP_PORT=$(HTTP_PORT) GRPC_PORT=$(GRPC_PORT) METRICS_PORT=$(METRICS_PORT) \
	bash scripts/triton_container.sh

clean:
	find $(REPOSITORY) -mindepth 1 -maxdepth 1 ! -name README.md -exec rm -rf {} +
	rm -rf .pytest_cache

distclean: clean
	rm -rf $(VENV) .cache

# ZeRO stages 0-3 with 2 ranks (torchrun, gloo, CPU) on the distilbert-tiny preset: per-rank bytes measured.
.PHONY: zero-report
zero-report: setup
	DYNGATE_DATA=$(DATA) $(DYNGATE) zero-report --cache-dir $(or $(DYNGATE_CACHE),.cache)

# Load test: LOAD_CLIENTS concurrent clients for LOAD_SECONDS each against Triton (asyncio gRPC) and the gateway's
# POST /api/predict, with Triton's batching ratio; needs `make serve` and `make gateway` running. reports/load.{md,json}
LOAD_CLIENTS ?= 100
LOAD_SECONDS ?= 60
LOAD_MODEL ?= distilbert-tiny
LOAD_VARIANT ?= fp32
.PHONY: load
load: setup
	$(DYNGATE) load --triton 127.0.0.1:$(GRPC_PORT) --gateway http://127.0.0.1:$(GATEWAY_PORT) \
	  --model $(LOAD_MODEL) --variant $(LOAD_VARIANT) --clients $(LOAD_CLIENTS) --duration $(LOAD_SECONDS) \
	  $(DATA_FLAG) --out $(REPORT_DIR)

# Kubernetes manifests for the repository: a Kustomize base, cpu and gpu overlays (with the derived Triton image's
# Dockerfile each) and the queue-time HPA component, into DEPLOY_DIR. `kubectl apply -k $(DEPLOY_DIR)/overlays/cpu`.
# MODEL_STORE: pvc (a PersistentVolumeClaim) or s3://, gs://, as:// (Triton reads the repository itself).
DEPLOY_DIR ?= deploy/k8s
MODEL_STORE ?= pvc
.PHONY: deploy
deploy: setup
	$(DYNGATE) deploy kubernetes --repository $(REPOSITORY) --out $(DEPLOY_DIR) --model-store $(MODEL_STORE)
