"""Fit the simulator's `measured_cpu` cost model from SmolLM2 iteration timings on this machine.

    python benchmarks/fit_cost_model.py                # ~1-2 minutes on 2 cores
    python benchmarks/fit_cost_model.py --threads 2 --repeats 5

Times single forward passes of the serving model (the recipe's SmolLM2-135M-Instruct by default):
prefills of a few prompt lengths, a prefill chunk after a cached context, and decode steps at a few
batch sizes and context lengths (random KV caches, so no long prefill is needed to set them up).
Each timing becomes the simulator's iteration features (tokens, decode_context, prefill_pairs) and
`trail_probe.serving.cost_model.fit_cost_model` fits t = a + b*tokens + c*decode_context + d*prefill_pairs.
Prints measured against fitted times and writes benchmarks/results/cost_model_cpu.json and, with the
default --out, the same file as the package's `measured_cpu` preset
(trail_probe/serving/data/cost_model_cpu.json, which `simulate.cost_preset=measured_cpu` loads).
Timings taken while other work shares the CPU (e.g. an extraction) are slower than an idle machine:
re-run the fit on an idle machine before quoting it.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

from trail_probe.atomic import atomic_write_json
from trail_probe.config import ModelConfig
from trail_probe.runtime.models import load_causal_lm
from trail_probe.serving.cost_model import MEASURED_CPU_FILE, fit_cost_model, iteration_features

OUT = Path(__file__).resolve().parent / "results" / "cost_model_cpu.json"
PRESET = MEASURED_CPU_FILE  # the package's copy: the measured_cpu preset
PREFILL_LENGTHS = [16, 64, 160, 320]
CHUNK = (64, 256)  # a 64-token prefill chunk after 256 cached tokens
DECODE_BATCHES = [1, 4, 16]
DECODE_CONTEXTS = [64, 384]


def random_cache(model, batch: int, cached: int, new: int):
    """A preallocated cache for `cached + new` positions whose first `cached` hold random keys and
    values shaped like the model's. Preallocated, as in a paged-attention engine: HF's DynamicCache
    would copy the whole cache at every step and charge that copy to the context."""
    from transformers import StaticCache

    cfg = model.config
    heads = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    cache = StaticCache(config=cfg, max_cache_len=cached + new)
    for layer in range(cfg.num_hidden_layers):
        k = torch.randn(batch, heads, cached, head_dim) * 0.1
        cache.update(k, torch.randn_like(k) * 0.1, layer)
    return cache


@torch.inference_mode()
def time_forward(model, batch: int, new: int, cached: int, repeats: int) -> float:
    """Median seconds of one forward pass of `new` tokens per row after `cached` cached tokens."""
    vocab = model.config.vocab_size
    times = []
    for _ in range(repeats + 1):  # the first pass warms up allocators and is dropped
        cache = random_cache(model, batch, cached, new) if cached else None
        ids = torch.randint(0, vocab, (batch, new))
        kwargs = {"attention_mask": torch.ones(batch, cached + new, dtype=torch.long),
                  "position_ids": torch.arange(cached, cached + new).expand(batch, new)}
        if cache is not None:
            kwargs["past_key_values"] = cache
        start = time.perf_counter()
        model(input_ids=ids, use_cache=True, logits_to_keep=1, **kwargs)
        times.append(time.perf_counter() - start)
    return statistics.median(times[1:])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=ModelConfig().name_or_path, help="serving model (default: the recipe's SmolLM2)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (1 leaves a core to other work)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    start = time.perf_counter()
    model, _ = load_causal_lm(ModelConfig(name_or_path=args.model))
    print(f"# loaded {args.model} in {time.perf_counter() - start:.1f} s; {args.threads} thread(s)", flush=True)

    plan = [("prefill", 1, n, 0) for n in PREFILL_LENGTHS] + [("chunk", 1, CHUNK[0], CHUNK[1])]
    plan += [("decode", b, 1, ctx) for b in DECODE_BATCHES for ctx in DECODE_CONTEXTS]
    timings = []
    for kind, batch, new, cached in plan:
        seconds = time_forward(model, batch, new, cached, args.repeats)
        timings.append({"kind": kind, "batch": batch, "new_tokens": new, "cached": cached, "seconds": seconds,
                        **iteration_features([(new, cached)] * batch)})
        print(f"  {kind:<8} batch {batch:>3} new {new:>4} cached {cached:>4}: {seconds * 1e3:8.1f} ms", flush=True)

    cost = fit_cost_model(timings, source=f"fitted by benchmarks/fit_cost_model.py on {platform.node() or 'this machine'}")
    print(f"\n{'kind':<8}{'batch':>6}{'new':>6}{'cached':>8}{'measured ms':>13}{'fitted ms':>11}{'error':>8}")
    for t in timings:
        fitted = cost.iteration_time(t["tokens"], t["decode_context"], t["prefill_pairs"])
        t["fitted_seconds"] = fitted
        print(f"{t['kind']:<8}{t['batch']:>6}{t['new_tokens']:>6}{t['cached']:>8}{t['seconds'] * 1e3:>13.1f}"
              f"{fitted * 1e3:>11.1f}{fitted / t['seconds'] - 1:>+8.0%}")
    print(f"\nfixed {cost.fixed_s * 1e3:.2f} ms, per token {cost.per_token_s * 1e3:.3f} ms, per decode-context "
          f"token {cost.per_context_token_s * 1e9:.1f} ns, per prefill pair {cost.per_prefill_pair_s * 1e9:.2f} ns")
    result = {
        "cost_model": {"fixed_s": cost.fixed_s, "per_token_s": cost.per_token_s,
                       "per_context_token_s": cost.per_context_token_s, "per_prefill_pair_s": cost.per_prefill_pair_s,
                       "source": cost.source},
        "model": args.model, "threads": args.threads, "repeats": args.repeats,
        "torch": torch.__version__, "python": sys.version.split()[0], "machine": platform.machine(),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "note": "HF eager forward passes with logits_to_keep=1; random KV caches; median of repeats. "
                "Timings on a shared machine are pessimistic: re-run on an idle one.",
        "timings": timings,
    }
    for path in [args.out] + ([PRESET] if args.out == OUT else []):  # another --out leaves the preset alone
        atomic_write_json(path, result)
        print(f"# wrote {path}")
    print(f"# {time.perf_counter() - start:.0f} s in all")
    return 0


if __name__ == "__main__":
    sys.exit(main())
