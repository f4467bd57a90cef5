# Linmod serving image: the FastAPI service and the shipped ONNX model, without torch.
#
# onnxruntime-gpu 1.31 needs CUDA 13 and cuDNN 9 at run time and silently runs on
# the CPU without them, so the default base carries both. Any Debian or Ubuntu
# image works as BASE_IMAGE (Python is installed from the distribution when the
# base lacks it); a base without CUDA serves on the CPU only.
#
#   online:   docker build -t linmod .
#   offline:  put wheels for the base's Python in wheels/ (`make docker-wheels`), then
#             docker build --build-arg WHEELS=wheels -t linmod .
#
# Run: docker run --gpus all -p 8000:8000 -v linmod-data:/data linmod
#      (on a host without a GPU add `-e LINMOD_DEVICE=cpu`; see docker-compose.yml)
ARG BASE_IMAGE=nvidia/cuda:13.0.2-cudnn-runtime-ubuntu24.04

# --- Python from the base or its distribution --------------------------------
FROM ${BASE_IMAGE} AS python
ENV DEBIAN_FRONTEND=noninteractive \
    LANG=C.UTF-8 \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
# Distribution packages follow the base's release; pinning them would break on the next point release.
# hadolint ignore=DL3008
RUN if ! python3 -c 'import ensurepip, tomllib, venv' 2>/dev/null; then \
        apt-get update \
        && apt-get install -y --no-install-recommends python3 python3-venv \
        && rm -rf /var/lib/apt/lists/*; \
    fi

# --- serving dependencies in a virtual environment ----------------------------
FROM python AS deps
# Empty: install from the package index. A directory of the build context
# (e.g. wheels): install from it alone, with no network.
ARG WHEELS=""
WORKDIR /build
# With WHEELS set this also copies that directory's wheels into /build.
COPY pyproject.toml ${WHEELS} ./
# The default dependencies of pyproject.toml (the serving stack, no torch) and its postgres
# extra: replicas behind a load balancer share batch jobs through PostgreSQL.
RUN python3 -c 'import tomllib; p = tomllib.load(open("pyproject.toml", "rb"))["project"]; deps = p["dependencies"] + p["optional-dependencies"]["postgres"]; open("requirements.txt", "w").write("\n".join(deps) + "\n")' \
    && python3 -m venv /opt/venv \
    && if [ -n "${WHEELS}" ]; then set -- --no-index --find-links /build; fi \
    && /opt/venv/bin/python -m pip install --no-cache-dir --disable-pip-version-check "$@" -r requirements.txt

# --- runtime --------------------------------------------------------------------
FROM python AS runtime
LABEL org.opencontainers.image.title="linmod" \
      org.opencontainers.image.description="Linformer content-moderation inference service (ONNX Runtime)" \
      org.opencontainers.image.licenses="Apache-2.0"
RUN groupadd --gid 10001 linmod \
    && useradd --no-log-init --uid 10001 --gid linmod --home-dir /app --no-create-home --shell /usr/sbin/nologin linmod \
    && mkdir -p /app /data \
    && chown linmod:linmod /data

# Dependencies first, then the model, then the code: the layers that change most come last.
COPY --from=deps /opt/venv /opt/venv
COPY model/artifacts/spamassassin-linformer-distilled/ /app/model/
COPY service/ /app/service/

# ORT_DISABLE_TELEMETRY: a self-hosted (often air-gapped) service sends nothing home.
ENV PATH=/opt/venv/bin:${PATH} \
    PYTHONPATH=/app \
    ORT_DISABLE_TELEMETRY=1 \
    LINMOD_MODEL_DIR=/app/model \
    LINMOD_DATABASE_URL=sqlite:////data/jobs.db \
    LINMOD_HOST=0.0.0.0 \
    LINMOD_PORT=8000 \
    LINMOD_DEVICE=auto \
    LINMOD_LOG_FORMAT=json

WORKDIR /app
USER 10001:10001
# The batch-job database (SQLite by default); jobs survive restarts and upgrades.
VOLUME ["/data"]
EXPOSE 8000

# Ready means the model is loaded and warmed; the start period covers that.
HEALTHCHECK --interval=10s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/ready' % os.environ.get('LINMOD_PORT', '8000'), timeout=4)"]

CMD ["python", "-m", "service.cli"]
