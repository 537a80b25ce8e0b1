#!/usr/bin/env bash
# Reproduces the shipped default model (models/default): the tokenizer, then the AR model on its
# codes, both with train.py and the configs in configs/, then the quality report.
#   bash scripts/train_default.sh [RUNS_DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
RUNS=${1:-runs}
PY=${PYTHON:-python}
start=$(date +%s)
$PY train.py --config configs/default_tokenizer.py --workdir "$RUNS/default_tokenizer" --config.logging.progress=False
tok_done=$(date +%s)
$PY train.py --config configs/default_ar.py --workdir "$RUNS/default_ar" \
    --config.tokenizer.checkpoint="$RUNS/default_tokenizer/model" --config.logging.progress=False
ar_done=$(date +%s)
rm -rf models/default.new && mkdir -p models/default.new
cp -r "$RUNS/default_tokenizer/model" models/default.new/tokenizer
cp -r "$RUNS/default_ar/model" models/default.new/gpt
[ -f models/default/MODEL_CARD.md ] && cp models/default/MODEL_CARD.md models/default.new/   # update its figures by hand
rm -rf models/default && mv models/default.new models/default
echo "tokenizer: $((tok_done - start)) s, AR model: $((ar_done - tok_done)) s"
[ -f models/shape_classifier.npz ] || $PY scripts/train_shape_classifier.py
$PY scripts/quality_report.py --out models/default/quality.json
