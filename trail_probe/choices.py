"""Every enumerated setting of the toolkit, decided here once.

The recipe loader (`trail_probe.config`) checks config values against these `Literal` types, and a
library call that takes the same choice checks it with `check_choice`, so a choice is spelled and
validated in one place.
"""

from __future__ import annotations

import typing
from typing import Literal

from trail_probe.errors import UserError

Task = Literal["prompt", "decode"]  # prompt: mean prompt state -> total length; decode: step state -> remaining
TaskSelection = Literal["prompt", "decode", "both"]
MultiLayer = Literal["none", "concat", "weighted_mean"]
Logger = Literal["csv", "tensorboard", "wandb"]
# cross-entropy over bins; balanced: weighted by inverse bin frequency; emd: an ordinal loss on the same
# softmax (squared earth mover's distance between predicted and true bin CDFs)
# rank: cross-entropy plus a pairwise ranking loss on the batch's expected lengths (offline/probe_losses.py)
ProbeLoss = Literal["ce", "balanced_ce", "emd", "rank"]
# What a probe reads (runtime/probe_inputs.py defines each): the prompt pooled over its tokens (mean:
# TRAIL's; last: the last prompt token; entropy: weighted by the model's next-token entropy), and at a
# decode step the current token's state (TRAIL's), a running pool of the generated tokens' states so
# far, or both side by side
PromptInput = Literal["mean", "last", "entropy"]
# what an extraction stores beside TRAIL's two (the prompt mean, the current token's state): trained: the
# inputs the recipe's train.prompt_input / train.decode_input read (the default: nothing it does not use);
# all: every pooled input (the input ablation's; the entropy ones only with extract.entropy); trail: none
ExtractInputs = Literal["trained", "all", "trail"]
DecodeInput = Literal["current", "mean", "entropy", "current+mean", "current+entropy"]
# the prompt probe's labels: the greedy answer's length (TRAIL's), or from extract.num_samples sampled
# answers: their median length, or their histogram over the bins as soft targets
PromptLabels = Literal["greedy", "median", "soft"]
# which tasks' layer searches (train.layers=search) start from the layers a ridge screen of every layer
# ranks best (offline/layer_screen.py) instead of an evenly spread grid
RidgeScreen = Literal["none", "decode", "both"]
TooLong = Literal["skip", "truncate"]  # prompts that leave no room for max_new_tokens
# The per-step factor of the Bayes update: TRAIL's rule (the probe's output as it is), or the same
# with the training labels' bin frequencies divided out (refine.step_likelihood).
Likelihood = Literal["posterior", "prior_corrected"]
# eval: the distribution before the first decode step; last_token: the decode probe on the last prompt
# token's state (TRAIL's release; recomputed by offline.prefill_states, the extraction does not store it)
RefinePrior = Literal["auto", "prompt_probe", "bert", "last_token", "none"]
# serving: where a request's first estimate comes from; last_token is TRAIL's release: the decode probe
# on the last prompt token's state is the first distribution, BERT (when given) only the initial number
InitialSource = Literal["bert", "prompt_probe", "last_token", "none"]
# per_request: a request refines at its own generated = 1, 1 + k, ...; global: every k forward passes
# of the whole batch, each request's prior advanced by T^k whatever it generated (TRAIL's release)
RefineCadence = Literal["per_request", "global"]
# the order in which prefill-first starts new requests (their prefill gives the first estimate): the
# fewest prompt tokens first (a burst's mean time to first token is lowest), or arrival order
PrefillOrder = Literal["shortest", "arrival"]
# when the vLLM plugin refines running requests' estimates: only while requests wait (a queue, paused
# requests, prefills that found no slot; refinements only serve the ranking, which then has a choice to
# make), or at every k tokens whatever the load
RefineWhen = Literal["waiting", "always"]
# eval: the held-out 25% (scored once, at the end), or the validation split carved out of the training
# side (for choosing refinement settings without looking at the held-out side)
EvalSplit = Literal["held_out", "validation"]
EnginePolicy = Literal["fifo", "trail", "trail_bert", "sjf_bert"]  # fifo: the engine's own scheduler
# vLLM serving a probe trained on states another engine or dtype computed: say so, refuse, or say nothing
ExtractionCheck = Literal["warn", "refuse", "off"]
EngineName = Literal["hf", "vllm"]  # extract and serve-bench: transformers (the reference), or vLLM's V1 engine
# vLLM adds its own priority policy, fed BERT's estimate (what a user could do without trail_probe)
VLLMPolicy = Literal["fifo", "priority", "trail", "trail_bert", "sjf_bert", "oracle"]  # oracle: lengths from the fifo run
PausedCache = Literal["keep", "discard"]  # simulator: what a preempted request's KV cache does


def options(choice) -> tuple[str, ...]:
    return typing.get_args(choice)


def check_choice(value, choice, what: str) -> str:
    """`value` if it is one of `choice`'s options, else a one-line UserError naming `what`."""
    allowed = options(choice)
    if value not in allowed:
        raise UserError(f"{what} = {value!r} is not one of {', '.join(allowed)}")
    return value
