"""What a length probe reads, defined once: the extraction stores these inputs and a serving engine
computes the same ones online, from these functions.

Notation, for the probe's layer L (TRAIL numbering: the residual stream after decoder layer L):
  h_t  the state at token position t (0-based over prompt + answer)
  H_t  the entropy in nats (float32, over the full vocabulary) of the model's next-token distribution
       computed at position t: the softmax of the logits at t, before any sampling setting
       (temperature, top-p, penalties) is applied (`token_entropy`)
  P    the prompt's length in tokens, every token of the chat template included
  g    tokens generated so far. The forward pass that produces token g + 1 reads position P - 1 + g:
       g = 0 is the prefill (whose input is the last prompt token), g >= 1 a decode step. A probe is
       refined at g = 1, 1 + k, ... (`runtime.estimates.refines_at`).

Prompt inputs, over t = 0 .. P - 1 (`prompt_input`):
  mean      sum_t h_t / P                                   (TRAIL's)
  last      h_{P-1}
  entropy   sum_t H_t h_t / sum_t H_t                       (the mean where sum_t H_t == 0)

Decode inputs at generated = g >= 1, over the generated tokens' positions P - 1 + j, j = 1 .. g
(the current position included, the last prompt token not) (`decode_input`):
  current          h_{P-1+g}                                (TRAIL's)
  mean             sum_j h_{P-1+j} / g
  entropy          sum_j H_{P-1+j} h_{P-1+j} / sum_j H_{P-1+j}   (the mean where that sum is 0)
  current+mean     [current, mean], concatenated (width 2d)
  current+entropy  [current, entropy]

Both are functions of running sums, so an engine keeps O(d) per request and layer: sum_h = sum h_t,
sum_wh = sum H_t h_t, sum_w = sum H_t and count, beside the last (prompt) or current (decode) state.
`RunningPools` keeps them for a table of requests, as the extraction's decode loop does. H_{P-1+g}
comes from the logits of the same forward pass as h_{P-1+g}, so an entropy pool at step g is ready
once that pass's logits are, not in the layer's hook.
"""

from __future__ import annotations

import numpy as np
import torch

from trail_probe.choices import DecodeInput, PromptInput, check_choice

DEFAULT_INPUT = {"prompt": "mean", "decode": "current"}  # TRAIL's: what a probe without a recorded input reads
DESCRIPTION = {
    "prompt": {"mean": "mean prompt state", "last": "last prompt token's state",
               "entropy": "entropy-weighted prompt state"},
    "decode": {"current": "current token's state", "mean": "mean of the generated tokens' states",
               "entropy": "entropy-weighted mean of the generated tokens' states",
               "current+mean": "current state beside the generated tokens' mean",
               "current+entropy": "current state beside the generated tokens' entropy-weighted mean"},
}
ENTROPY_ROWS = 256  # logits rows per softmax in `token_entropy` (bounds its float32 copies)


def check_input(task: str, kind: str, what: str = "the probe input") -> str:
    """`kind` if it is one of `task`'s inputs, else a one-line UserError naming `what`."""
    return check_choice(kind, PromptInput if task == "prompt" else DecodeInput, what)


def input_parts(kind: str) -> tuple[str, ...]:
    """The pooled vectors an input concatenates: "current+mean" -> ("current", "mean")."""
    return tuple(kind.split("+"))


def input_width(kind: str, hidden_size: int) -> int:
    """The width of an input built from states of width `hidden_size`."""
    return hidden_size * len(input_parts(kind))


def describe(task: str, kind: str) -> str:
    return DESCRIPTION[task][kind]


def token_entropy(logits: torch.Tensor, rows: int = ENTROPY_ROWS) -> torch.Tensor:
    """[...] float32: the entropy in nats of softmax(logits) over the last dimension (the full
    vocabulary), `rows` rows at a time. A logit of -inf (a masked token) adds nothing."""
    flat = logits.reshape(-1, logits.shape[-1])
    out = torch.empty(flat.shape[0], dtype=torch.float32, device=logits.device)
    for a in range(0, flat.shape[0], rows):
        logp = torch.log_softmax(flat[a:a + rows].float(), -1)
        p = logp.exp()
        out[a:a + rows] = -torch.where(p > 0, p * logp, torch.zeros_like(p)).sum(-1)
    return out.reshape(logits.shape[:-1])


def _per_row(x, like: torch.Tensor) -> torch.Tensor:
    """A per-row count or weight total [r] shaped to divide sums [r, ...] (or a plain number)."""
    x = torch.as_tensor(x, dtype=torch.float32, device=like.device)
    return x.reshape(x.shape + (1,) * (like.dim() - x.dim()))


def mean_pool(sum_h: torch.Tensor, count) -> torch.Tensor:
    """sum_h / count: the mean of the states summed (count: a number, or one per leading row)."""
    return sum_h / _per_row(count, sum_h)


def entropy_pool(sum_wh: torch.Tensor, sum_w, sum_h: torch.Tensor, count) -> torch.Tensor:
    """sum_wh / sum_w, the entropy-weighted mean; the plain mean where sum_w == 0 (every token certain)."""
    w = _per_row(sum_w, sum_wh)
    return torch.where(w > 0, sum_wh / torch.where(w > 0, w, torch.ones_like(w)), mean_pool(sum_h, count))


def prompt_input(kind: str, sum_h: torch.Tensor, count, last: torch.Tensor | None = None,
                 sum_wh: torch.Tensor | None = None, sum_w=None) -> torch.Tensor:
    """The prompt probe's input `kind` from the prompt's running sums and its last token's state."""
    check_input("prompt", kind, "prompt input")
    if kind == "mean":
        return mean_pool(sum_h, count)
    if kind == "last":
        if last is None:
            raise ValueError("prompt input 'last' needs the last prompt token's state")
        return last
    if sum_wh is None or sum_w is None:
        raise ValueError("prompt input 'entropy' needs the entropy-weighted sums")
    return entropy_pool(sum_wh, sum_w, sum_h, count)


def decode_input(kind: str, current: torch.Tensor, sum_h: torch.Tensor | None = None, count=None,
                 sum_wh: torch.Tensor | None = None, sum_w=None) -> torch.Tensor:
    """The decode probe's input `kind` at a step: the current state and the generated tokens' running
    sums (the current one included), concatenated for the current+pool inputs."""
    check_input("decode", kind, "decode input")
    parts = []
    for part in input_parts(kind):
        if part == "current":
            parts.append(current)
        elif sum_h is None or count is None or (part == "entropy" and (sum_wh is None or sum_w is None)):
            raise ValueError(f"decode input '{kind}' needs the generated tokens' running sums")
        else:
            parts.append(mean_pool(sum_h, count) if part == "mean" else entropy_pool(sum_wh, sum_w, sum_h, count))
    return parts[0] if len(parts) == 1 else torch.cat(parts, -1)


class RunningPools:
    """The running sums of a table of requests (one row each), O(state size) per row: sum_h and, when
    `weighted`, sum_wh [rows, *shape] (float32), with sum_w and count [rows]. `shape` is one state's
    (d,), or (layers, d) for several layers of the same tokens (they share the weights and count)."""

    def __init__(self, rows: int, shape: tuple[int, ...], weighted: bool, device=None):
        self.shape, self.weighted = tuple(shape), weighted
        self.sum_h = torch.zeros(rows, *shape, device=device)
        self.sum_wh = torch.zeros(rows, *shape, device=device) if weighted else None
        self.sum_w = torch.zeros(rows, device=device)
        self.count = torch.zeros(rows, device=device)

    def __len__(self) -> int:
        return len(self.count)

    def _tensors(self) -> list[str]:
        return ["sum_h", "sum_w", "count"] + (["sum_wh"] if self.weighted else [])

    def reset(self, index) -> None:
        """Start the rows `index` again (a new request in a slot, or one recomputed from its start)."""
        for name in self._tensors():
            getattr(self, name)[index] = 0

    def add(self, index: torch.Tensor, states: torch.Tensor, weights: torch.Tensor | None = None) -> None:
        """Add one token's `states` [r, *shape] to rows `index` [r] (a row named twice gets both), with
        its entropy `weights` [r] when weighted."""
        states = states.float()
        self.sum_h.index_add_(0, index, states)
        self.count.index_add_(0, index, torch.ones(len(index), device=self.count.device))
        if self.weighted:
            if weights is None:
                raise ValueError("weighted running pools need each token's entropy")
            weights = weights.float()
            self.sum_wh.index_add_(0, index, states * _per_row(weights, states))
            self.sum_w.index_add_(0, index, weights)

    def keep(self, index: torch.Tensor) -> None:
        """Only the rows `index`, in that order (a batch that shrinks)."""
        for name in self._tensors():
            setattr(self, name, getattr(self, name)[index])

    def grow(self, rows: int) -> None:
        """At least `rows` rows; new rows start empty."""
        extra = rows - len(self)
        if extra > 0:
            for name in self._tensors():
                t = getattr(self, name)
                setattr(self, name, torch.cat([t, t.new_zeros(extra, *t.shape[1:])]))

    def pooled(self, kind: str, index) -> torch.Tensor:
        """The pool `kind` ("mean" or "entropy") of rows `index`: [r, *shape] float32."""
        if kind == "mean":
            return mean_pool(self.sum_h[index], self.count[index])
        if not self.weighted:
            raise ValueError("an entropy pool needs weighted running pools")
        return entropy_pool(self.sum_wh[index], self.sum_w[index], self.sum_h[index], self.count[index])


def segments(starts: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """The flat indices start_i, ..., start_i + count_i - 1 of every segment, in order."""
    offsets = np.arange(int(counts.sum()), dtype=np.int64) - np.repeat(np.cumsum(counts) - counts, counts)
    return np.repeat(starts, counts) + offsets


def generated_rows(starts, prompt_lens, bounds) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Which rows of a forward pass are generated tokens: request i of the pass covers positions starts[i]
    .. at rows bounds[i] .. bounds[i + 1] - 1, and its rows at positions >= prompt_lens[i] (P) are the
    generated rows g = position - P + 1 >= 1. Returns (request index, row, g) of each, in row order:
    what the extraction's pools (`offline/vllm_capture`) and a server's (`serving/vllm_worker`) add."""
    starts, prompt_lens, bounds = (np.asarray(x, dtype=np.int64) for x in (starts, prompt_lens, bounds))
    first = np.maximum(starts, prompt_lens)  # the first generated position in the pass
    counts = np.clip(starts + np.diff(bounds) - first, 0, None)
    reqs = np.repeat(np.arange(len(starts), dtype=np.int64), counts)
    positions = segments(first, counts)
    return reqs, bounds[:-1][reqs] + positions - starts[reqs], positions - prompt_lens[reqs] + 1


def device_index(values, device) -> torch.Tensor:
    """A long index on `device`; to a GPU from pinned memory, so the host does not wait for the stream
    (a pageable copy would wait for the forward pass in flight)."""
    t = torch.as_tensor(values, dtype=torch.long)
    device = torch.device(device)
    return t.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else t.to(device)


def pools_needed(kind: str) -> bool:
    """Whether the decode input `kind` reads a pool of the generated tokens (not the current state alone)."""
    return any(part != "current" for part in input_parts(kind))


class RequestPools:
    """A server's running pools for a decode probe that reads the generated tokens' mean (`decode_input`
    "mean" or "current+mean"), per request id: each pass hands over the decode layer's state of the
    token at generated = g, row g is added once (a pass that recomputes rows already added, after a
    preemption, adds nothing), and `inputs` builds the probe's input at the current step. O(d) per
    request; `drop` frees a finished one. The engines (`TrailState` for transformers and predict, the
    vLLM worker) feed it, so the pool an engine serves is the one the extraction stores."""

    def __init__(self, kind: str, width: int, device=None):
        check_input("decode", kind, "decode input")
        if "entropy" in input_parts(kind):
            raise ValueError(f"decode input '{kind}' needs each token's entropy, which the serving engines do not compute")
        self.kind, self.width = kind, width
        self.pools = RunningPools(0, (width,), weighted=False, device=device)
        self.slots: dict[str, int] = {}
        self.added: dict[str, int] = {}  # the last generated count whose row was added, per request
        self.free: list[int] = []

    def __len__(self) -> int:
        return len(self.slots)

    def _slot(self, request_id: str) -> int:
        slot = self.slots.get(request_id)
        if slot is None:
            if not self.free:
                old = len(self.pools)
                self.pools.grow(max(8, 2 * old))
                self.free = list(range(len(self.pools) - 1, old - 1, -1))
            slot = self.slots[request_id] = self.free.pop()
            self.pools.reset([slot])
        return slot

    def add(self, ids, generated, states: torch.Tensor) -> None:
        """states[i] [d]: the decode layer's state at generated[i] = g of request ids[i] (position
        P - 1 + g); rows with g < 1 (the prompt) or already added are skipped. A request's rows come in
        increasing g."""
        rows, slots = [], []
        for i, (rid, g) in enumerate(zip(ids, generated)):
            if g < 1 or g <= self.added.get(rid, 0):
                continue
            self.added[rid] = int(g)
            rows.append(i)
            slots.append(self._slot(rid))
        if rows:
            index = device_index(slots, self.pools.count.device)
            picked = states if len(rows) == len(states) else states[device_index(rows, states.device)]
            self.pools.add(index, picked.to(self.pools.count.device))

    def inputs(self, ids, current: torch.Tensor) -> torch.Tensor:
        """The decode probe's input [n, width * parts] for requests `ids` whose current states are `current`
        [n, d] (their rows already added); a request with no row added gets NaN pools (ranked at its budget)."""
        device = self.pools.count.device
        slots = [self.slots.get(r, -1) for r in ids]
        if all(slot >= 0 for slot in slots):
            index = device_index(slots, device)
            total, count = self.pools.sum_h[index], self.pools.count[index]
        else:
            known = [i for i, slot in enumerate(slots) if slot >= 0]
            total, count = torch.zeros(len(ids), self.width, device=device), torch.zeros(len(ids), device=device)
            if known:
                rows, index = device_index(known, device), device_index([slots[i] for i in known], device)
                total[rows], count[rows] = self.pools.sum_h[index], self.pools.count[index]
        return decode_input(self.kind, current.float(), sum_h=total.to(current.device), count=count.to(current.device))

    def drop(self, ids) -> None:
        """Forget requests (finished, aborted); their slots are reused."""
        for rid in ids:
            slot = self.slots.pop(rid, None)
            self.added.pop(rid, None)
            if slot is not None:
                self.free.append(slot)

    def clear(self) -> None:
        self.drop(list(self.slots))
