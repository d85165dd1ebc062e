#!/usr/bin/env bash
# The main job, end to end on the real Airbus satellite data (small settings, ~15 min on a 2-core CPU):
# prepare chips -> train YOLOv8n -> COCO mAP on the held-out split -> predict on an unseen scene.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export RSDET_DATA="${RSDET_DATA:-$(cd .. && pwd)/shared/data}"
export YOLO_OFFLINE=1
RS=.venv/bin/rsdet-compress
[ -f runs/data/airbus/data.yaml ] || $RS data prepare --config configs/airbus-prepare.yaml
$RS train --config configs/demo-yolov8n.yaml
$RS evaluate --weights runs/demo/yolov8n/weights/best.pt --data runs/data/airbus/data.yaml --split test
scene=$(ls "$RSDET_DATA"/airbus-aircraft/extras/*.jpg | head -n 1)
# the demo model trains ~10 min: a lower threshold than the default 0.25 shows what it already finds
$RS predict --weights runs/demo/yolov8n/weights/best.pt --source "$scene" --out runs/demo/predict --conf 0.1
echo "MLflow: .venv/bin/mlflow ui --backend-store-uri sqlite:///$(pwd)/runs/mlflow.db"
