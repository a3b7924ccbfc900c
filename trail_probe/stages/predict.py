"""See the predictor work on your own prompt (`trail-probe predict`).

    trail-probe predict recipes/smollm2_alpaca.yaml "Explain how neural networks are used in AI."
    trail-probe predict recipes/smollm2_alpaca.yaml --file prompts.jsonl --json

Loads the serving model (`model.*`) and the exported predictor (`serve.predictor`, default the
export), prints BERT's estimate (the baseline at `serve.bert`, when there is one) and the prompt-time
estimate the scheduler starts from, then generates the answer greedily and shows, every
`refine.interval` tokens, the refined estimate of the tokens still to come; when the answer is
complete, a table sets each estimate against the tokens that were actually left. On a terminal the
estimate is a live line under the streaming answer; with `--json`, or when the output is piped, one
JSON object per prompt.

It is the serving code, not a copy: `TrailState` (the schedulers' runtime) with its tracker, the
probe's hook from `LengthPredictor.capture`, and the chat template, EOS set and refinement cadence
of every other stage. A predictor made for another serving model (another weight hash, width or
number of layers) is refused in one line.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from trail_probe.config import RecipeConfig
from trail_probe.errors import UserError
from trail_probe.offline.prompts import load_prompts

HELP = "Generate an answer to your own prompt and watch the predictor estimate how long it will be."
EXAMPLES = """examples:
  trail-probe predict recipes/smollm2_alpaca.yaml "Explain how neural networks are used in AI."
  trail-probe predict recipes/smollm2_alpaca.yaml --file prompts.jsonl --json
  trail-probe predict recipes/smollm2_alpaca.yaml "Name three colours." generation.max_new_tokens=64 refine.interval=4
The prompt is the first argument after the recipe that is not a key=value override."""
TAKES_INPUTS = True  # free arguments after the recipe are prompts, not overrides

REQUEST_ID = "predict"


def add_arguments(parser) -> None:
    parser.add_argument("--file", help="a .jsonl/.json file of prompts ({'id', 'prompt'} rows), as extract reads them")
    parser.add_argument("--json", action="store_true", help="one JSON object per prompt instead of the live view")


def _prompts(cfg: RecipeConfig, args) -> list[tuple[str, str]]:
    texts = list(getattr(args, "inputs", []) or [])
    if args.file and texts:
        raise UserError("give the prompt as an argument or --file, not both")
    if args.file:
        if not Path(args.file).is_file():
            raise UserError(f"prompt file '{args.file}' does not exist; give a .jsonl file with one {{'id', 'prompt'}} per line")
        return [(p.id, p.text) for p in load_prompts(args.file, split=cfg.prompts.split, skip_bad_rows=False)[0]]
    if not texts:
        raise UserError('no prompt; write it after the recipe, e.g. trail-probe predict RECIPE "Explain how neural networks are used in AI."')
    if len(texts) > 1:
        raise UserError(f"one prompt at a time ('{texts[1][:40]}' is a second); quote the prompt, or use --file for several")
    if not texts[0].strip():
        raise UserError("the prompt is empty; write the question after the recipe")
    return [("prompt", texts[0])]


def load_predictors(cfg: RecipeConfig, model) -> tuple:
    """(the serving settings, BERT or None): the export checked against the serving model, the initial
    estimate the recipe asks for where the export has it (serve.initial: the prompt probe bundled in the
    export by default; else BERT when trained, else the decode probe on the last prompt token)."""
    from trail_probe.offline.serving_setup import trail_settings
    from trail_probe.runtime import BertLengthPredictor, LengthPredictor
    from trail_probe.runtime.predictor import check_trained_on

    folder = cfg.paths.serve_predictor
    if not folder.is_dir():
        raise UserError(f"no predictor at '{folder}'; run 'trail-probe export RECIPE' or set serve.predictor")
    bert = BertLengthPredictor.from_pretrained(cfg.paths.serve_bert, device="cpu") if cfg.paths.serve_bert.is_dir() else None
    settings = trail_settings(cfg, record=True, client_estimates=True)
    try:
        prompt = settings.prompt_predictor_path()
    except UserError:
        fallback = "bert" if bert is not None else "last_token"
        print(f"# {folder} bundles no prompt probe: the prompt-time estimate comes from {fallback}", file=sys.stderr)
        settings, prompt = trail_settings(cfg, record=True, client_estimates=True, initial=fallback,
                                          bert=str(cfg.paths.serve_bert)), None
    for path in filter(None, (folder, prompt)):
        check_trained_on(LengthPredictor.from_pretrained(path, device="cpu"), cfg.model.name_or_path)
    return settings, bert


def predict_one(cfg: RecipeConfig, model, tokenizer, predictors: tuple, text: str, on_refine=None) -> dict:
    """Generate the answer to `text` greedily while the runtime refines its estimate; `on_refine(generated,
    estimate, token_text)` runs at every refinement (the live view). Returns the whole record."""
    import torch

    from trail_probe.runtime.models import encode_prompt, eos_token_ids
    from trail_probe.serving.hf_scheduler import attach
    from trail_probe.serving.trail_state import build_state

    settings, bert = predictors
    initial = settings.initial
    runtime = build_state(settings, max_new_tokens=cfg.generation.max_new_tokens)
    predictor = runtime.predictor
    bert_probs = bert.probs([text])[0] if bert is not None else None  # once: the runtime takes it as given
    if bert_probs is not None:
        runtime.initial_probs[REQUEST_ID] = bert_probs.tolist()
    runtime.admit([REQUEST_ID])
    prompt_ids = encode_prompt(tokenizer, text)
    eos = sorted(eos_token_ids(model, tokenizer))
    prompt_layer = runtime.layer if runtime.prompt_layer is None else runtime.prompt_layer
    forwards = {layer: 0 for layer in runtime.state_layers}  # forward passes each hooked layer has seen
    new_tokens: list[int] = []

    def on_forward(layer: int, states: torch.Tensor) -> None:
        # the first forward pass is the prefill (the prompt probe's layer gives the initial estimate);
        # decode pass g reads the decode probe layer's state of token g (generated = g)
        g, forwards[layer] = forwards[layer], forwards[layer] + 1
        if g == 0 and layer == prompt_layer:
            runtime.add_prompt_states(REQUEST_ID, states[0], done=True)
        elif g > 0 and layer == runtime.layer:
            before = len(runtime.trace.get(REQUEST_ID, []))
            runtime.observe([REQUEST_ID], states[:, -1], [g])
            points = runtime.trace.get(REQUEST_ID, [])
            if on_refine is not None and len(points) > before:
                on_refine(points[-1][0], points[-1][1])

    class Tokens:  # a streamer: generate hands it each new token
        def put(self, value):
            if forwards[runtime.layer] > 0:  # the prompt comes first, then one token per step
                new_tokens.extend(value.reshape(-1).tolist())

        def end(self):
            pass

    start = time.perf_counter()
    capture = attach(model, runtime, on_forward, keep=False)  # the policy refines: never None here
    try:
        with torch.inference_mode():
            model.generate(torch.tensor([prompt_ids], device=next(model.parameters()).device), do_sample=False,
                           max_new_tokens=cfg.generation.max_new_tokens, eos_token_id=eos, pad_token_id=eos[0],
                           streamer=Tokens())
    finally:
        capture.remove()
    elapsed = time.perf_counter() - start
    ended = bool(new_tokens) and new_tokens[-1] in eos
    n = len(new_tokens) - 1 if ended else len(new_tokens)  # as extraction counts an answer: without its EOS
    bert_estimate = float(bert.bins.expectation(bert_probs[None])[0]) if bert is not None else None
    refined = [{"generated": g, "estimate_left": e, "actual_left": n - g, "error": e - (n - g)}
               for g, e in runtime.trace.get(REQUEST_ID, []) if g <= n]
    return {"prompt": text, "answer": tokenizer.decode(new_tokens[:n], skip_special_tokens=True),
            "output_tokens": n, "hit_cap": not ended, "prompt_tokens": len(prompt_ids),
            "bert_estimate": bert_estimate, "initial_estimate": runtime.initial_estimates.get(REQUEST_ID),
            "initial_source": initial, "refine_interval": cfg.refine.interval, "refined": refined,
            "mean_abs_error": sum(abs(r["error"]) for r in refined) / len(refined) if refined else None,
            "seconds": elapsed, "predictor": str(cfg.paths.serve_predictor), "layer": predictor.layer}


def format_record(rec: dict) -> str:
    lines = [f"answer: {rec['output_tokens']} tokens" + (" (stopped at generation.max_new_tokens)" if rec["hit_cap"] else "")
             + f", {rec['seconds']:.1f} s"]
    if rec["bert_estimate"] is not None:
        lines.append(f"BERT's estimate from the prompt text: {rec['bert_estimate']:.0f} tokens")
    lines.append(f"prompt-time estimate ({rec['initial_source']}): {rec['initial_estimate']:.0f} tokens")
    lines.append(f"{'generated':>9} {'estimate left':>14} {'actually left':>14} {'error':>7}")
    lines += [f"{r['generated']:>9} {r['estimate_left']:>14.0f} {r['actual_left']:>14} {r['error']:>+7.0f}" for r in rec["refined"]]
    if rec["mean_abs_error"] is not None:
        lines.append(f"mean absolute error of the refined estimates: {rec['mean_abs_error']:.1f} tokens "
                     f"(probe on layer {rec['layer']}, every {rec['refine_interval']} tokens)")
    return "\n".join(lines)


def run(cfg: RecipeConfig, args) -> None:
    from trail_probe.runtime.models import load_causal_lm

    prompts = _prompts(cfg, args)
    model, tokenizer = load_causal_lm(cfg.model)
    predictors = load_predictors(cfg, model)
    live = not args.json and sys.stdout.isatty()
    for pid, text in prompts:
        def show(generated: int, estimate: float) -> None:
            print(f"\r  token {generated:>4}: ~{estimate:.0f} tokens left   ", end="", flush=True)

        head = f"prompt: {text}" if pid == "prompt" else f"prompt {pid}: {text}"
        if live:
            print(head)
        rec = predict_one(cfg, model, tokenizer, predictors, text, on_refine=show if live else None)
        if args.json:
            print(json.dumps({"id": pid, **rec}), flush=True)
        else:
            print(("\r" if live else "") + f"{head}\n{rec['answer']}\n" + format_record(rec) + "\n", flush=True)
