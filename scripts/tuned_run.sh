#!/usr/bin/env bash
# Issue 14: the tuned recipe's run, every choice made on the validation split (20% of the training
# side) and the held-out 25% scored once, at the end. Each step resumes; about 80 min on 2 cores.
#   bash scripts/tuned_run.sh                # all steps
#   bash scripts/tuned_run.sh sweep bert     # some of them: sweep bert rows final seeds
#   bash scripts/tuned_run.sh emd            # after the others: the ordinal loss (train.loss=emd, chosen on the
#                                            # ablation's validation rows) at the chosen layer, on all three split seeds
# Reads the base run's extraction (data/smollm2_alpaca). Writes checkpoints/smollm2_alpaca_tuned/
# and, with scripts/tuned_report.py, reports/smollm2_alpaca_tuned/.
set -euo pipefail
cd "$(dirname "$0")/.."
R=recipes/smollm2_alpaca_tuned.yaml
CK=checkpoints/smollm2_alpaca_tuned
TP=(python -m trail_probe.cli)
BERT_GRID=("3e-5 8" "1e-4 8" "3e-4 8" "3e-4 16")  # learning rate, epochs
steps=("$@")
[ ${#steps[@]} -gt 0 ] || steps=(sweep bert rows final seeds emd)
has() { [[ " ${steps[*]} " == *" $1 "* ]]; }
layer() { python -c "from trail_probe.config import load_recipe; from trail_probe.offline.artifacts import best_layer; print(best_layer(load_recipe('$R'), 'decode')[0])"; }
bert_folder() { python scripts/tuned_report.py --best-bert; }
bert_overrides() { python scripts/tuned_report.py --best-bert-overrides; }

if has sweep; then  # 1. the layer sweep: both tasks, all 30 layers, epochs and layer chosen on validation
  "${TP[@]}" train --resume "$R"
fi
if has bert; then  # 2. BERT tuned the same way: learning rates and epoch counts, the best epoch of each on validation
  for point in "${BERT_GRID[@]}"; do
    read -r lr epochs <<< "$point"
    name="lr$lr"; [ "$epochs" = 8 ] || name="lr${lr}_ep$epochs"
    "${TP[@]}" train-baseline --resume "$R" baseline.lr="$lr" baseline.epochs="$epochs" baseline.out_dir="$CK/bert_grid/$name"
  done
fi
L=$(layer)
if has rows; then  # 3. refinement rows at the chosen layer, scored on validation (python scripts/tuned_report.py --rows)
  python scripts/tuned_report.py --rows --layer "$L"
fi
if has final; then  # 4. the held-out 25%, once: the tuned recipe, and the paper recipe on the same split
  B="$(bert_folder)"
  "${TP[@]}" eval "$R" eval.layer="$L" baseline.out_dir="$B"
  "${TP[@]}" train --resume "$R" train.lr=0.01 train.standardize=false train.layers="$L" train.multi_layer=none \
    train.out_dir="$CK/paper_recipe"
  "${TP[@]}" eval "$R" train.lr=0.01 train.standardize=false train.layers="$L" train.multi_layer=none \
    train.out_dir="$CK/paper_recipe" eval.layer="$L" baseline.out_dir="$B"
  "${TP[@]}" export "$R" export.layer="$L"   # checkpoints/smollm2_alpaca_tuned/predictor (standardization folded into fc1)
fi
if has seeds; then  # 5. robustness: the same comparison on two more split seeds (new 75/25 and validation splits)
  for seed in 1 2; do
    S="$CK/seed$seed"
    "${TP[@]}" train --resume "$R" train.split_seed=$seed train.layers="$L" train.multi_layer=none train.out_dir="$S"
    # shellcheck disable=SC2046
    "${TP[@]}" train-baseline --resume "$R" train.split_seed=$seed train.out_dir="$S" $(bert_overrides) baseline.out_dir="$S/baseline"
    "${TP[@]}" eval "$R" train.split_seed=$seed train.layers="$L" train.multi_layer=none train.out_dir="$S" eval.layer="$L" \
      baseline.out_dir="$S/baseline"
  done
fi
if has emd; then  # 6. the same comparison with the ordinal loss, BERT as above (each seed's own), on every split seed
  for seed in 0 1 2; do
    S="$CK/emd/seed$seed"; B="$(bert_folder)"; [ "$seed" = 0 ] || B="$CK/seed$seed/baseline"
    "${TP[@]}" train --resume "$R" train.loss=emd train.split_seed=$seed train.layers="$L" train.multi_layer=none train.out_dir="$S"
    "${TP[@]}" eval "$R" train.loss=emd train.split_seed=$seed train.layers="$L" train.multi_layer=none train.out_dir="$S" \
      eval.layer="$L" baseline.out_dir="$B"
  done
fi
