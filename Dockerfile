# psomerge on a GPU host: the pipeline environment plus a separate vLLM environment
# (vLLM's pins clash with Prefect's FastAPI pin, so they cannot share one).
#   docker build -t psomerge .
#   docker run --gpus all -v $PWD/models:/models -v $PWD/psomerge-home:/data psomerge run configs/llama-7b.yaml
FROM nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04

ENV DEBIAN_FRONTEND=noninteractive PIP_NO_CACHE_DIR=1 PYTHONUNBUFFERED=1 \
    PSOMERGE_HOME=/data PSOMERGE_VLLM_PYTHON=/opt/vllm/bin/python HF_HUB_OFFLINE=1
RUN apt-get update && apt-get install -y --no-install-recommends \
        python3 python3-venv python3-dev build-essential bubblewrap git \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /opt/psomerge
COPY pyproject.toml README.md ./
COPY psomerge ./psomerge
COPY configs ./configs

# Pipeline environment: psomerge with Prefect, MLflow, judges, Ray runner (CUDA torch wheel).
RUN python3 -m venv /opt/venv \
    && /opt/venv/bin/pip install --upgrade pip \
    && /opt/venv/bin/pip install torch==2.13.0 \
    && /opt/venv/bin/pip install '.[pipelines,judges,gguf,ray,lm-eval]'

# vLLM environment: psomerge[vllm], used for judge servers and the generation engine.
RUN python3 -m venv /opt/vllm \
    && /opt/vllm/bin/pip install --upgrade pip \
    && /opt/vllm/bin/pip install '.[vllm]'

ENV PATH=/opt/venv/bin:$PATH
VOLUME ["/data"]
ENTRYPOINT ["psomerge"]
CMD ["--help"]
