#!/usr/bin/env bash
# The main job, end to end on the real Airbus satellite data, small settings (~20 min on a 2-core CPU):
# prepare chips -> train YOLOv8n -> AJPQ search (8x smaller, fewer FLOPs) -> QAT fine-tune -> export
# (ONNX, int8 ONNX, packed) -> measured latency -> sliced predict on an unseen scene -> summary.
# Every step is logged to one MLflow store (runs/mlflow.db). Outputs: runs/demo/.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export RSDET_DATA="${RSDET_DATA:-$(cd .. && pwd)/shared/data}"
export YOLO_OFFLINE=1
RS=.venv/bin/rsdet-compress
D=runs/demo
DATA=runs/data/airbus-small/data.yaml
mkdir -p $D
step() { echo; echo "=== $* ($(date +%T))"; }

step "1/8 prepare: 2560 px scenes -> 320 px chips at 2 m/px, split by scene"
[ -f $DATA ] || $RS data prepare --config configs/airbus-small-prepare.yaml --quiet
step "2/8 train YOLOv8n from scratch"
$RS train --config configs/demo-yolov8n.yaml
$RS evaluate --weights $D/yolov8n/weights/best.pt --data $DATA --split test --json > $D/eval_fp32.json
step "3/8 AJPQ search: joint pruning + mixed precision, mAP50 reward on training chips"
# kept channels are multiples of 8 inside the search, so the budget holds for the deployed file; size 0.12, not
# 0.125: a small margin for the packed file's header
$RS search --weights $D/yolov8n/weights/best.pt --data $DATA --agent ajpq --budget size=0.12 \
    --budget flops=0.6 --channel-multiple 8 --episodes 16 --reward-images 64 --out $D/policy.json --quiet
step "4/8 compress with the best policy: channels rounded to multiples of 8, calibrated on training chips"
$RS compress --weights $D/yolov8n/weights/best.pt --policy $D/policy.json --out $D/compressed.pt --data $DATA \
    --round8
$RS evaluate --weights $D/compressed.pt --data $DATA --split test --json --no-track > $D/eval_compressed.json
step "5/8 quantization-aware fine-tune, distilled from the float model"
$RS finetune --config configs/demo-finetune.yaml
$RS evaluate --weights $D/finetuned/weights/best.pt --data $DATA --split test --json > $D/eval_finetuned.json
step "6/8 export: fp32 ONNX of the float model; int8 ONNX + packed file of the fine-tuned one (mAP-checked)"
$RS export --weights $D/yolov8n/weights/best.pt --format onnx --out $D/export/fp32.onnx --split test --json \
    > $D/export_fp32.json
$RS export --weights $D/finetuned/weights/best.pt --format onnx-int8 --out $D/export/compressed.int8.onnx \
    --split test --json > $D/export_int8.json
$RS export --weights $D/finetuned/weights/best.pt --format packed --out $D/export/compressed.packed \
    --split test --json > $D/export_packed.json
step "7/8 measured latency: fp32 ONNX vs int8 ONNX on onnxruntime, batch 1 and 8"
$RS benchmark --onnx $D/export/fp32.onnx $D/export/compressed.int8.onnx --runs 20 --out $D/latency.json
step "8/8 sliced predict on an unseen scene (extras/) with the int8 model"
scene=$(ls "$RSDET_DATA"/airbus-aircraft/extras/*.jpg | head -n 1)
$RS predict --weights $D/export/compressed.int8.onnx --source "$scene" --out $D/predict --overwrite
echo
.venv/bin/python scripts/demo_summary.py $D
echo "MLflow: .venv/bin/mlflow ui --backend-store-uri sqlite:///$(pwd)/runs/mlflow.db"
