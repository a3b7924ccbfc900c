#!/usr/bin/env bash
# Issue 13's light-load check: TRAIL against vLLM's FCFS at 2.1 req/s (0.85x FCFS saturation, no
# queue) with 200 requests, twice, to see the run-to-run spread next to TRAIL's cost. ~12 minutes.
#   bash scripts/vllm_light_load.sh          # into checkpoints/smollm2_alpaca/serve_vllm_rate2.1_200a and _200b
#   bash scripts/vllm_light_load.sh c d      # other suffixes (the runs after the CPU pinning: c, d)
# Then: python scripts/step_residuals.py checkpoints/smollm2_alpaca/serve_vllm_rate2.1_200{a,b}
set -euo pipefail
cd "$(dirname "$0")/.."
COMMON=(serve.engine=vllm serve.num_requests=200 serve.repeat_prompts=true serve.max_batch=64
        serve.max_batch_tokens=2048 serve.vllm_kv_cache_gb=2 serve.vllm_dtype=bfloat16 serve.initial=bert serve.rate=2.1
        "serve.policies=[fifo,trail]")
reps=("$@")
[ ${#reps[@]} -gt 0 ] || reps=(a b)
for rep in "${reps[@]}"; do
  out=checkpoints/smollm2_alpaca/serve_vllm_rate2.1_200$rep
  python -m trail_probe.cli serve-bench recipes/smollm2_alpaca_hf.yaml "${COMMON[@]}" serve.out_dir="$out"
  python scripts/publish_serve.py "$out"
done
