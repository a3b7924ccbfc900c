"""TRAIL's serving settings (the vLLM plugin's, serve-bench's, predict's): one typed object, one key, validated once.

    settings = TrailSettings(predictor="checkpoints/smollm2_alpaca/predictor")
    vllm serve MODEL --scheduler-cls trail_probe.serving.vllm_scheduler.TrailVLLMScheduler \\
        --additional-config '{"trail_probe": {"predictor": "checkpoints/smollm2_alpaca/predictor"}}'
    settings.additional_config()           # {"trail_probe": {...}}, what --additional-config takes
    TrailSettings.from_vllm_config(cfg)     # in the engine core and the worker: None when TRAIL is off

Every key has a default except `predictor` (the exported decode probe); a key that is not a field is
refused with the list of fields, so a misspelt key never silently becomes a default. The recipe's
`refine:` and `serve:` sections map onto it in `trail_probe.offline.serving_setup` (`trail-probe
serve`, serve-bench and predict all build it there), and `trail_state.build_state` turns it
into the scheduler's runtime, the one place where predictors are loaded for serving.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from trail_probe.choices import (ExtractionCheck, InitialSource, Likelihood, PrefillOrder, RefineCadence, RefineWhen,
                                  check_choice)
from trail_probe.errors import UserError
from trail_probe.runtime.estimates import check_interval
from trail_probe.serving.policies import check_aging, check_preemption_c, make_policy

KEY = "trail_probe"  # the one key in vLLM's additional_config
INITIAL_DIR = "prompt"  # an export's bundled prompt probe (trail-probe export writes it), the default initial estimator
BERT_DIR = "bert"  # an export's bundled BERT, when exported with export.include_baseline=true


@dataclass(frozen=True)
class TrailSettings:
    predictor: str  # the exported decode probe (TRAIL's predictor folder)
    policy: str = "trail"  # trail | trail_bert | sjf_bert | oracle, optionally name@C / name~A
    # where a request's first estimate comes from. prompt_probe and last_token read the serving model's
    # own prefill (no client help): a new request is prefilled at once and ranked from its estimate
    initial: str = "prompt_probe"
    prompt_predictor: str = ""  # default: <predictor>/prompt when it exists
    bert: str = ""  # default: <predictor>/bert; only for initial=bert (the client sends the prompt text)
    refine_interval: int = 8  # k: refine every k generated tokens
    likelihood: str = "posterior"  # TRAIL's update rule, or prior_corrected
    cadence: str = "per_request"  # or global (TRAIL's release)
    preemption_c: float = 0.8  # limited preemption: preemptible while generated <= C * initial estimate
    aging: float = 0.0  # tokens of predicted length forgiven per second waited (0: TRAIL's rule)
    # decoding requests TRAIL runs at once; 0: chosen from the engine's own step times, the smallest
    # batch whose throughput is within max_throughput_loss of vLLM's max_num_seqs (serving/step_cost.py)
    max_running: int = 0
    max_throughput_loss: float = 0.04  # with max_running 0; 0 keeps vLLM's max_num_seqs
    max_prefill_tokens: int = 0  # prompt tokens of not-yet-ranked requests started per step (0: vLLM's token budget)
    prefill_order: str = "shortest"  # which new requests start their prefill first: shortest prompts, or arrival
    # while new requests' prompts fill a step's prefill budget (a burst), that step runs their prefills alone
    # (the running requests skip it): a burst's first tokens come sooner, at one step's fixed cost per step held
    prefills_alone: bool = True
    refine_when: str = "waiting"  # refine only while requests wait for a slot (the ranking has a choice), or always
    client_estimates: bool = False  # trust trail_* vllm_xargs from clients (estimates, exact lengths, prompt text)
    record: bool = False  # keep a step log and per-request estimates for benchmarks (bounded)
    record_states: bool = False  # keep the states refinements used (parity tests only; bounded)
    stats_interval_s: float = 10.0  # seconds between the live-accuracy log lines (0: never)
    extraction_check: str = "warn"  # a probe trained on states another engine or dtype computed

    def __post_init__(self) -> None:
        if not self.predictor and not self.is_oracle:
            raise UserError(f"{KEY}.predictor is required: the folder 'trail-probe export' wrote (e.g. checkpoints/RUN/predictor)")
        make_policy(self.policy, self.preemption_c, self.aging)  # refuses an unknown policy or a bad @C / ~A
        check_choice(self.initial, InitialSource, f"{KEY}.initial")
        check_choice(self.likelihood, Likelihood, f"{KEY}.likelihood")
        check_choice(self.cadence, RefineCadence, f"{KEY}.cadence")
        check_choice(self.prefill_order, PrefillOrder, f"{KEY}.prefill_order")
        check_choice(self.refine_when, RefineWhen, f"{KEY}.refine_when")
        check_choice(self.extraction_check, ExtractionCheck, f"{KEY}.extraction_check")
        check_interval(self.refine_interval, f"{KEY}.refine_interval")
        check_preemption_c(self.preemption_c, f"{KEY}.preemption_c")
        check_aging(self.aging, f"{KEY}.aging")
        for f in fields(self):  # a switch given as a string ("false") would otherwise count as on
            if f.type == "bool" and not isinstance(getattr(self, f.name), bool):
                raise UserError(f"{KEY}.{f.name} = {getattr(self, f.name)!r} must be true or false")
        for name in ("max_running", "max_prefill_tokens"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise UserError(f"{KEY}.{name} = {value!r} must be a whole number >= 0 (0: the default rule)")
        if not (isinstance(self.max_throughput_loss, (int, float)) and 0 <= self.max_throughput_loss < 1):
            raise UserError(f"{KEY}.max_throughput_loss = {self.max_throughput_loss!r} must be in [0, 1): the share of "
                            "throughput TRAIL may give up for a smaller batch (0: never)")
        if not (isinstance(self.stats_interval_s, (int, float)) and math.isfinite(self.stats_interval_s)
                and self.stats_interval_s >= 0):
            raise UserError(f"{KEY}.stats_interval_s = {self.stats_interval_s!r} must be a number of seconds >= 0")
        if self.is_oracle and not self.client_estimates:
            raise UserError(f"{KEY}.policy = oracle ranks by each request's exact length, which only a client can send; "
                            f"set {KEY}.client_estimates=true (benchmarks only)")
        if self.initial == "bert" and not self.client_estimates:
            raise UserError(f"{KEY}.initial = bert needs the prompt text from the client (vllm_xargs trail_prompt_text); "
                            f"set {KEY}.client_estimates=true, or use initial=prompt_probe (the model's own prefill)")

    @property
    def is_oracle(self) -> bool:
        return self.policy.split("@")[0].split("~")[0] == "oracle"

    @property
    def prefill_first(self) -> bool:
        """Whether a request's first estimate comes from its own prefill, so it is prefilled before it is ranked."""
        return self.initial in ("prompt_probe", "last_token") and not self.is_oracle

    def prompt_predictor_path(self) -> Path | None:
        """The prompt probe initial=prompt_probe reads: the setting, else the one bundled with the predictor."""
        if self.initial != "prompt_probe" or self.is_oracle:
            return None
        path = Path(self.prompt_predictor) if self.prompt_predictor else Path(self.predictor) / INITIAL_DIR
        if not (path / "config.json").is_file():
            raise UserError(f"initial=prompt_probe needs a prompt probe, and there is none at '{path}'; export one with "
                            "'trail-probe export RECIPE' (it bundles it), set prompt_predictor, or use initial=last_token")
        return path

    def bert_path(self) -> Path | None:
        if self.initial != "bert":
            return None
        path = Path(self.bert) if self.bert else Path(self.predictor) / BERT_DIR
        if not path.is_dir():
            raise UserError(f"initial=bert needs a BERT predictor, and there is none at '{path}'; export with "
                            "export.include_baseline=true or set bert")
        return path

    # -- crossing into vLLM --
    def additional_config(self) -> dict:
        """What vLLM's --additional-config takes (plain JSON: it crosses into the engine-core process)."""
        return {KEY: asdict(self)}

    def to_json(self) -> str:
        return json.dumps(self.additional_config())

    @classmethod
    def from_dict(cls, data) -> "TrailSettings":
        if not isinstance(data, dict):
            raise UserError(f"{KEY} settings must be a JSON object, got {type(data).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise UserError(f"unknown {KEY} setting(s) {', '.join(unknown)}; the settings are {', '.join(sorted(known))}")
        return cls(**{"predictor": "", **data})

    @classmethod
    def from_vllm_config(cls, vllm_config) -> "TrailSettings | None":
        """The settings an engine was started with, or None when TRAIL is not configured."""
        extra = getattr(vllm_config, "additional_config", None) or {}
        data = extra.get(KEY) if isinstance(extra, dict) else None
        return None if data is None else cls.from_dict(data)
