# syntax=docker/dockerfile:1
# Two images from one file: `api` has no TensorFlow (small, fast to start); `worker` adds it.
#   docker build --target api -t secateurs-api .
#   docker build --target worker -t secateurs-worker .
FROM python:3.11-slim AS base
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    SECATEURS_DATA_DIR=/data
WORKDIR /srv
RUN useradd --create-home --uid 10001 secateurs \
 && mkdir -p /data && chown secateurs:secateurs /data
COPY pyproject.toml README.md ./
COPY app ./app
COPY worker ./worker

FROM base AS api
RUN pip install .
USER secateurs
EXPOSE 8000
HEALTHCHECK --interval=10s --timeout=3s --retries=5 \
  CMD python -c "import urllib.request,sys; sys.exit(urllib.request.urlopen('http://127.0.0.1:8000/healthz').status != 200)"
CMD ["secateurs", "serve", "--host", "0.0.0.0", "--port", "8000"]

FROM base AS worker
RUN pip install ".[worker]"
USER secateurs
ENV TF_CPP_MIN_LOG_LEVEL=2
CMD ["secateurs", "worker", "--concurrency", "1"]
