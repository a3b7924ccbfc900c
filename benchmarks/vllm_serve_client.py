"""TRAIL against FCFS in the server people run: vLLM's OpenAI server, driven by vLLM's own benchmark client.

    python benchmarks/vllm_serve_client.py                          # 3 pairs x (0.8x, 1.0x, 1.5x, burst)
    python benchmarks/vllm_serve_client.py --pairs 1 --loads burst --num-prompts 100   # a quick look

Each run starts a fresh server and stops it afterwards:
- `fcfs`: `python -m vllm.entrypoints.openai.api_server` at vLLM's defaults (the baseline that counts;
  `--gpu-memory-utilization 0.5` only because vLLM's CPU worker refuses to start without it here);
- `trail`: `trail-probe serve RECIPE` (the same server, TRAIL's scheduler and the recipe's predictor);
- `priority`: vLLM's defaults with `--scheduling-policy priority`, each request's priority its prompt
  probe estimate (the estimate TRAIL's scheduler first ranks it by), computed before the run from
  the eval's predictions: what a user could do without TRAIL's scheduler, given the same predictor.
- `oracle`: TRAIL's scheduler ranking by each request's true length (the eval's greedy output
  length, sent by the client as `vllm_xargs.trail_exact_length`, which the server trusts only with
  `client_estimates`): the bound on what any length predictor can win in this server.
- `prefill`: FCFS's server with every answer cut to one token: nothing but the prefills, so its mean
  TTFT is the floor of any schedule that prefills in arrival order (what bounds the TTFT gain here).
The client is `vllm.benchmarks.serve` (`vllm bench serve`: `--backend openai-chat --dataset-name
custom --skip-chat-template`: vLLM's client otherwise applies the chat template itself and the server
applies it again) over the recipe's held-out prompts, greedy, at most 512 new tokens; for `priority` one field
is added to each request body (its priority). Loads are fractions of FCFS's saturation, measured
first in the same session from a burst of all prompts: completions per second between its 10th and
90th percentile completion, the simulator's rule (`completion_rate`), which leaves out the burst's drain. This machine's
speed drifts between runs, so policies run in interleaved pairs (fcfs, trail[, priority]) per load,
and each pair's ratio is reported with their spread (`--order alternate`: every second pair in reverse,
so a drift within the session favours no policy; each run records its `position` in its pair). Results (vLLM's own fields as it saves them,
plus TRAIL's live accuracy from the server's log) go to benchmarks/results/vllm_serve_client.json;
a run already there is kept (delete the file, or pass --fresh, to start over).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from results_file import merged_facts, write_results  # noqa: E402

from trail_probe.serving.simulator import completion_rate  # noqa: E402

RESULTS = HERE / "results" / "vllm_serve_client.json"
FIELDS = ("completed", "failed", "duration", "request_throughput", "output_throughput", "total_token_throughput",
          "mean_e2el_ms", "median_e2el_ms", "p99_e2el_ms", "mean_ttft_ms", "median_ttft_ms", "p99_ttft_ms",
          "mean_tpot_ms", "mean_itl_ms", "max_concurrent_requests")
SATURATION_RULE = ("completions per second between the 10th and 90th percentile completion of FCFS's burst of "
                   "--num-prompts (trail_probe.serving.simulator.completion_rate); files without this key: all "
                   "requests / the burst's duration, which counts the drain's few long requests")

def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--recipe", default="recipes/smollm2_alpaca.yaml")
    p.add_argument("--overrides", nargs="*", default=[], help="recipe overrides for TRAIL's server (serve.max_running=64 ...)")
    p.add_argument("--pairs", type=int, default=3)
    p.add_argument("--loads", default="0.8,1.0,1.5,burst")
    p.add_argument("--policies", default="fcfs,trail", help="fcfs first, then any of trail, priority, oracle, prefill")
    p.add_argument("--order", choices=("fixed", "alternate"), default="fixed",
                   help="fixed: the policies in the given order in every pair; alternate: reversed in even pairs "
                        "(A B, B A, ...), so a drift during the session favours neither")
    p.add_argument("--num-prompts", type=int, default=500)
    p.add_argument("--port", type=int, default=8350)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=str(RESULTS))
    p.add_argument("--fresh", action="store_true", help="forget the runs in --out")
    return p.parse_args(argv)


# -- the workload --
def workload(args, folder: Path) -> tuple[Path, dict, dict]:
    """The held-out prompts as vLLM's custom dataset (JSONL of {"prompt"}), and each prompt's prompt-probe
    estimate and true (greedy) output length, from the eval's predictions."""
    from trail_probe.config import load_recipe
    from trail_probe.stages.serve_bench import held_out_prompts

    cfg = load_recipe(args.recipe, args.overrides)
    held = held_out_prompts(cfg)
    path = folder / "held_out.jsonl"
    path.write_text("".join(json.dumps({"prompt": p.text}) + "\n" for p in held))
    estimates, lengths = {}, {}
    predictions = cfg.paths.eval / "predictions.json"
    if predictions.is_file():
        rows = json.loads(predictions.read_text())
        by_id = {r["id"]: r for r in (rows["requests"] if isinstance(rows, dict) else rows)}
        for p in held:
            row = by_id.get(p.id) or {}
            if row.get("prompt_probe_estimate") is not None:
                estimates[p.text] = int(round(row["prompt_probe_estimate"]))
            if row.get("output_tokens") is not None:
                lengths[p.text] = int(row["output_tokens"])
    return path, estimates, lengths


# -- servers --
def server_command(policy: str, args, model: Path) -> list[str]:
    common = ["--port", str(args.port), "--served-model-name", "model"]
    if policy == "trail":
        return ["trail-probe", "serve", args.recipe, *args.overrides, "--", *common]
    if policy == "oracle":  # trail-probe serve's command with the oracle policy (serve has no policy setting)
        from trail_probe.config import load_recipe
        from trail_probe.offline.serving_setup import trail_settings
        from trail_probe.stages.serve import vllm_command

        cfg = load_recipe(args.recipe, args.overrides)
        return vllm_command(cfg, common, trail_settings(cfg, policy="oracle", client_estimates=True))
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model), *common,
           "--gpu-memory-utilization", "0.5"]
    return cmd + (["--scheduling-policy", "priority"] if policy == "priority" else [])


def wait_ready(port: int, proc, timeout: float = 900.0) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited with {proc.returncode} before it was ready")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(2)
    raise RuntimeError(f"the server on port {port} was not ready after {timeout:.0f} s")


@contextlib.contextmanager
def serving(cmd: list[str], log: Path, port: int, env: dict | None = None):
    """A fresh server from `cmd` (its output to `log`), ready on `port`; stopped on leaving."""
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, start_new_session=True, env=env)
    try:
        wait_ready(port, proc)
        yield proc
    finally:
        stop(proc)


def stop(proc) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGINT)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def live_stats(log: Path) -> dict | None:
    """TRAIL's last live-accuracy line in the server's log (`LiveStats.parse`)."""
    from trail_probe.serving.live_stats import LiveStats

    last = None
    for line in log.read_text(errors="replace").splitlines():
        last = LiveStats.parse(line) or last
    return last


# -- one run --
def client_command(port: int, model: Path, dataset: Path, folder: Path, tag: str, *, num_prompts: int, rate: str,
                   output_len: int, seed: int, field: list[str] = (), extra: list[str] = ()) -> list[str]:
    """vLLM's benchmark client over the custom dataset, saving its result to `folder/tag.json`; `field`:
    this script's --priority/--oracle FILE (one field added to each request), `extra`: more client flags."""
    return [sys.executable, str(Path(__file__).resolve()), "--client", *field,
            "--", "--backend", "openai-chat", "--base-url", f"http://127.0.0.1:{port}",
            "--endpoint", "/v1/chat/completions", "--model", "model", "--tokenizer", str(model),
            "--dataset-name", "custom", "--dataset-path", str(dataset), "--custom-output-len", str(output_len),
            "--skip-chat-template",  # the raw prompt as the user message; the server applies the template once
            "--temperature", "0", "--num-prompts", str(num_prompts), "--request-rate", rate, *extra,
            "--seed", str(seed), "--percentile-metrics", "ttft,tpot,itl,e2el", "--metric-percentiles", "50,99",
            "--save-result", "--result-dir", str(folder), "--result-filename", f"{tag}.json"]


CLOSED_LOOP = dict(num_prompts=128, rate="inf", output_len=256, seed=0, extra=["--ignore-eos", "--max-concurrency", "32"])


def open_loop_client(port: int, model: Path, dataset: Path, folder: Path, tag: str, rate: str) -> list[str]:
    """vLLM's client sending the 200 held-out prompts at `rate` requests/s, 512 new tokens, greedy: the
    0.8x load of the cost benchmarks (vllm_cost_bisect, vllm_step_overhead, vllm_side_by_side)."""
    return client_command(port, model, dataset, folder, tag, num_prompts=200, rate=rate, output_len=512, seed=0)


def closed_loop_client(port: int, model: Path, dataset: Path, folder: Path, tag: str) -> list[str]:
    """vLLM's client with 32 requests always in flight, 256 tokens each, EOS ignored: no queue for TRAIL
    to reorder and no request ending early, so a difference between servers is their per-step cost."""
    return client_command(port, model, dataset, folder, tag, **CLOSED_LOOP)


def prepare(args, prefix: str) -> tuple[Path, Path, Path, dict, dict]:
    """The serving model's plain folder, a fresh folder for logs, and the held-out workload written there
    (`workload`: the dataset file, the prompt-probe estimates, the true lengths)."""
    from trail_probe.config import load_recipe
    from trail_probe.model_files import plain_hf_folder

    model = plain_hf_folder(load_recipe(args.recipe).model)
    folder = Path(tempfile.mkdtemp(prefix=prefix))
    return (model, folder, *workload(args, folder))


def run_once(policy: str, rate: str, args, model: Path, dataset: Path, extras: dict, folder: Path, tag: str,
             detailed: bool = False) -> dict:
    """One fresh server under one load; vLLM's result fields (with `detailed`, also each request's
    completion time from the first request's start, `finish_s`)."""
    log = folder / f"{tag}.server.log"
    with serving(server_command(policy, args, model), log, args.port):
        client = client_command(args.port, model, dataset, folder, tag, num_prompts=args.num_prompts, rate=rate,
                                output_len=1 if policy == "prefill" else 512, seed=args.seed,
                                field=[f"--{policy}", str(extras[policy])] if policy in extras else [],
                                extra=["--save-detailed"] if detailed else [])
        subprocess.run(client, check=True, stdout=subprocess.DEVNULL, stderr=open(folder / f"{tag}.client.log", "w"))
        time.sleep(12)  # one more live-accuracy line after the last request finished
    result = json.loads((folder / f"{tag}.json").read_text())
    out = {k: result.get(k) for k in FIELDS}
    if detailed:
        t0 = min(result["start_times"])
        out["finish_s"] = [s + lat - t0 for s, lat in zip(result["start_times"], result["latencies"])]
    if policy in ("trail", "oracle"):
        out["trail_live"] = live_stats(log)
    return out


def client_main(argv: list[str]) -> None:
    """vLLM's benchmark client, with one field added to each request's body: its priority (--priority
    FILE: vLLM's priority policy) or its true length (--oracle FILE: vllm_xargs for the oracle)."""
    import dataclasses

    from vllm.benchmarks import serve
    from vllm.benchmarks.lib import endpoint_request_func as funcs

    if argv and argv[0] in ("--priority", "--priorities", "--oracle"):
        kind, table = argv[0], json.loads(Path(argv[1]).read_text())
        argv = argv[2:]
        plain = funcs.ASYNC_REQUEST_FUNCS["openai-chat"]

        def field(prompt: str) -> dict:
            if kind == "--oracle":
                return {"vllm_xargs": {"trail_exact_length": table[prompt]}}
            return {"priority": table.get(prompt, 512)}

        async def with_field(request_func_input, *a, **kw):
            extra = {**(request_func_input.extra_body or {}), **field(request_func_input.prompt)}
            return await plain(dataclasses.replace(request_func_input, extra_body=extra), *a, **kw)

        funcs.ASYNC_REQUEST_FUNCS["openai-chat"] = with_field
    parser = argparse.ArgumentParser()
    serve.add_cli_args(parser)
    serve.main(parser.parse_args(argv[1:] if argv and argv[0] == "--" else argv))


# -- the session --
def summarize(runs: list[dict]) -> dict:
    """Per load: each pair's FCFS / policy ratios (mean e2e latency, mean TTFT) and tok/s ratio, with the spread."""
    out = {}
    for load in dict.fromkeys(r["load"] for r in runs):
        for policy in sorted({r["policy"] for r in runs} - {"fcfs"}):
            pairs = []
            for pair in sorted({r["pair"] for r in runs if r["load"] == load}):
                got = {r["policy"]: r for r in runs if r["load"] == load and r["pair"] == pair}
                if "fcfs" in got and policy in got:
                    f, t = got["fcfs"], got[policy]
                    pairs.append({"pair": pair, "latency_ratio": f["mean_e2el_ms"] / t["mean_e2el_ms"],
                                  "ttft_ratio": f["mean_ttft_ms"] / t["mean_ttft_ms"],
                                  "throughput_ratio": t["output_throughput"] / f["output_throughput"]})
            if pairs:
                lat = [p["latency_ratio"] for p in pairs]
                out[f"{load}/{policy}"] = {"pairs": pairs, "latency_ratio_min": min(lat), "latency_ratio_max": max(lat),
                                           "latency_ratio_mean": statistics.mean(lat)}
    return out


def print_table(runs: list[dict], summary: dict) -> None:
    print(f"{'load':>6} {'pair':>4} {'policy':>8} {'mean e2e s':>10} {'mean TTFT s':>11} {'tok/s':>7} {'done':>5}")
    for r in runs:
        print(f"{r['load']:>6} {r['pair']:>4} {r['policy']:>8} {r['mean_e2el_ms'] / 1e3:>10.2f} "
              f"{r['mean_ttft_ms'] / 1e3:>11.2f} {r['output_throughput']:>7.1f} {r['completed']:>5}")
    for key, s in summary.items():
        pairs = ", ".join(f"{p['latency_ratio']:.2f}x" for p in s["pairs"])
        ttft = ", ".join(f"{p['ttft_ratio']:.2f}x" for p in s["pairs"])
        tput = ", ".join(f"{p['throughput_ratio']:.3f}" for p in s["pairs"])
        print(f"{key}: FCFS/policy mean latency per pair {pairs}; TTFT {ttft}; tok/s policy/FCFS {tput}")


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "--client":
        return client_main(argv[1:])
    args = parse_args(argv)
    out_path = Path(args.out)
    state = json.loads(out_path.read_text()) if out_path.is_file() and not args.fresh else {}
    runs: list[dict] = state.get("runs", [])
    model, folder, dataset, estimates, lengths = prepare(args, "vllm_serve_client_")
    extras = {"priority": folder / "priorities.json", "oracle": folder / "lengths.json"}
    extras["priority"].write_text(json.dumps(estimates))
    extras["oracle"].write_text(json.dumps(lengths))
    policies = args.policies.split(",")
    if "priority" in policies and not estimates:
        raise SystemExit("the priority policy needs the eval's prompt-probe predictions; run the pipeline first")
    if "oracle" in policies and not lengths:
        raise SystemExit("the oracle policy needs the eval's predictions (true lengths); run the pipeline first")

    facts = merged_facts(state.get("facts", {}), argv)  # a file resumed or extended: every invocation that wrote runs into it

    def save() -> None:
        state.update(runs=runs, summary=summarize(runs), facts=facts, num_prompts=args.num_prompts,
                     recipe=args.recipe, overrides=args.overrides, logs=str(folder))
        write_results(out_path, state)

    loads = args.loads.split(",")
    if "saturation_rps" not in state and any(load != "burst" for load in loads):  # a burst needs no rate
        cal = run_once("fcfs", "inf", args, model, dataset, extras, folder, "saturation", detailed=True)
        state["saturation_rps"] = completion_rate(cal.pop("finish_s"))
        state["saturation_rule"] = SATURATION_RULE
        state["saturation_run"] = cal
        save()
    if "saturation_rps" in state:
        print(f"FCFS saturation: {state['saturation_rps']:.3f} requests/s (logs in {folder})")
    for load in loads:
        rate = "inf" if load == "burst" else f"{float(load) * state['saturation_rps']:.4f}"
        name = "burst" if load == "burst" else f"{float(load):.1f}x"
        for pair in range(1, args.pairs + 1):
            in_pair = policies[::-1] if args.order == "alternate" and pair % 2 == 0 else policies
            for position, policy in enumerate(in_pair, 1):
                if any(r["load"] == name and r["pair"] == pair and r["policy"] == policy for r in runs):
                    continue
                tag = f"{name}_{pair}_{policy}"
                print(f"# {tag}: rate {rate} req/s", flush=True)
                result = run_once(policy, rate, args, model, dataset, extras, folder, tag)
                runs.append({"policy": policy, "load": name, "pair": pair, "position": position, "vllm_defaults": True,
                             "request_rate": rate, **result})
                save()
    print_table(runs, summarize(runs))


if __name__ == "__main__":
    main()
