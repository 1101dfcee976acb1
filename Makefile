# make serve  - create .venv, install, download Qwen2.5-14B-Instruct if no model is configured, serve on :8000
# make test   - create .venv, install with test tools, run the tests (what CI runs)
# make tiny-model / make demo-model - a local model for a CPU and no network: random weights in seconds /
#               trained here in 2-4 min to call get_weather (then INFERENCE_MODEL_ID=models/demo make serve)
# make cluster - Redis, 2 replicas (tiny model, CPU) and HAProxy on :8080 (scripts/cluster.py)
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: install install-dev serve test tiny-model demo-model bench bench-cpu cluster clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

$(VENV)/.installed: requirements.txt | $(BIN)/python
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -r requirements.txt
	touch $@

# Triton: the CUDA build of torch ships its own; on a CPU box the NF4 kernel tests run it as an interpreter.
$(VENV)/.installed-dev: requirements-dev.txt $(VENV)/.installed
	$(BIN)/pip install -q -r requirements-dev.txt
	$(BIN)/python -c "import triton" 2>/dev/null || $(BIN)/pip install -q triton==3.9.0
	touch $@

install: $(VENV)/.installed
install-dev: $(VENV)/.installed-dev

serve: $(VENV)/.installed
	@if [ -z "$$INFERENCE_MODEL_ID" ] && ! grep -qs '^INFERENCE_MODEL_ID=' .env && [ ! -f Qwen-14B/config.json ]; then \
		echo "No model configured: downloading one (scripts/download_14b_model.py: the 14B with a GPU, else the 0.5B)"; \
		$(BIN)/python scripts/download_14b_model.py; \
	fi
	$(BIN)/python server_starlette.py

test: $(VENV)/.installed-dev
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# GPU: random weights of the real Qwen2.5-14B shape in NF4, 1/8/32/64 streams, the seed design and the server path
bench: $(VENV)/.installed-dev
	$(BIN)/python scripts/bench.py --random-weights --server --out bench.json

# CPU: the tiny shape, 1 and 8 streams (no GPU needed)
bench-cpu: $(VENV)/.installed-dev
	$(BIN)/python scripts/bench.py --size tiny --threads 1 --server --out bench-cpu.json

# Redis + 2 replicas (tiny model, CPU) + HAProxy on :8080, for demos (Debian's redis-server and haproxy)
cluster: $(VENV)/.installed
	bash scripts/install_services.sh $(VENV)
	$(BIN)/python scripts/cluster.py $(CLUSTER_ARGS)

tiny-model: $(VENV)/.installed
	$(BIN)/python scripts/make_tiny_model.py models/tiny

demo-model: $(VENV)/.installed
	$(BIN)/python scripts/make_demo_model.py models/demo

clean:
	rm -rf $(VENV) .pytest_cache
