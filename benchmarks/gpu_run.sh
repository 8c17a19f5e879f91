#!/usr/bin/env bash
# The GPU issue's one command (docs/gpu.md): on a lent GPU machine, in the checkout, with its own python3:
#
#   PYTHONPATH=. PYTHONUNBUFFERED=1 bash benchmarks/gpu_run.sh .gl/precomputed-6284e58656 "$OUT"
#
# Steps, in order, each writing its records (folds.jsonl, resumable) and its log under OUT as it goes (they come
# back even when the command is cut off), each cut by `timeout` so that the whole stops by itself before BUDGET
# seconds (default 530: under 9 minutes):
#   1. the paper profile, seed 0: the six rungs, 68 folds each (bf16; a cell's folds as one batched model)
#   2. the peers beyond the CPU's reach at their published recipes, seed 0: HTNet (its facial regions from the
#      landmarks kept with the shards) and Off-ApexNet (3000 epochs; neither packs: WORKERS processes share the GPU)
#   3. seeds 1 and 2 of steps 1 and 2
#   4. baseline and epir, seeds 3-9
# TINY=1 runs every step at 1 epoch, a tiny width and 2 folds: the CPU check that the GPU run fails on nothing
# but the GPU. Then, on the CPU machine: uv run python grid/run_all.py import FETCHED/<step> --experiment E
set -u
SHARDS=${1:?usage: gpu_run.sh SHARDS_FOLDER OUT_FOLDER}
OUT=${2:?usage: gpu_run.sh SHARDS_FOLDER OUT_FOLDER}
BUDGET=${BUDGET:-530}
WORKERS=${WORKERS:-8}
PYTHON=${PYTHON:-python3}
START=$(date +%s)
mkdir -p "$OUT"
[ -f "$SHARDS/landmarks.csv" ] || echo "warning: $SHARDS has no landmarks.csv: HTNet's step will be refused" >&2

if [ "${TINY:-0}" = 1 ]; then
    LADDER_SET=(--set epochs=1 --set dim=16 --set dim_head=8 --set depth=3 --set integration_blocks=1 --folds 2)
    PEER_SET=(--set epochs=1 --set dim=6 --set repeats_top=1 --folds 2)
else
    LADDER_SET=()
    PEER_SET=()
fi

step() {  # step NAME ARGS...: one gpu_ladder run within the time left
    local name=$1; shift
    local left=$((BUDGET - ($(date +%s) - START)))
    if [ "$left" -le 30 ]; then
        echo "=== $name: skipped, $left s left of $BUDGET" | tee -a "$OUT/gpu_run.log"
        return
    fi
    echo "=== $name: $left s left of $BUDGET ($(date -u +%FT%T))" | tee -a "$OUT/gpu_run.log"
    timeout -k 15 --signal=INT "$left" "$PYTHON" benchmarks/gpu_ladder.py --shards "$SHARDS" --out "$OUT/$name" \
        --set precision=bf16 "$@" 2>&1 | tee "$OUT/$name.log"
    echo "=== $name: exit ${PIPESTATUS[0]} after $(($(date +%s) - START)) s" | tee -a "$OUT/gpu_run.log"
}

{ nvidia-smi || echo "no nvidia-smi"; "$PYTHON" -c "import torch; print('torch', torch.__version__, torch.cuda.is_available())"; } \
    > "$OUT/device.txt" 2>&1
step ladder-s0 --profile paper --seeds 0 "${LADDER_SET[@]}"
step peers-s0 --presets htnet,offapexnet --seeds 0 --workers "$WORKERS" "${PEER_SET[@]}"
step ladder-s1-2 --profile paper --seeds 1,2 "${LADDER_SET[@]}"
step peers-s1-2 --presets htnet,offapexnet --seeds 1,2 --workers "$WORKERS" "${PEER_SET[@]}"
step pairs-s3-9 --presets baseline,epir --profile paper --seeds 3,4,5,6,7,8,9 "${LADDER_SET[@]}"
echo "=== done after $(($(date +%s) - START)) s: records in $OUT/*/folds.jsonl" | tee -a "$OUT/gpu_run.log"
