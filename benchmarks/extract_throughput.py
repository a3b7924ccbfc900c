"""Useful generated tokens/s of `trail-probe extract` (capture on) against plain generation, in both engines.

    python benchmarks/extract_throughput.py                      # 64 shared prompts, batch 32, 512 tokens
    python benchmarks/extract_throughput.py --num-prompts 128 --batch-sizes 32,64 --vllm-dtype bfloat16

Modes: `generate` (plain transformers `model.generate`), `extract` (the transformers extractor,
TRAIL's states only: extract.inputs=trail), `vllm_generate` (plain vLLM: its default engine,
compiled, prefix caching on, no trail_probe code) and `vllm_extract` (`extract.engine=vllm`: eager,
prefix caching off, every layer captured, TRAIL's states only), the vLLM modes at each batch size as
`max_num_seqs`, in `--vllm-dtype`. Issue 27's pooled inputs: `extract_pooled` / `vllm_extract_pooled`
(extract.inputs=all: the pooled inputs and their entropies, an lm_head over every prompt token)
and `..._pooled_noentropy` (extract.entropy=false); the summary gives each one's cost against TRAIL's
states alone (`pooled_cost`), e.g. `--modes extract,extract_pooled,extract_pooled_noentropy`. The
default recipe's extraction: `extract_last` / `vllm_extract_last` (extract.inputs=trained: TRAIL's two
and the last prompt token) and `vllm_extract_last_compiled` (the same in vLLM's compiled graphs, the
layers as auxiliary outputs: extract.vllm_compile=true). The KV cache is sized for the batch.

"Useful" tokens are those up to EOS (EOS not counted), summed over requests, divided by wall time.
Plain `generate` keeps decoding finished rows until the longest answer of its batch ends, so much
of its work is thrown away; our loop refills a finished row's slot with the next prompt at once.
Each mode runs in its own subprocess so that its peak memory (max RSS) is its own.
Writes benchmarks/results/extract_throughput.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results" / "extract_throughput.json"
# extractor modes -> (extract.inputs, extract.entropy); each also runs on vLLM as "vllm_" + mode. extract_last:
# the default recipe's (extract.inputs=trained with train.prompt_input=last: TRAIL's two and the last prompt token)
EXTRACT_MODES = {"extract": ("trail", False), "extract_pooled": ("all", True), "extract_pooled_noentropy": ("all", False),
                 "extract_last": ("trained", False)}
COMPILED = "vllm_extract_last_compiled"  # the default recipe's inputs in compiled graphs (extract.vllm_compile=true)
ORDER = ["generate", *EXTRACT_MODES, "vllm_generate", *(f"vllm_{m}" for m in EXTRACT_MODES), COMPILED]


def _inputs(mode: str) -> dict:
    from trail_probe.offline.store import stored_inputs

    return stored_inputs(*EXTRACT_MODES[mode.removeprefix("vllm_").removesuffix("_compiled")], prompt_input="last")


def _setup(num_prompts: int):
    from trail_probe.config import load_recipe
    from trail_probe.offline.generation import prepare_prompts
    from trail_probe.offline.prompts import load_prompts
    from trail_probe.runtime.models import load_causal_lm

    cfg = load_recipe(REPO / "recipes" / "smollm2_alpaca_hf.yaml")
    model, tokenizer = load_causal_lm(cfg.model)
    prompts, _ = load_prompts(str(REPO.parent / "shared" / "data" / "alpaca_prompts.jsonl"))
    ready, _ = prepare_prompts(prompts[:num_prompts], tokenizer, 512, 8192, "skip")
    return cfg, model, tokenizer, ready


def run_generate(num_prompts: int, batch_size: int) -> dict:
    cfg, model, tokenizer, ready = _setup(num_prompts)
    eos = set(model.generation_config.eos_token_id if isinstance(model.generation_config.eos_token_id, list)
              else [model.generation_config.eos_token_id])
    tokenizer.padding_side = "left"
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else next(iter(eos))
    useful = computed = 0
    start = time.perf_counter()
    with torch.inference_mode():
        for i in range(0, len(ready), batch_size):
            chunk = [ids for _, ids, _ in ready[i:i + batch_size]]
            width = max(map(len, chunk))
            input_ids = torch.tensor([[pad] * (width - len(c)) + c for c in chunk])
            mask = torch.tensor([[0] * (width - len(c)) + [1] * len(c) for c in chunk])
            out = model.generate(input_ids=input_ids, attention_mask=mask, max_new_tokens=512, do_sample=False,
                                 pad_token_id=pad)[:, width:]
            computed += out.numel()
            for row in out.tolist():
                useful += next((k for k, t in enumerate(row) if t in eos), len(row))
    wall = time.perf_counter() - start
    return {"useful_tokens": useful, "computed_tokens": computed, "wall_s": wall}


def run_extract(num_prompts: int, batch_size: int, mode: str = "extract") -> dict:
    from trail_probe.config import resolve_layers
    from trail_probe.offline.generation import generate_with_capture

    cfg, model, tokenizer, ready = _setup(num_prompts)
    cfg.generation.batch_size = batch_size
    layers = resolve_layers(cfg.extract.decode_layers, 30)
    useful = stored_positions = 0
    start = time.perf_counter()
    for req in generate_with_capture(model, tokenizer, ready, cfg.generation, layers, layers,
                                     cfg.extract.decode_stride, torch.float16, inputs=_inputs(mode)):
        useful += req.record["output_tokens"]
        stored_positions += req.decode_generated.numel()
    wall = time.perf_counter() - start
    return {"useful_tokens": useful, "computed_tokens": useful, "wall_s": wall,
            "stored_decode_positions": stored_positions, "captured_layers": len(layers)}


def kv_cache_gb(batch_size: int) -> float:
    """Room for every running answer (SmolLM2: 23 KB per token in bf16; 256 x 600 tokens is 3.5 GB)."""
    return 4.0 * max(1.0, batch_size / 128)


def _vllm_setup(num_prompts: int):
    from trail_probe.config import load_recipe
    from trail_probe.offline.generation import prepare_prompts
    from trail_probe.offline.prompts import load_prompts
    from trail_probe.offline.vllm_generation import load_for_vllm

    cfg = load_recipe(REPO / "recipes" / "smollm2_alpaca_hf.yaml")
    folder, tokenizer, _, eos = load_for_vllm(cfg.model)
    prompts, _ = load_prompts(str(REPO.parent / "shared" / "data" / "alpaca_prompts.jsonl"))
    ready, _ = prepare_prompts(prompts[:num_prompts], tokenizer, 512, 8192, "skip")
    return cfg, folder, tokenizer, eos, ready


def run_vllm_generate(num_prompts: int, batch_size: int, dtype: str) -> dict:
    from vllm import LLM, SamplingParams

    cfg, folder, _, eos, ready = _vllm_setup(num_prompts)
    os.environ.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")  # every core to the model, as extract.engine=vllm does
    llm = LLM(model=str(folder), dtype=dtype, max_num_seqs=batch_size, kv_cache_memory_bytes=int(kv_cache_gb(batch_size) * (1 << 30)), seed=0,
              max_model_len=max(len(ids) for _, ids, _ in ready) + 512)
    params = SamplingParams(temperature=0.0, max_tokens=512, stop_token_ids=sorted(eos), detokenize=False)
    start = time.perf_counter()
    outs = llm.generate([{"prompt_token_ids": ids} for _, ids, _ in ready], params, use_tqdm=False)
    wall = time.perf_counter() - start
    useful = 0
    for o in outs:
        tokens = list(o.outputs[0].token_ids)
        useful += len(tokens) - (1 if tokens and tokens[-1] in eos else 0)  # EOS not counted, as extract counts
    return {"useful_tokens": useful, "computed_tokens": int(useful), "wall_s": wall, "dtype": dtype}


def run_vllm_extract(num_prompts: int, batch_size: int, dtype: str, mode: str = "vllm_extract") -> dict:
    from trail_probe.config import resolve_layers
    from trail_probe.offline.vllm_generation import generate_with_vllm

    cfg, folder, tokenizer, eos, ready = _vllm_setup(num_prompts)
    cfg.generation.batch_size = batch_size
    layers = resolve_layers(cfg.extract.decode_layers, 30)
    useful = stored_positions = 0
    stats: dict = {}
    for req in generate_with_vllm(folder, tokenizer, eos, ready, cfg.generation, layers, layers,
                                  cfg.extract.decode_stride, torch.float16, dtype=dtype, kv_cache_gb=kv_cache_gb(batch_size),
                                  stats=stats, inputs=_inputs(mode), compiled=mode.endswith("_compiled")):
        useful += req.record["output_tokens"]
        stored_positions += req.decode_generated.numel()
        last = time.perf_counter()  # the engine's shutdown after the last request is left out, as for vllm_generate
    wall = last - stats["generation_start"]  # from the first request, as vllm_generate is timed
    return {"useful_tokens": useful, "computed_tokens": useful, "wall_s": wall, "dtype": dtype,
            "stored_decode_positions": stored_positions, "captured_layers": len(layers)}


def child(mode: str, num_prompts: int, batch_size: int, dtype: str) -> None:
    torch.set_num_threads(torch.get_num_threads())
    if mode == "vllm_generate":
        result = run_vllm_generate(num_prompts, batch_size, dtype)
    elif mode.startswith("vllm"):
        result = run_vllm_extract(num_prompts, batch_size, dtype, mode)
    else:
        result = run_generate(num_prompts, batch_size) if mode == "generate" else run_extract(num_prompts, batch_size, mode)
    if mode != "generate" and mode != "vllm_generate":
        result["inputs"] = _inputs(mode)
    result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print("RESULT " + json.dumps(result))


def _pooled_cost(rows: list[dict]) -> list[dict]:
    """Issue 27: each pooled mode's useful tokens/s against TRAIL's states alone, same engine and batch."""
    out = []
    for r in rows:
        base_mode = "vllm_extract" if r["mode"].startswith("vllm_extract_") else "extract"
        base = next((b for b in rows if b["mode"] == base_mode and b["batch_size"] == r["batch_size"]), None)
        if "_pooled" in r["mode"] and base is not None:
            slower = 1 - r["useful_tok_s"] / base["useful_tok_s"]
            out.append({"mode": r["mode"], "batch_size": r["batch_size"], "useful_tok_s": round(r["useful_tok_s"], 1),
                        "trail_states_only_tok_s": round(base["useful_tok_s"], 1), "slower_by": round(slower, 4)})
            print(f"{r['mode']} batch {r['batch_size']}: {r['useful_tok_s']:.0f} useful tok/s, {slower:.1%} slower than "
                  f"{base_mode} ({base['useful_tok_s']:.0f})")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num-prompts", type=int, default=64)
    parser.add_argument("--batch-sizes", default="32", help="comma list; plain generate runs at the first")
    parser.add_argument("--vllm-dtype", default="bfloat16", help="the vLLM modes' dtype (float32 is transformers')")
    parser.add_argument("--no-vllm", action="store_true", help="only the transformers modes")
    parser.add_argument("--modes", default="", help="run only these modes (comma list); keep the other rows of the last run")
    parser.add_argument("--child", nargs=4, metavar=("MODE", "N", "B", "DTYPE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child[0], int(args.child[1]), int(args.child[2]), args.child[3])
        return
    sizes = [int(b) for b in args.batch_sizes.split(",")]
    runs = [("generate", sizes[0])] + [(mode, b) for b in sizes for mode in EXTRACT_MODES]
    if not args.no_vllm:
        runs += [(mode, b) for b in sizes for mode in ("vllm_generate", *(f"vllm_{m}" for m in EXTRACT_MODES), COMPILED)]
    rows, previous = [], {}
    if args.modes:  # rerun some modes; the others' rows are kept from the last run, marked as such
        keep = set(args.modes.split(","))
        previous = json.loads(RESULTS.read_text()) if RESULTS.is_file() else {"runs": []}
        rows = [{**r, "from_previous_run": r.get("from_previous_run") or previous.get("command")}
                for r in previous["runs"] if r["mode"] not in keep]
        runs = [(m, b) for m, b in runs if m in keep]
    for mode, batch in runs:
        proc = subprocess.run([sys.executable, __file__, "--child", mode, str(args.num_prompts), str(batch),
                               args.vllm_dtype],
                              capture_output=True, text=True, cwd=REPO)
        line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
        if line is None:
            sys.exit(f"{mode} run failed:\n{proc.stderr[-2000:]}")
        r = json.loads(line[len("RESULT "):])
        r.update(mode=mode, batch_size=batch, num_prompts=args.num_prompts, useful_tok_s=r["useful_tokens"] / r["wall_s"])
        rows.append(r)
        print(f"  {mode:8s} batch {batch:3d}: {r['useful_tok_s']:6.1f} useful tok/s, {r['wall_s']:.0f}s, "
              f"peak {r['peak_rss_mb']:.0f} MB", flush=True)
    rows.sort(key=lambda r: (ORDER.index(r["mode"]), r["batch_size"]))
    base = rows[0]["useful_tok_s"]
    print(f"\n{'mode':14s}{'batch':>6s}{'useful tok/s':>14s}{'x generate':>12s}{'wall s':>9s}{'useful/computed':>17s}{'peak MB':>9s}")
    for r in rows:
        r["speedup_vs_generate"] = r["useful_tok_s"] / base
        print(f"{r['mode']:14s}{r['batch_size']:>6d}{r['useful_tok_s']:>14.1f}{r['speedup_vs_generate']:>12.2f}"
              f"{r['wall_s']:>9.0f}{r['useful_tokens'] / r['computed_tokens']:>17.2f}{r['peak_rss_mb']:>9.0f}")
    same_batch = next(r for r in rows if r["mode"] == "extract" and r["batch_size"] == sizes[0])
    result = {
        "benchmark": "extract_throughput",
        "command": "python benchmarks/extract_throughput.py " + " ".join(sys.argv[1:]),
        "model": "SmolLM2-135M-Instruct (Q4_1 GGUF dequantized to float32)",
        "num_prompts": args.num_prompts, "max_new_tokens": 512, "greedy": True,
        "machine": {"cpus": torch.get_num_threads(), "platform": platform.platform(), "torch": torch.__version__},
        "runs": rows,
        "target": "extract >= 2x the useful tokens/s of plain generate at the same batch size",
        "target_met": same_batch["speedup_vs_generate"] >= 2.0,
    }
    for b in sizes:  # the vLLM targets: extraction with capture >= 450 useful tok/s, within 15% of plain vLLM
        # against plain vLLM measured in the same command (same prompts): the default recipe's mode where it ran
        same = [r for r in rows if r["batch_size"] == b and not r.get("from_previous_run")]
        plain = next((r for r in same if r["mode"] == "vllm_generate"), None)
        ours = next((r for mode in (COMPILED, "vllm_extract") for r in same if r["mode"] == mode), None)
        if plain and ours:
            ratio = ours["useful_tok_s"] / plain["useful_tok_s"]
            result.setdefault("vllm", []).append({
                "batch_size": b, "dtype": args.vllm_dtype, "mode": ours["mode"], "num_prompts": args.num_prompts,
                "extract_useful_tok_s": round(ours["useful_tok_s"], 1),
                "plain_useful_tok_s": round(plain["useful_tok_s"], 1), "extract_over_plain": round(ratio, 3),
                "target_met": ours["useful_tok_s"] >= 450 and ratio >= 0.85})
            print(f"vLLM batch {b} ({args.vllm_dtype}): extraction ({ours['mode']}) {ours['useful_tok_s']:.0f} useful tok/s = "
                  f"{ratio:.2f}x plain vLLM's {plain['useful_tok_s']:.0f} (target >= 450 and >= 0.85x)")
    if "vllm" not in result and previous.get("vllm"):  # no new pair: the last comparison stays, as its rows do
        result["vllm"] = previous["vllm"]
    result["pooled_cost"] = _pooled_cost(rows)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nwrote {RESULTS.relative_to(REPO)}; target (>= 2x at batch {sizes[0]}) met: {result['target_met']}")


if __name__ == "__main__":
    main()
