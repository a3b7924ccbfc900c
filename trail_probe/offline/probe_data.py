"""What a probe trains on: its inputs, labels and true lengths from an extraction, split by request.

    data = load_data(extraction, spec, split, bins, per_request=16, seed=0, probe_input="entropy",
                     prompt_labels="median")
    data.train.tensors   # (x, labels, tokens, cap): x [n, d'] or [n, layers, d'], labels [n] or [n, K]

The input is the one `runtime/probe_inputs.py` defines and the extraction stored (`Extraction.prompt_states`
/ `.decode` with a kind); a current+pool input is both vectors side by side. Labels are bins of the
answer's length (prompt task: total; decode task: remaining), TRAIL's, except for the prompt probe
with `prompt_labels` median or soft (below). The held-out side (what chooses the epoch) always
carries the greedy answer's bins and lengths: the greedy answer is what serving sees.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from trail_probe.errors import UserError
from trail_probe.offline.probe_module import TensorRows, sample_per_group
from trail_probe.runtime.bins import Bins
from trail_probe.runtime.models import dtype_of
from trail_probe.runtime.probe_inputs import DEFAULT_INPUT


@dataclass
class ProbeData:
    train: TensorRows  # (x, labels, tokens, cap); x is [n, d'] or [n, layers, d']
    val: TensorRows
    train_groups: torch.Tensor | None  # request of each training row (decode task), for per-request sampling
    input_dim: int
    num_train_requests: int
    num_val_requests: int


def prompt_targets(extraction, bins: Bins, labels: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(training labels, training lengths) of every request for the prompt probe.

    greedy: the bin of the greedy answer's length (TRAIL's). median: the bin of the median of the
    request's `extract.num_samples` sampled lengths (ProD's: one answer's length is a noisy draw of
    what the prompt asks for; the median of several is a steadier target). soft: their histogram over
    the bins as the target distribution [N, K] (the spread itself), with the median as the length a
    ranking loss orders by. Decode labels stay greedy: a decode sample's label is the remaining length
    of the answer whose tokens are in its state, and the sampled answers part from the greedy one at
    their first different token, so their lengths are not labels for the greedy answer's later states
    (nor are their states stored)."""
    if labels == "greedy":
        tokens = extraction.output_tokens
        return bins.label(tokens), tokens.float()
    sampled = extraction.sampled_lengths().double()  # [N, S]
    median = sampled.quantile(0.5, dim=1)
    if labels == "median":
        return bins.label(median), median.float()
    hist = torch.nn.functional.one_hot(bins.label(sampled), bins.num_bins).double().mean(1)
    return hist.float(), median.float()


def _inputs(extraction, spec, kind: str) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor, torch.Tensor]:
    """(states per layer, greedy lengths, request of each row, estimate cap) of the probe's task."""
    max_new = float(extraction.manifest["generation"]["max_new_tokens"])
    if spec.task == "prompt":
        states = [extraction.prompt_states(layer, kind) for layer in spec.layers]
        tokens = extraction.output_tokens
        return states, tokens, torch.arange(len(tokens)), torch.full((len(tokens),), max_new)
    # a stack holds many layers in memory at once: kept in the storage dtype (exact), fp32 per batch
    keep = dtype_of(extraction.manifest.get("storage_dtype", "float32")) if spec.mode == "stack" else torch.float32
    first = extraction.decode(spec.layers[0], kind)
    states = [first.states.to(keep)] + [extraction.decode(layer, kind).states.to(keep) for layer in spec.layers[1:]]
    return states, first.remaining, first.request, max_new - first.generated.float()  # never past max_new_tokens


def load_data(extraction, spec, split: dict, bins: Bins, per_request: int, seed: int, probe_input: str | None = None,
              prompt_labels: str = "greedy") -> ProbeData:
    """The probe's inputs, labels and true lengths as in-memory tensors, split by request. `spec`: the
    probe's task, layers and mode (`train.ProbeSpec`); `probe_input`: what it reads (default TRAIL's)."""
    kind = probe_input or DEFAULT_INPUT[spec.task]
    train_ids, val_ids = set(split["train_ids"]), set(split["val_ids"])
    is_train = torch.tensor([rid in train_ids for rid in extraction.ids], dtype=torch.bool)
    is_val = torch.tensor([rid in val_ids for rid in extraction.ids], dtype=torch.bool)  # what selects epochs
    states, tokens, request, cap = _inputs(extraction, spec, kind)
    x = states[0] if spec.mode == "none" else torch.stack(states, 1)
    rows = TensorRows(x, bins.label(tokens), tokens.float(), cap)
    train_rows = torch.nonzero(is_train[request]).squeeze(1)
    val_rows = torch.nonzero(is_val[request]).squeeze(1)
    if spec.task == "decode" and per_request > 0:
        picked = sample_per_group(request[val_rows], per_request, torch.Generator().manual_seed(seed))
        val_rows = val_rows[picked.sort().values]
    for side, picked in (("training", train_rows), (split.get("side", "held-out"), val_rows)):
        if len(picked) == 0:
            raise UserError(f"the {side} side of the split has no {spec.task} samples; extract more prompts "
                            "or change train.train_fraction")
    train = TensorRows(*(t[train_rows] for t in rows.tensors))
    if spec.task == "prompt" and prompt_labels != "greedy":  # the training side's targets only
        labels, lengths = prompt_targets(extraction, bins, prompt_labels)
        train = TensorRows(x[train_rows], labels[train_rows], lengths[train_rows], cap[train_rows])
    return ProbeData(
        train=train, val=TensorRows(*(t[val_rows] for t in rows.tensors)),
        train_groups=request[train_rows] if spec.task == "decode" else None, input_dim=x.shape[-1],
        num_train_requests=int(is_train.sum()), num_val_requests=int(is_val.sum()))
