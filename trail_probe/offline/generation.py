"""The serving model's own answers, generated with the hidden states a server would see.

    ready, skipped = prepare_prompts(prompts, tokenizer, max_new_tokens=512, context=8192, too_long="skip")
    for req in generate_with_capture(model, tokenizer, ready, gen, prompt_layers=[19], decode_layers=[19],
                                     decode_stride=8):
        req.record["output_tokens"], req.prompt_states, req.decode_states

Generation is a greedy (or sampled) decode loop with continuous refill: a request that ends leaves
the batch at once and a waiting prompt takes its slot, so no compute is spent on finished rows
(plain `generate` keeps decoding them until the longest answer in the batch ends). The KV cache
lives in preallocated per-slot buffers (`_SlotCache`), so no step copies it. Hidden states are
captured by `trail_probe.runtime.capture.LayerCapture` during that same generation: the prompt
mean per prompt layer, and decode states on TRAIL's refinement cadence (`runtime.estimates.refines_at`
with k = decode_stride); with `inputs` (`store.stored_inputs`) also the pooled probe inputs beside
them (`offline.pooled_states`: the last prompt token, the entropy-weighted prompt pool, the generated
tokens' running pools). `sample_lengths` generates sampled answers for their lengths only.
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from torch import nn

from trail_probe.choices import TooLong, check_choice
from trail_probe.errors import UserError
from trail_probe.offline.packed_gqa import packed_gqa_attention
from trail_probe.offline.pooled_states import PooledStates, decode_names, decode_pooled
from trail_probe.offline.prompts import Prompt
from trail_probe.offline.store import OLD_INPUTS, ExtractedRequest
from trail_probe.runtime.capture import LayerCapture
from trail_probe.runtime.estimates import refines_at
from trail_probe.runtime.models import encode_prompt, eos_token_ids


@dataclass
class SampledLengths:
    """A prompt's sampled answer lengths (extract.num_samples), streamed beside the finished requests."""

    id: str
    lengths: list[int]


@dataclass
class _Row:
    prompt: Prompt
    prompt_len: int
    truncated: bool
    prompt_states: torch.Tensor
    tokens: list[int] = field(default_factory=list)
    states: list[torch.Tensor] = field(default_factory=list)  # each [Ld, d]
    generated: list[int] = field(default_factory=list)
    prompt_pooled: dict = field(default_factory=dict)  # the prompt's pooled inputs (PooledStates.prompt)
    decode_pooled: list[dict] = field(default_factory=list)  # per sampled position (PooledStates.sampled)


class _SlotCache:
    """A KV cache of fixed row slots for continuous refill, without per-step copies.

    Keys/values live in preallocated buffers [B, H, capacity, D]; the live window is columns
    [start, end). A decode step writes column `end` in place (HF's DynamicCache instead
    re-concatenates the whole cache every step). A finished row's slot is refilled in place with
    the next prompt's prefilled KV, right-aligned at `end`, masked elsewhere. Columns no live row
    uses drop off the left of the window by moving `start`, so the window stays as long as the
    longest live request. Buffers are reallocated (one copy) only when the window reaches the end.
    """

    def __init__(self, config, num_slots: int, spare: int = 256):
        from transformers import DynamicCache
        from transformers.cache_utils import DynamicLayer

        class Layer(DynamicLayer):
            def __init__(layer, owner, index):
                super().__init__()
                layer.owner, layer.index, layer.is_initialized = owner, index, True

            def update(layer, key_states, value_states, *args, **kwargs):
                o, n = layer.owner, key_states.shape[-2]
                o.k[layer.index][:, :, o.end:o.end + n] = key_states
                o.v[layer.index][:, :, o.end:o.end + n] = value_states
                layer.keys = o.k[layer.index][:, :, o.start:o.end + n]
                layer.values = o.v[layer.index][:, :, o.start:o.end + n]
                return layer.keys, layer.values

        self._layer_cls, self._new_cache = Layer, (lambda: DynamicCache(config=config))
        self.num_slots, self.spare = num_slots, spare
        self.k = self.v = None
        self.mask = None  # [B, capacity] long: 1 where a column holds a real token of that row
        self.start = self.end = 0
        self.cache = None

    def new_prefill_cache(self):
        return self._new_cache()

    def _allocate(self, like: torch.Tensor, num_layers: int, left_room: int) -> None:
        """(Re)allocate buffers holding the live window plus `left_room` columns before it and spare after."""
        width = self.end - self.start
        cap = left_room + width + self.spare
        b, h, _, d = like.shape
        b = self.num_slots
        new_k = [like.new_zeros(b, h, cap, d) for _ in range(num_layers)]
        new_v = [like.new_zeros(b, h, cap, d) for _ in range(num_layers)]
        new_mask = torch.zeros(b, cap, dtype=torch.long, device=like.device)
        if self.k is not None:
            rows = self.k[0].shape[0]
            for li in range(num_layers):
                new_k[li][:rows, :, left_room:left_room + width] = self.k[li][:, :, self.start:self.end]
                new_v[li][:rows, :, left_room:left_room + width] = self.v[li][:, :, self.start:self.end]
            new_mask[:rows, left_room:left_room + width] = self.mask[:, self.start:self.end]
        self.k, self.v, self.mask = new_k, new_v, new_mask
        self.start, self.end = left_room, left_room + width
        if self.cache is None:
            self.cache = self._new_cache()
            self.cache.layers = [self._layer_cls(self, li) for li in range(num_layers)]
        self._refresh_views()

    def _refresh_views(self) -> None:
        for layer in self.cache.layers:
            layer.keys = self.k[layer.index][:, :, self.start:self.end]
            layer.values = self.v[layer.index][:, :, self.start:self.end]

    def place(self, slot: int, prefill_cache) -> None:
        """Put a prompt's prefilled KV into `slot`, right-aligned at the end of the window."""
        keys = [layer.keys for layer in prefill_cache.layers]
        values = [layer.values for layer in prefill_cache.layers]
        n = keys[0].shape[-2]
        if self.k is None or self.end - n < 0:
            self._allocate(keys[0], len(keys), left_room=n)
        self.start = min(self.start, self.end - n)  # columns left of start are masked for every row
        a = self.end - n
        for li in range(len(keys)):
            self.k[li][slot, :, self.start:self.end] = 0  # stale values of the slot's last request
            self.v[li][slot, :, self.start:self.end] = 0
            self.k[li][slot, :, a:self.end] = keys[li][0]
            self.v[li][slot, :, a:self.end] = values[li][0]
        self.mask[slot] = 0
        self.mask[slot, a:self.end] = 1
        self._refresh_views()

    def attention_mask(self) -> torch.Tensor:
        """Mask for the next decode step (window plus the column being written), making room first."""
        if self.end + 1 > self.k[0].shape[2]:
            self._allocate(self.k[0], len(self.k), left_room=0)
        self.mask[:, self.end] = 1
        return self.mask[:, self.start:self.end + 1]

    def advance(self) -> None:
        """After a decode step: the written column joins the window; unused left columns leave it."""
        self.end += 1
        used = self.mask[:, self.start:self.end].any(0).nonzero()
        self.start += int(used[0]) if len(used) else self.end - self.start
        self._refresh_views()

    def release(self, slot: int) -> None:
        self.mask[slot] = 0

    def keep(self, rows: torch.Tensor) -> None:
        """Drop the other slots for good (when no prompts are left to refill them)."""
        self.num_slots = len(rows)
        self.k = [t[rows] for t in self.k]
        self.v = [t[rows] for t in self.v]
        self.mask = self.mask[rows]
        self._refresh_views()


def _choose(logits: torch.Tensor, gen, generator: torch.Generator | None) -> torch.Tensor:
    """Next token per row: argmax, or a temperature / top-p sample."""
    if not gen.do_sample:
        return logits.argmax(-1)
    probs = torch.softmax(logits.float() / max(gen.temperature, 1e-5), -1)
    if gen.top_p < 1.0:
        sorted_p, order = probs.sort(-1, descending=True)
        drop = sorted_p.cumsum(-1) - sorted_p > gen.top_p
        sorted_p[drop] = 0
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_p)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def prepare_prompts(prompts: list[Prompt], tokenizer, max_new_tokens: int, context: int,
                    too_long: str) -> tuple[list[tuple[Prompt, list[int], bool]], list[str]]:
    """Tokenize prompts; skip or truncate those that leave no room for max_new_tokens."""
    check_choice(too_long, TooLong, "prompts.too_long")
    room = context - max_new_tokens if context else None
    if room is not None and room <= 0:
        raise UserError(f"generation.max_new_tokens = {max_new_tokens} leaves no room in the model's {context}-token context; lower it")
    ready, skipped = [], []
    for p in prompts:
        ids = encode_prompt(tokenizer, p.text)
        truncated = False
        if room is not None and len(ids) > room:
            if too_long == "skip":
                skipped.append(p.id)
                continue
            text_ids = tokenizer(p.text, add_special_tokens=False)["input_ids"]
            overflow = len(ids) - room
            ids = encode_prompt(tokenizer, tokenizer.decode(text_ids[: max(1, len(text_ids) - overflow - 8)]))
            truncated = True
        ready.append((p, ids[:room] if room else ids, truncated))
    return ready, skipped


@torch.inference_mode()
def generate_with_capture(
    model: nn.Module,
    tokenizer,
    prompts: list[tuple[Prompt, list[int], bool]],
    gen,
    prompt_layers: list[int],
    decode_layers: list[int],
    decode_stride: int,
    storage_dtype: torch.dtype = torch.float16,
    progress=None,
    inputs: dict | None = None,
) -> Iterator[ExtractedRequest]:
    """Stream finished requests. `prompts` are (prompt, chat-template token ids, truncated); `inputs`
    the probe inputs to store (`store.stored_inputs`; default TRAIL's mean and current states only)."""
    validate_generation(gen, decode_stride)
    pending = list(reversed(prompts))  # pop() takes them in order
    with packed_gqa_attention(model), LayerCapture(model, set(prompt_layers) | set(decode_layers)) as capture:
        loop = _DecodeLoop(model, tokenizer, gen, capture, prompt_layers, decode_layers, decode_stride,
                           storage_dtype, progress, inputs or OLD_INPUTS)
        while True:
            yield from loop.refill(pending)  # 1. free slots take the next prompts
            live = [i for i, row in enumerate(loop.slots) if row is not None]
            if not live:
                return
            if not pending and len(live) < len(loop.slots):  # nothing left to refill: shrink the batch
                loop.keep(live)
            yield from loop.step()  # 2. one decode step for the whole batch


class _DecodeLoop:
    """The state of `generate_with_capture`: a row per batch slot, the slots' KV cache, each slot's
    next token and position, and the hooks' captured states."""

    def __init__(self, model: nn.Module, tokenizer, gen, capture: LayerCapture, prompt_layers: list[int],
                 decode_layers: list[int], decode_stride: int, storage_dtype: torch.dtype, progress, inputs: dict):
        self.model, self.tokenizer, self.gen, self.capture, self.progress = model, tokenizer, gen, capture, progress
        self.prompt_layers, self.decode_layers, self.decode_stride = prompt_layers, decode_layers, decode_stride
        self.storage_dtype = storage_dtype
        self.pooled = PooledStates(inputs, gen.batch_size, storage_dtype)
        self.decode_names = decode_names(inputs)
        self.device = next(model.parameters()).device
        self.eos = eos_token_ids(model, tokenizer)
        self.eos_t = torch.tensor(sorted(self.eos), device=self.device)
        self.generator = torch.Generator(device=self.device).manual_seed(gen.seed) if gen.do_sample else None
        # transformers 5.x renamed forward's `past_key_values` to `cache` (the old name goes in 5.40)
        self.cache_kw = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
        self.slots: list[_Row | None] = [None] * gen.batch_size
        self.batch = _SlotCache(model.config, gen.batch_size)
        self.next_tokens = torch.zeros(gen.batch_size, dtype=torch.long, device=self.device)
        self.positions = torch.zeros(gen.batch_size, dtype=torch.long, device=self.device)

    def refill(self, pending: list) -> Iterator[ExtractedRequest]:
        """Prefill each new prompt alone (no padding inside a prefill) into a free slot; yield those
        whose answer ends with its first token."""
        for slot in range(len(self.slots)):
            while self.slots[slot] is None and pending:
                prompt, ids, truncated = pending.pop()
                cache = self.batch.new_prefill_cache()
                out = self.model(input_ids=torch.tensor([ids], device=self.device), **{self.cache_kw: cache},
                                 use_cache=True, logits_to_keep=0 if self.pooled.needs_prompt_logits else 1)
                prompt_states = torch.stack([self.capture.outputs[layer][0].float().mean(0)
                                             for layer in self.prompt_layers]) if self.prompt_layers else torch.zeros(0, 0)
                row = _Row(prompt, len(ids), truncated, prompt_states.to(self.storage_dtype).cpu())
                if self.pooled.active:
                    row.prompt_pooled = self.pooled.prompt([self.capture.outputs[layer][0] for layer in self.prompt_layers],
                                                           out.logits[0])
                first = int(_choose(out.logits[:, -1], self.gen, self.generator)[0])
                row.tokens.append(first)
                if first in self.eos:
                    yield self._finish(row, 0, False)
                elif self.gen.max_new_tokens == 1:
                    yield self._finish(row, 1, True)
                else:
                    self.batch.place(slot, cache)
                    self.pooled.reset(slot)
                    self.slots[slot] = row
                    self.next_tokens[slot], self.positions[slot] = first, len(ids)

    def keep(self, live: list[int]) -> None:
        """Drop the other slots for good (no prompts are left to refill them)."""
        keep = torch.tensor(live, dtype=torch.long, device=self.device)
        self.batch.keep(keep)
        self.slots = [self.slots[i] for i in live]
        self.next_tokens, self.positions = self.next_tokens[keep], self.positions[keep]
        self.pooled.keep(keep)

    def step(self) -> Iterator[ExtractedRequest]:
        """One decode step of every slot: keep the states TRAIL's cadence samples, yield the requests it ends."""
        out = self.model(input_ids=self.next_tokens[:, None], attention_mask=self.batch.attention_mask(),
                         position_ids=self.positions[:, None], **{self.cache_kw: self.batch.cache}, use_cache=True)
        self.batch.advance()
        chosen = _choose(out.logits[:, -1], self.gen, self.generator)
        generated = torch.tensor([len(r.tokens) for r in self.slots], device=self.device)  # j per row
        sampled = refines_at(generated, self.decode_stride).nonzero().flatten().tolist()
        if self.pooled.decode_kinds:  # every step: the generated tokens' running pools
            self.pooled.step(torch.stack([self.capture.outputs[layer][:, -1] for layer in self.decode_layers], 1),
                             out.logits[:, -1])
        if sampled and self.decode_layers:
            states = torch.stack([self.capture.outputs[layer][sampled, -1] for layer in self.decode_layers], 1)
            states = states.to(self.storage_dtype).cpu()
            for k, (i, pools) in enumerate(zip(sampled, self.pooled.sampled(sampled))):
                self.slots[i].states.append(states[k])
                self.slots[i].generated.append(len(self.slots[i].tokens))
                self.slots[i].decode_pooled.append(pools)
        is_eos = torch.isin(chosen, self.eos_t).tolist()
        for i, (token, ended) in enumerate(zip(chosen.tolist(), is_eos)):
            row = self.slots[i]
            row.tokens.append(token)
            if ended or len(row.tokens) >= self.gen.max_new_tokens:
                yield self._finish(row, len(row.tokens) - 1 if ended else len(row.tokens), not ended)
                self.slots[i] = None
                self.batch.release(i)
        self.next_tokens, self.positions = chosen, self.positions + 1

    def _finish(self, row: _Row, n: int, hit_cap: bool) -> ExtractedRequest:
        if self.progress is not None:
            self.progress.update(1)
        pooled = {**row.prompt_pooled, **decode_pooled(row.decode_pooled, len(self.decode_layers),
                                                       row.prompt_states.shape[-1], self.storage_dtype, self.decode_names)}
        return extracted_request(self.tokenizer, row.prompt, row.prompt_len, row.truncated, row.tokens, n, hit_cap,
                                 row.prompt_states, row.states, row.generated, len(self.decode_layers),
                                 self.storage_dtype, pooled)


def sample_lengths(model: nn.Module, tokenizer, prompts: list[tuple[Prompt, list[int], bool]], gen, num_samples: int,
                   progress=None) -> Iterator[SampledLengths]:
    """A prompt's `num_samples` sampled answer lengths, as its last one finishes:
    the same decode loop sampling with `gen`'s temperature and top-p (its seed, one generator for the
    whole run), with nothing captured. Lengths count tokens up to EOS, as `output_tokens` does."""
    sampling = dataclasses.replace(gen, do_sample=True)
    copies = [(Prompt(f"{p.id}#{k}", p.text), ids, truncated) for p, ids, truncated in prompts for k in range(num_samples)]
    lengths: dict[str, list[int]] = {}
    for req in generate_with_capture(model, tokenizer, copies, sampling, [], [], 1):
        rid = req.record["id"].rsplit("#", 1)[0]
        lengths.setdefault(rid, []).append(req.record["output_tokens"])
        if len(lengths[rid]) == num_samples:
            if progress is not None:
                progress.update(1)
            yield SampledLengths(rid, lengths.pop(rid))


def extracted_request(tokenizer, prompt: Prompt, prompt_len: int, truncated: bool, tokens: list[int], n: int,
                      hit_cap: bool, prompt_states: torch.Tensor, states: list[torch.Tensor], generated: list[int],
                      num_decode_layers: int, storage_dtype: torch.dtype,
                      pooled: dict[str, torch.Tensor] | None = None) -> ExtractedRequest:
    """One finished request as the store keeps it, whichever engine generated it: `tokens` are the
    generated ids (the EOS included when it ended the answer), `n` the answer's length without it,
    `states` one [Ld, d] state per sampled position `generated`, `pooled` the pooled inputs by shard
    tensor name (`store`'s module docstring)."""
    decode = torch.stack(states, 1) if states else torch.zeros(num_decode_layers, 0, prompt_states.shape[-1],
                                                                 dtype=storage_dtype)
    record = {
        "id": prompt.id,
        "prompt": prompt.text,
        "response": tokenizer.decode(tokens[:n], skip_special_tokens=True),
        "prompt_tokens": prompt_len,
        "output_tokens": n,
        "hit_cap": hit_cap,
        "truncated": truncated,
    }
    return ExtractedRequest(record, prompt_states, decode, torch.tensor(generated, dtype=torch.long), list(tokens),
                            dict(pooled or {}))


def validate_generation(gen, decode_stride: int) -> None:
    if decode_stride < 1:
        raise UserError(f"extract.decode_stride = {decode_stride} must be >= 1")
    if gen.batch_size < 1 or gen.max_new_tokens < 1:
        raise UserError("generation.batch_size and generation.max_new_tokens must be >= 1")
