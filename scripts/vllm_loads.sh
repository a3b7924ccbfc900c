#!/usr/bin/env bash
# The vLLM load benchmarks of docs/results.md ("In vLLM"): 1,000 held-out requests per policy (the 500
# held-out prompts, each sent twice: serve.repeat_prompts), 64 running, 2,048 tokens per step, 2 GiB
# of KV cache, bf16, BERT's initial estimate, the committed predictor of the transformers run
# (recipes/smollm2_alpaca_hf.yaml). One folder per load under checkpoints/smollm2_alpaca/,
# each published into reports/ when it finishes; a finished policy is kept when the script runs again.
#   bash scripts/vllm_loads.sh                 # all loads, in the order below
#   bash scripts/vllm_loads.sh rate3.0         # one of them
#   SUFFIX=_pinned bash scripts/vllm_loads.sh rate3.0   # into serve_vllm_rate3.0_pinned (a rerun beside the old one)
#   SUFFIX=_pinned POLICIES=[fifo,trail] bash scripts/vllm_loads.sh rate2.1   # only some policies
set -euo pipefail
cd "$(dirname "$0")/.."
RECIPE=recipes/smollm2_alpaca_hf.yaml
COMMON=(serve.engine=vllm serve.num_requests=1000 serve.repeat_prompts=true serve.max_batch=64
        serve.max_batch_tokens=2048 serve.vllm_kv_cache_gb=2 serve.vllm_dtype=bfloat16 serve.initial=bert)
ALL=(burst1000 rate3.0 rate2.5 rate2.1)
declare -A RATE=([burst1000]=1000 [rate3.0]=3.0 [rate2.5]=2.5 [rate2.1]=2.1)
POLICIES="${POLICIES:-[fifo,priority,trail,oracle]}"
loads=("$@")
[ ${#loads[@]} -gt 0 ] || loads=("${ALL[@]}")
for load in "${loads[@]}"; do
  [ -n "${RATE[$load]:-}" ] || { echo "unknown load '$load'; choose from ${ALL[*]}" >&2; exit 2; }
  out=checkpoints/smollm2_alpaca/serve_vllm_${load}${SUFFIX:-}
  trail-probe serve-bench "$RECIPE" "${COMMON[@]}" serve.rate="${RATE[$load]}" \
    "serve.policies=$POLICIES" serve.out_dir="$out"
  python scripts/publish_serve.py "$out"
done
