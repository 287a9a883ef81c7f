#!/usr/bin/env bash
# The drafter pipeline on one GPU inside a fixed wall-clock budget: self-distillation data, then
# block-diffusion drafter training on all of it, then the exported drafter.
#
#   OUT=/tmp/out BUDGET_S=540 GEN_S=240 bash scripts/gpu_pipeline.sh [extra `dllm-spec train` flags]
#   OUT=/tmp/out TARGET=Qwen/Qwen2.5-0.5B-Instruct bash scripts/gpu_pipeline.sh   # your own target
#
# $TARGET (an HF id or directory; default: the embedded SmolLM2-135M-Instruct) is the target of
# every step; with one set, $DATA defaults to data/distill-<its name> and $WARM to empty (a fresh
# drafter: the shipped one fits SmolLM2 only).
# 1. generates the prompt set's missing responses into $DATA (fp32 target, batches of $GEN_BATCH,
#    static KV cache; resumable: stopped after $GEN_S seconds it loses at most the shard in flight)
#    and packs the new shards into $OUT/new_shards.tar;
# 2. trains the block-diffusion drafter on every shard with the rest of the budget: warm start from
#    $WARM (a drafter directory; empty for a fresh drafter), target features resident in GPU memory,
#    bf16 autocast, the learning rate annealed within the time budget, best checkpoint by held-out tau;
# 3. exports the best checkpoint in bf16 ($OUT/drafter.tar.part-*, split to stay under 15 MB per
#    file) and copies train_config.json, train_log.jsonl and eval.json to $OUT.
# Each step runs under `timeout`, so the script ends within BUDGET_S seconds and keeps what the
# earlier steps produced: set BUDGET_S inside the limit of whatever runs the script (a remote
# call's own timeout), or the export is what gets cut.
set -uo pipefail
: "${OUT:?set OUT to the directory for the results}"
BUDGET_S=${BUDGET_S:-540}
GEN_S=${GEN_S:-240}
GEN_BATCH=${GEN_BATCH:-512}
GEN_ARGS=${GEN_ARGS:-}
TARGET=${TARGET:-}
DATA=${DATA:-data/distill${TARGET:+-$(basename "$TARGET")}}  # another target's responses go apart
RUN=${RUN:-/tmp/bd-gpu}
if [ -n "$TARGET" ]; then WARM=${WARM-}; else WARM=${WARM-drafters/assets/block-diffusion-smollm2-135m}; fi
EXPORT_S=${EXPORT_S:-40}       # reserved at the end for the export
TRAIN_SETUP_S=${TRAIN_SETUP_S:-100}  # model load, resident features, first and last evaluations
export PYTHONUNBUFFERED=1 TQDM_MININTERVAL=${TQDM_MININTERVAL:-10}
start=$(date +%s)
left() { echo $(( start + BUDGET_S - $(date +%s) )); }
mkdir -p "$OUT" "$DATA"

before=$(ls "$DATA"/shard-*.jsonl.gz 2>/dev/null | wc -l)
echo "== generate (<= ${GEN_S}s): $before shards present"
# shellcheck disable=SC2086
timeout "$GEN_S" python3 scripts/generate_distill_data.py --out "$DATA" --dtype float32 \
    --batch-size "$GEN_BATCH" --shard-size $(( 2 * GEN_BATCH )) ${TARGET:+--target "$TARGET"} $GEN_ARGS
# Records of prompts that document a held-out subject (another Python builds other "docs" prompts
# than the reference machine; generation already skips the committed list's subjects) never train.
timeout 120 python3 scripts/filter_distill_data.py --data "$DATA" ${TARGET:+--target "$TARGET"}
new=$(ls "$DATA"/shard-*.jsonl.gz | tail -n +$(( before + 1 )))
echo "== $(echo "$new" | grep -c shard) new shards, $(left)s left"
[ -n "$new" ] && tar -cf "$OUT/new_shards.tar" $new

train_s=$(( $(left) - EXPORT_S ))
minutes=$(python3 -c "print(max(0.5, ($train_s - $TRAIN_SETUP_S) / 60))")
echo "== train (<= ${train_s}s, budget ${minutes} min)"
mkdir -p "$RUN"
if [ -n "$WARM" ] && [ ! -e "$RUN/checkpoint" ]; then cp -r "$WARM" "$RUN/checkpoint"; fi
timeout "$train_s" python3 -m dllm_spec.training.cli --data "$DATA" --out "$RUN" --dtype float32 \
    ${TARGET:+--target "$TARGET"} --mixed-precision bf16 --resident-features --time-budget-min "$minutes" "$@"
echo "== train exit $?, $(left)s left"

echo "== export"
rm -rf /tmp/gpu_export && mkdir -p /tmp/gpu_export
if [ -f "$RUN/best/config.json" ]; then
    python3 -m dllm_spec.cli export "$RUN/best" --format dllm --dtype bfloat16 --out /tmp/gpu_export/drafter \
        && tar -C /tmp/gpu_export -cf - drafter | split -b 15m - "$OUT/drafter.tar.part-"
fi
cp "$RUN/train_config.json" "$RUN/train_log.jsonl" "$RUN/eval.json" "$OUT/" 2>/dev/null
ls -la "$OUT"
echo "== done, $(left)s left"
