"""Run the serving model over prompts; record answer lengths and hidden states (`trail-probe extract`).

    trail-probe extract recipes/smollm2_alpaca.yaml
    trail-probe extract recipes/smollm2_alpaca.yaml prompts.num_prompts=64 extract.out_dir=data/try

Generation is a greedy (or sampled) decode loop with continuous refill: a request that ends leaves
the batch at once and a waiting prompt takes its slot, so no compute is spent on finished rows
(plain `generate` keeps decoding them until the longest answer in the batch ends). Hidden states
are captured by forward hooks on the decoder layers during that same generation, so they are the
states a server would see; hooks are removed in a `finally`.

Python API: `generate_with_capture(...)` streams `ExtractedRequest`s; `run_extract(cfg)` writes
a resumable extraction folder that `trail_probe.store.Extraction` reads back.
"""

from __future__ import annotations

import inspect
import json
import shutil
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from trail_probe.config import (
    RecipeConfig,
    atomic_write_json,
    config_to_dict,
    resolve_layers,
    save_config,
)
from trail_probe.errors import UserError
from trail_probe.models import decoder_layers, dtype_of, load_causal_lm, model_fingerprint
from trail_probe.prompts import Prompt, load_prompts, select_prompts, worker_slice
from trail_probe.store import (
    FORMAT,
    LAYER_NUMBERING,
    ExtractedRequest,
    read_shard_records,
    shard_name,
    write_shard,
)

HELP = "Generate answers with the serving model and dump per-layer hidden states + lengths."
EXAMPLES = """examples:
  trail-probe extract recipes/smollm2_alpaca.yaml
  trail-probe extract recipes/smollm2_alpaca.yaml prompts.num_prompts=64 extract.out_dir=data/small
  trail-probe extract recipes/smollm2_alpaca.yaml extract.decode_layers=10-15 extract.decode_stride=4
  # 8 GPUs, one worker each (same out_dir; read back as one dataset):
  for i in 0 1 2 3 4 5 6 7; do CUDA_VISIBLE_DEVICES=$i trail-probe extract recipes/llama3_8b_alpaca.yaml \\
      --num-workers 8 --worker-index $i & done; wait
Interrupt at any time (Ctrl-C or kill) and run the same command again to resume."""


def add_arguments(parser) -> None:
    parser.add_argument("--overwrite", action="store_true", help="replace an extraction made with a different config")
    parser.add_argument("--num-workers", type=int, default=None, help="split the prompts over N independent workers")
    parser.add_argument("--worker-index", type=int, default=None, help="which worker this is (0..N-1)")


# --------------------------------------------------------------------------------------------
# Capture and generation
# --------------------------------------------------------------------------------------------
class LayerCapture:
    """Forward hooks that keep the latest output of the requested decoder layers only."""

    def __init__(self, model: nn.Module, layers: Iterable[int]):
        self.outputs: dict[int, torch.Tensor] = {}
        blocks = decoder_layers(model)
        self._handles = [blocks[layer].register_forward_hook(self._hook(layer)) for layer in sorted(set(layers))]

    def _hook(self, layer: int):
        def hook(module, inputs, output):
            self.outputs[layer] = output[0] if isinstance(output, tuple) else output

        return hook

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def __enter__(self) -> "LayerCapture":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


def encode_prompt(tokenizer, text: str) -> list[int]:
    """Token ids of `text` as the user turn of the model's chat template (plain text if it has none)."""
    if getattr(tokenizer, "chat_template", None):
        rendered = tokenizer.apply_chat_template(
            [{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True
        )
        return tokenizer(rendered, add_special_tokens=False)["input_ids"]
    return tokenizer(text)["input_ids"]


def eos_token_ids(model, tokenizer) -> set[int]:
    ids = getattr(model.generation_config, "eos_token_id", None)
    ids = ids if isinstance(ids, list) else [ids]
    ids = {i for i in ids if i is not None}
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    if not ids:
        raise UserError("the model defines no EOS token, so answer lengths are undefined; use an instruct model")
    return ids


@dataclass
class _Row:
    prompt: Prompt
    prompt_len: int
    truncated: bool
    prompt_states: torch.Tensor
    tokens: list[int] = field(default_factory=list)
    states: list[torch.Tensor] = field(default_factory=list)  # each [Ld, d]
    generated: list[int] = field(default_factory=list)


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
    if too_long not in ("skip", "truncate"):
        raise UserError(f"prompts.too_long = {too_long!r} must be 'skip' or 'truncate'")
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
) -> Iterator[ExtractedRequest]:
    """Stream finished requests. `prompts` are (prompt, chat-template token ids, truncated)."""
    _validate(gen, decode_stride)
    device = next(model.parameters()).device
    eos = eos_token_ids(model, tokenizer)
    eos_t = torch.tensor(sorted(eos), device=device)
    generator = torch.Generator(device=device).manual_seed(gen.seed) if gen.do_sample else None
    # transformers 5.x renamed forward's `past_key_values` to `cache` (the old name goes in 5.40)
    cache_kw = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    pending = list(reversed(prompts))  # pop() takes them in order
    slots: list[_Row | None] = [None] * gen.batch_size
    batch = _SlotCache(model.config, gen.batch_size)
    next_tokens = torch.zeros(gen.batch_size, dtype=torch.long, device=device)
    positions = torch.zeros(gen.batch_size, dtype=torch.long, device=device)

    def finish(row: _Row, n: int, hit_cap: bool) -> ExtractedRequest:
        states = torch.stack(row.states, 1) if row.states else torch.zeros(
            len(decode_layers), 0, row.prompt_states.shape[-1], dtype=storage_dtype)
        record = {
            "id": row.prompt.id,
            "prompt": row.prompt.text,
            "response": tokenizer.decode(row.tokens[:n], skip_special_tokens=True),
            "prompt_tokens": row.prompt_len,
            "output_tokens": n,
            "hit_cap": hit_cap,
            "truncated": row.truncated,
        }
        if progress is not None:
            progress.update(1)
        return ExtractedRequest(record, row.prompt_states, states, torch.tensor(row.generated, dtype=torch.long),
                                row.tokens)

    with LayerCapture(model, set(prompt_layers) | set(decode_layers)) as capture:
        while True:
            # 1. Refill free slots: prefill each new prompt alone (no padding inside a prefill).
            for slot in range(len(slots)):
                while slots[slot] is None and pending:
                    prompt, ids, truncated = pending.pop()
                    cache = batch.new_prefill_cache()
                    out = model(input_ids=torch.tensor([ids], device=device), **{cache_kw: cache},
                                use_cache=True, logits_to_keep=1)
                    prompt_states = torch.stack([capture.outputs[layer][0].float().mean(0) for layer in prompt_layers])
                    row = _Row(prompt, len(ids), truncated, prompt_states.to(storage_dtype).cpu())
                    first = int(_choose(out.logits[:, -1], gen, generator)[0])
                    row.tokens.append(first)
                    if first in eos:
                        yield finish(row, 0, False)
                    elif gen.max_new_tokens == 1:
                        yield finish(row, 1, True)
                    else:
                        batch.place(slot, cache)
                        slots[slot] = row
                        next_tokens[slot], positions[slot] = first, len(ids)
            live = [i for i, row in enumerate(slots) if row is not None]
            if not live:
                return
            if not pending and len(live) < len(slots):  # nothing left to refill: shrink the batch
                keep = torch.tensor(live, dtype=torch.long, device=device)
                batch.keep(keep)
                slots = [slots[i] for i in live]
                next_tokens, positions = next_tokens[keep], positions[keep]
            # 2. One decode step for the whole batch.
            out = model(input_ids=next_tokens[:, None], attention_mask=batch.attention_mask(),
                        position_ids=positions[:, None], **{cache_kw: batch.cache}, use_cache=True)
            batch.advance()
            chosen = _choose(out.logits[:, -1], gen, generator)
            generated = torch.tensor([len(r.tokens) for r in slots], device=device)  # j per row
            sampled = ((generated - 1) % decode_stride == 0).nonzero().flatten().tolist()
            if sampled:
                states = torch.stack([capture.outputs[layer][sampled, -1] for layer in decode_layers], 1)
                states = states.to(storage_dtype).cpu()
                for k, i in enumerate(sampled):
                    slots[i].states.append(states[k])
                    slots[i].generated.append(len(slots[i].tokens))
            is_eos = torch.isin(chosen, eos_t).tolist()
            for i, (token, ended) in enumerate(zip(chosen.tolist(), is_eos)):
                row = slots[i]
                row.tokens.append(token)
                if ended or len(row.tokens) >= gen.max_new_tokens:
                    yield finish(row, len(row.tokens) - 1 if ended else len(row.tokens), not ended)
                    slots[i] = None
                    batch.release(i)
            next_tokens, positions = chosen, positions + 1


# --------------------------------------------------------------------------------------------
# The resumable extraction folder
# --------------------------------------------------------------------------------------------
# Settings that change what is extracted; a folder made with other values is refused.
def _identity(cfg: RecipeConfig, model_info: dict, prompt_layers, decode_layers, num_workers) -> dict:
    gen = config_to_dict(cfg.generation)
    gen.pop("batch_size")  # batching changes speed, not results
    return {
        "model": {k: model_info[k] for k in ("name_or_path", "weights_sha256", "dtype")},
        "prompts": {k: v for k, v in config_to_dict(cfg.prompts).items()},
        "generation": gen,
        "prompt_layers": prompt_layers,
        "decode_layers": decode_layers,
        "decode_stride": cfg.extract.decode_stride,
        "storage_dtype": cfg.extract.storage_dtype,
        "num_workers": num_workers,
    }


def _estimate_bytes(n: int, d: int, n_prompt_layers: int, n_decode_layers: int, stride: int,
                    max_new: int, itemsize: int) -> tuple[int, int]:
    prompt_bytes = n * n_prompt_layers * d * itemsize
    per_request_max = (max_new + stride - 1) // stride
    return prompt_bytes, n * per_request_max * n_decode_layers * d * itemsize


def run_extract(cfg: RecipeConfig, overwrite: bool = False, num_workers: int | None = None,
                worker_index: int | None = None, show_progress: bool = True) -> Path:
    """Extract into `cfg.data_dir` (resuming what is already there); return the folder."""
    from tqdm.auto import tqdm

    num_workers = cfg.extract.num_workers if num_workers is None else num_workers
    worker_index = cfg.extract.worker_index if worker_index is None else worker_index
    out = cfg.data_dir
    _validate(cfg.generation, cfg.extract.decode_stride)
    _check_writable(out)
    prompts, bad_rows = load_prompts(cfg.prompts.source, cfg.prompts.split, cfg.prompts.skip_bad_rows)
    selected = select_prompts(prompts, cfg.prompts.num_prompts, cfg.prompts.seed)
    mine = worker_slice(selected, num_workers, worker_index)
    storage_dtype = dtype_of(cfg.extract.storage_dtype)

    model, tokenizer = load_causal_lm(cfg.model)
    model_info = model_fingerprint(cfg.model, model)
    num_layers = model_info["num_layers"]
    prompt_layers = resolve_layers(cfg.extract.prompt_layers, num_layers, "prompt layer")
    decode_layers = resolve_layers(cfg.extract.decode_layers, num_layers, "decode layer")
    identity = _identity(cfg, model_info, prompt_layers, decode_layers, num_workers)

    manifest_path = out / "manifest.json"
    if manifest_path.is_file():
        old = json.loads(manifest_path.read_text())
        if old.get("identity") != identity:
            if not overwrite:
                diff = _first_difference(old.get("identity", {}), identity)
                raise UserError(
                    f"'{out}' holds an extraction made with a different config ({diff}); "
                    "use another extract.out_dir, or pass --overwrite to replace it"
                )
            shutil.rmtree(out)
    ready, too_long = prepare_prompts(mine, tokenizer, cfg.generation.max_new_tokens,
                                      model_info["max_position_embeddings"], cfg.prompts.too_long)
    manifest = {
        "format": FORMAT,
        "identity": identity,
        "model": model_info,
        "layer_numbering": LAYER_NUMBERING,
        "prompt_layers": prompt_layers,
        "decode_layers": decode_layers,
        "decode_stride": cfg.extract.decode_stride,
        "storage_dtype": cfg.extract.storage_dtype,
        "generation": config_to_dict(cfg.generation),
        "prompts": {"source": cfg.prompts.source, "num_available": len(prompts), "num_selected": len(selected),
                    "bad_rows_skipped": bad_rows, "seed": cfg.prompts.seed},
        "num_workers": num_workers,
        "config": config_to_dict(cfg),
    }
    atomic_write_json(manifest_path, manifest)
    save_config(cfg, out)

    shard_dir = out / "shards"
    shard_dir.mkdir(parents=True, exist_ok=True)
    for stale in shard_dir.glob(".*.tmp-*"):  # a shard being written when the last run was killed
        stale.unlink()
    done_ids: set[str] = set()
    my_shards = sorted(shard_dir.glob(f"shard-w{worker_index:03d}-*.safetensors"))
    for shard in my_shards:
        done_ids.update(r["id"] for r in read_shard_records(shard))
    todo = [item for item in ready if item[0].id not in done_ids]
    status_path = out / "workers" / f"worker-{worker_index}.json"
    status = {"worker_index": worker_index, "expected": len(ready), "skipped_too_long": len(too_long),
              "truncated": sum(t for _, _, t in ready), "complete": False}
    atomic_write_json(status_path, {**status, "done": len(done_ids)})

    d = model_info["hidden_size"]
    prompt_bytes, decode_bytes = _estimate_bytes(len(todo), d, len(prompt_layers), len(decode_layers),
                                                 cfg.extract.decode_stride, cfg.generation.max_new_tokens,
                                                 torch.finfo(storage_dtype).bits // 8)
    print(f"extract: worker {worker_index}/{num_workers}: {len(ready)} requests ({len(done_ids)} already done, "
          f"{len(too_long)} too long skipped, {bad_rows} bad rows skipped) -> {out}")
    print(f"extract: expected disk: {prompt_bytes / 1e6:.1f} MB of prompt states + at most "
          f"{decode_bytes / 1e9:.2f} GB of decode states (if every answer hits the {cfg.generation.max_new_tokens}-token cap)",
          flush=True)

    seq = max((int(p.stem.rsplit("-", 1)[1]) for p in my_shards), default=-1) + 1
    buffer: list[ExtractedRequest] = []
    useful_tokens, start = 0, time.time()

    def flush():
        nonlocal seq, buffer
        if buffer:
            write_shard(shard_dir / shard_name(worker_index, seq), buffer, len(prompt_layers),
                        len(decode_layers), d, storage_dtype)
            seq += 1
            buffer = []

    bar = tqdm(total=len(todo), desc="extract", unit="req", disable=not show_progress, dynamic_ncols=True)
    try:
        for req in generate_with_capture(model, tokenizer, todo, cfg.generation, prompt_layers, decode_layers,
                                         cfg.extract.decode_stride, storage_dtype, progress=bar):
            buffer.append(req)
            useful_tokens += req.record["output_tokens"]
            bar.set_postfix(tok_s=f"{useful_tokens / max(time.time() - start, 1e-9):.0f}", refresh=False)
            if len(buffer) >= cfg.extract.shard_size:
                flush()
    finally:
        flush()  # finished requests are kept even on Ctrl-C
        bar.close()
    elapsed = time.time() - start
    atomic_write_json(status_path, {**status, "done": len(ready), "complete": True,
                                    "seconds_this_run": round(elapsed, 1), "useful_tokens_this_run": useful_tokens})
    print(f"extract: worker {worker_index} complete: {len(todo)} requests, {useful_tokens} tokens in {elapsed:.0f}s "
          f"({useful_tokens / max(elapsed, 1e-9):.1f} useful tok/s)")
    return out


def _validate(gen, decode_stride: int) -> None:
    if decode_stride < 1:
        raise UserError(f"extract.decode_stride = {decode_stride} must be >= 1")
    if gen.batch_size < 1 or gen.max_new_tokens < 1:
        raise UserError("generation.batch_size and generation.max_new_tokens must be >= 1")


def _check_writable(out: Path) -> None:
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".write-test-{id(out)}"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise UserError(f"output folder '{out}' is not writable ({e.strerror}); set extract.out_dir to a writable folder") from None


def _first_difference(old: dict, new: dict, prefix: str = "") -> str:
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            found = _first_difference(a, b, f"{prefix}{key}.")
            if found:
                return found
        elif a != b:
            return f"{prefix}{key}: {a!r} there, {b!r} now"
    return ""


def run(cfg: RecipeConfig, args) -> None:
    run_extract(cfg, overwrite=args.overwrite, num_workers=args.num_workers, worker_index=args.worker_index)
