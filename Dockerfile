# ragq image: one image for both the API (`ragq api`, the default) and the
# GPU workers (`ragq worker`); docker-compose.yml picks the command.
FROM python:3.11-slim

# RAGQ_HOST: listen on all interfaces inside the container (ragq's default is 127.0.0.1).
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    RAGQ_HOST=0.0.0.0 \
    RAGQ_PORT=8000 \
    RAGQ_DATA_DIR=/data/ragq \
    HF_HOME=/cache/huggingface

# Unprivileged runtime user. The data and cache directories exist in the image,
# owned by that user, so named volumes mounted there start out writable by it.
RUN useradd --create-home --uid 10001 --user-group ragq \
 && mkdir -p /data/ragq /cache/huggingface \
 && chown -R ragq:ragq /data /cache

WORKDIR /app

# Only what the package build needs (see .dockerignore). torch comes from
# PyPI's default (CUDA-enabled) wheel, so the image is large but GPU-ready.
COPY pyproject.toml README.md ./
COPY api ./api
COPY worker ./worker
COPY shared ./shared
COPY cli ./cli
RUN pip install --no-cache-dir .

USER ragq

EXPOSE 8000

CMD ["ragq", "api"]
