"""How much two extractions of the same prompts differ: answer lengths (and tokens), request by request.

    python scripts/compare_extractions.py data/smollm2_alpaca data/smollm2_alpaca_vllm \
        --out reports/smollm2_alpaca_vllm/extraction_vs_hf.json

Prints a table (requests in both, identical answers, mean |length difference|, mean lengths, the
share that change bin) and writes it as JSON; the manifests' engine and dtype name the two sides.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from trail_probe.atomic import atomic_write_json
from trail_probe.offline.store import Extraction
from trail_probe.runtime.bins import Bins


def side(ex: Extraction) -> str:
    m = ex.manifest["model"]
    return f"{m.get('engine', 'hf')} {m['dtype']}"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("a")
    parser.add_argument("b")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    a, b = Extraction(args.a), Extraction(args.b)
    ra, rb = {r["id"]: r for r in a.records}, {r["id"]: r for r in b.records}
    common = sorted(set(ra) & set(rb))
    la = torch.tensor([ra[i]["output_tokens"] for i in common], dtype=torch.float64)
    lb = torch.tensor([rb[i]["output_tokens"] for i in common], dtype=torch.float64)
    bins = Bins(a.manifest["config"]["bins"]["num_bins"], a.manifest["config"]["bins"]["max_len"])
    diff = (la - lb).abs()
    result = {
        "a": {"path": args.a, "engine_dtype": side(a), "mean_output_tokens": round(float(la.mean()), 1)},
        "b": {"path": args.b, "engine_dtype": side(b), "mean_output_tokens": round(float(lb.mean()), 1)},
        "requests_in_both": len(common),
        "identical_responses": sum(ra[i]["response"] == rb[i]["response"] for i in common),
        "identical_lengths": int((diff == 0).sum()),
        "mean_abs_length_difference": round(float(diff.mean()), 2),
        "median_abs_length_difference": float(diff.median()),
        "length_correlation": round(float(torch.corrcoef(torch.stack([la, lb]))[0, 1]), 4),
        "other_bin": int((bins.label(la.long()) != bins.label(lb.long())).sum()),
        "hit_cap": [sum(ra[i]["hit_cap"] for i in common), sum(rb[i]["hit_cap"] for i in common)],
        "command": "python " + " ".join([sys.argv[0], *(argv if argv is not None else sys.argv[1:])]),
    }
    n = len(common)
    print(f"{side(a)} ({args.a}) against {side(b)} ({args.b}): {n} requests in both")
    print(f"  identical responses {result['identical_responses']} ({result['identical_responses'] / n:.1%}), identical "
          f"lengths {result['identical_lengths']} ({result['identical_lengths'] / n:.1%})")
    print(f"  mean |length difference| {result['mean_abs_length_difference']} tokens (median "
          f"{result['median_abs_length_difference']}); mean length {result['a']['mean_output_tokens']} against "
          f"{result['b']['mean_output_tokens']}; correlation {result['length_correlation']}; another length bin for "
          f"{result['other_bin']} ({result['other_bin'] / n:.1%}); at the cap {result['hit_cap'][0]} against {result['hit_cap'][1]}")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(Path(args.out), result)
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
