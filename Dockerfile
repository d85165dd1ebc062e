# CPU image of rsdet-compress (finished in the deployment issue).
#   docker build -t rsdet-compress .
#   docker run --rm -v /path/to/data:/data -e RSDET_DATA=/data -v $PWD/runs:/app/runs rsdet-compress models
FROM python:3.11-slim
RUN apt-get update && apt-get install -y --no-install-recommends libgl1 libglib2.0-0 \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /app
COPY pyproject.toml README.md ./
COPY rsdet_compress ./rsdet_compress
COPY configs ./configs
RUN pip install --no-cache-dir .
ENV YOLO_OFFLINE=1 RSDET_DATA=/data
ENTRYPOINT ["rsdet-compress"]
CMD ["--help"]
