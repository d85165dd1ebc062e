# syntax=docker/dockerfile:1
# One image for every role of a team deployment (docker-compose.yml): the search driver, the Ray head
# and the Ray workers that evaluate candidates, and the MLflow tracking server. Ray wants the same
# Python, Ray and rsdet-compress on the driver and on every worker: build once, run it everywhere.
#
#   docker build -t rsdet-compress .                                   # CPU, on python:3.11-slim
#   docker build -t rsdet-compress:cuda \
#       --build-arg BASE=nvidia/cuda:13.0.1-cudnn-runtime-ubuntu24.04 .  # GPU workers (docker run --gpus all)
#   docker run --rm -v /path/to/data:/data:ro -v $PWD/runs:/app/runs rsdet-compress models
#   docker run --rm rsdet-compress ray --version                        # `ray ...` and `mlflow ...` run as they are
#
# The registry's torch wheel carries its own CUDA libraries, so BASE only has to bring the driver
# interface (the CUDA runtime images do) and a Python >= 3.10; bases without one get Debian/Ubuntu's.
ARG BASE=python:3.11-slim
FROM ${BASE}

# what the image installs besides the core: the OpenVINO runtime, the MLflow server's PostgreSQL and S3
# clients, Ray
ARG EXTRAS=openvino,server,cluster

ENV DEBIAN_FRONTEND=noninteractive PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONUNBUFFERED=1
# libgl1 + libglib2.0-0: OpenCV (ultralytics, albumentations); python3-venv only where BASE has no Python
RUN apt-get update \
    && apt-get install -y --no-install-recommends libgl1 libglib2.0-0 \
    && if ! python3 -c "import venv, ensurepip" 2>/dev/null; then \
           apt-get install -y --no-install-recommends python3 python3-venv; fi \
    && rm -rf /var/lib/apt/lists/*
RUN python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH

WORKDIR /app
# dependencies first, in a layer of their own: a code change does not reinstall torch
COPY pyproject.toml README.md ./
RUN mkdir rsdet_compress && touch rsdet_compress/__init__.py \
    && pip install ".[${EXTRAS}]" && pip uninstall -y rsdet-compress && rm -rf rsdet_compress build
COPY rsdet_compress ./rsdet_compress
COPY configs ./configs
COPY scripts/docker-entrypoint.sh /usr/local/bin/rsdet-entrypoint
# a torchvision that does not match torch fails here, at build time, not in the first search
RUN pip install --no-deps . && rm -rf build \
    && python -c "import torch; from torchvision.ops import nms; nms(torch.zeros(1, 4), torch.ones(1), 0.5)"

# no downloads at run time (weights are local files, YOLO is built from its model YAML); data under
# /data (read-only is enough), outputs and the checkpoints a search reads under /app/runs: mount the
# same two paths on every machine so the driver's paths mean the same file on each worker
ENV YOLO_OFFLINE=1 RSDET_DATA=/data RSDET_RUNS=/app/runs
ENTRYPOINT ["rsdet-entrypoint"]
CMD ["--help"]
