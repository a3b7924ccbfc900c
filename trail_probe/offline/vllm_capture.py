"""The worker side of the vLLM extraction (`offline/vllm_generation.py` is the client): hooks on the
requested decoder layers of vLLM's model runner that take, from each forward pass's flattened batch,
only the rows the extraction stores.

In each pass the hooks pick the rows they need (the prompt tokens of each prefill chunk; the last
token of the requests at a sampled position, j = 1, 1 + stride, ... by `runtime.estimates.refines_at`;
with the pooled inputs also the last prompt token and every generated token's row), add vLLM's
(mlp output, residual) pair on those rows only (HF's `hidden_states[L + 1]`), keep the prompt sums
and the generated tokens' running pools (`runtime.probe_inputs.RunningPools`, one row per request)
on the device, and move the sampled states, in storage dtype, off it. The token entropies the
entropy pools weigh by come from the logits vLLM computes for each request's last row, and, for the
other rows that need one (the prompt's, or a recomputed request's), from `compute_logits` on the
pass's final hidden states: both are read from the runner's state between `execute_model` and
`sample_tokens`.

vLLM internals relied on (0.32; the smallest upstream change that would remove each): the model
runner's `execute_model` / `sample_tokens` pair, its `execute_model_state` (`logits`: one row per
request, in batch order; `hidden_states`: the final norm's output for every row) and `model.compute_logits`,
its `input_batch` (`req_ids`, `num_computed_tokens_cpu`, `num_prompt_tokens`) and `query_start_loc`
(upstream: per-request hidden states of chosen layers on the runner's output, as `pooler_output` is
for pooling models).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from trail_probe.offline.pooled_states import decode_names, decode_pooled
from trail_probe.runtime.capture import LayerCapture, first_output, residual_parts, residual_sum
from trail_probe.runtime.estimates import refines_at
from trail_probe.runtime.probe_inputs import RunningPools, generated_rows, prompt_input, segments, token_entropy
from trail_probe.serving import vllm_internals as vi


@dataclass
class _Pass:
    """What one forward pass contributes: which rows of the flattened batch belong to whom."""

    req_ids: list[str]
    restart: np.ndarray  # [n] bool: the request's prompt starts in this pass (new, or recomputed)
    prompt_reqs: np.ndarray  # batch indices of the requests with prompt tokens in this pass
    prompt_counts: np.ndarray  # how many of their prompt tokens
    prompt_starts: np.ndarray  # the first row of those tokens (a request's rows are contiguous)
    sampled: np.ndarray  # batch indices of the requests at a sampled position
    generated: np.ndarray  # j of each sampled request
    decode_rows: torch.Tensor | None  # their last rows
    last_rows: np.ndarray  # [n] the row of each request's last row in this pass (its logits' row)
    last_reqs: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))  # last prompt token in this pass
    last_prompt_rows: torch.Tensor | None = None  # ... its row
    pool_reqs: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))  # per generated-token row
    pool_rows: torch.Tensor | None = None  # the rows of generated tokens (positions >= P), in row order
    prompt_rows: torch.Tensor | None = None  # every prompt row, grouped as prompt_reqs (entropy pool only)
    prompt_sums: torch.Tensor | None = None  # [Lp, len(prompt_reqs), d] float32
    decode: dict[int, torch.Tensor] = field(default_factory=dict)  # decode-layer index -> [s, d]
    last: dict[int, torch.Tensor] = field(default_factory=dict)  # prompt-layer index -> [len(last_reqs), d]
    pool: dict[int, torch.Tensor] = field(default_factory=dict)  # decode-layer index -> [len(pool_reqs), d]
    prompt_states: dict[int, torch.Tensor] = field(default_factory=dict)  # prompt-layer index -> [prompt rows, d]
    entropy: torch.Tensor | None = None  # [rows of the pass] float32: H of the rows that need it


def _rows(output, rows: torch.Tensor) -> torch.Tensor:
    """The residual stream after a vLLM decoder layer at `rows` of the flattened batch: its
    (mlp output, residual) pair added on those rows only (`capture.residual_sum`, row by row)."""
    return residual_sum(tuple(part.index_select(0, rows) for part in residual_parts(output)))


def to_wire(t: torch.Tensor) -> tuple[str, list[int], bytes]:
    """A CPU tensor as (dtype, shape, raw bytes): what vLLM's result channel (msgpack) carries as it
    is, whatever the dtype (bfloat16 travels as its bits)."""
    name = str(t.dtype).removeprefix("torch.")
    raw = t.contiguous().view(torch.int16) if t.dtype == torch.bfloat16 else t.contiguous()
    return name, list(t.shape), raw.numpy().tobytes()


def from_wire(wire) -> torch.Tensor:
    name, shape, raw = wire
    numpy_dtype = np.int16 if name == "bfloat16" else np.dtype(name)
    t = torch.from_numpy(np.frombuffer(raw, dtype=numpy_dtype).copy().reshape(shape))
    return t.view(torch.bfloat16) if name == "bfloat16" else t


class _Capture:
    """Per request: the prompt-state sums and running pools (on the device) and the sampled decode
    states (off it). `inputs`: the stored inputs (`store.stored_inputs`)."""

    def __init__(self, runner, prompt_layers: list[int], decode_layers: list[int], stride: int, storage_dtype: str,
                 inputs: dict):
        self.runner = runner
        self.prompt_index = {layer: i for i, layer in enumerate(prompt_layers)}
        self.decode_index = {layer: i for i, layer in enumerate(decode_layers)}
        self.stride = stride
        self.storage = getattr(torch, storage_dtype)
        self.last = "last" in inputs["prompt"] and bool(prompt_layers)
        self.prompt_entropy = "entropy" in inputs["prompt"] and bool(prompt_layers)
        self.decode_kinds = [k for k in ("mean", "entropy") if k in inputs["decode"]] if decode_layers else []
        self.decode_names = decode_names(inputs) if decode_layers else []
        self.entropy = self.prompt_entropy or "entropy" in self.decode_kinds
        self.pass_: _Pass | None = None
        self.armed = False
        self.skip: set[str] = set()  # requests whose states are not wanted (sampled answers)
        self.prompt_sums: dict[str, torch.Tensor] = {}
        self.prompt_counts: dict[str, int] = {}
        self.prompt_wsums: dict[str, list] = {}  # id -> [sum_t H_t h_t [Lp, d], sum_t H_t]
        self.prompt_last: dict[str, torch.Tensor] = {}
        self.pools: RunningPools | None = None  # one row (slot) per request with generated tokens
        self.slot_of: dict[str, int] = {}
        self.free_slots: list[int] = []
        self.decode: dict[str, list[torch.Tensor]] = {}
        self.decode_pooled: dict[str, list[dict]] = {}
        self.generated: dict[str, list[int]] = {}
        layers = sorted(set(prompt_layers) | set(decode_layers))
        # compiled (extract.vllm_compile): the model returns the layers' states as auxiliary outputs, asked for
        # at load (serving.vllm_worker.register); eager: forward hooks on the layers
        self.aux_layers = layers if getattr(runner, "_trail_probe_aux_layers", None) == layers else None
        if self.aux_layers is None and not vi.is_eager(runner):
            raise RuntimeError(f"{type(runner.model).__name__} returns no auxiliary hidden states, and forward hooks run "
                               "only in eager mode; extract with extract.vllm_compile=false")
        self.capture = None if self.aux_layers else LayerCapture(runner.model, layers, on_forward=self._on_layer,
                                                                 states_of=lambda output: output, keep=False)
        execute, sample = runner.execute_model, runner.sample_tokens

        def execute_model(*args, **kwargs):
            self.armed, self.pass_ = True, None  # the hooks (or the aux states below) plan this pass first
            return execute(*args, **kwargs)

        def sample_tokens(*args, **kwargs):
            if self.armed and self.aux_layers:
                with torch.inference_mode():
                    for layer, states in zip(self.aux_layers, vi.aux_states(self.runner) or ()):
                        self._on_layer(layer, states)
            if self.armed and self.pass_ is not None and self.entropy:
                with torch.inference_mode():
                    self._entropies(self.pass_)  # before vLLM's sampler clears the pass's logits
            out = sample(*args, **kwargs)
            if self.armed:
                with torch.inference_mode():
                    self._finish_pass()
            return out

        runner.execute_model, runner.sample_tokens = execute_model, sample_tokens

    def _plan(self) -> _Pass:
        ib, runner = self.runner.input_batch, self.runner
        n = ib.num_reqs
        req_ids = list(ib.req_ids[:n])
        bounds = np.asarray(runner.query_start_loc.np[:n + 1], dtype=np.int64)
        computed = np.asarray(ib.num_computed_tokens_cpu[:n], dtype=np.int64)
        prompt = np.asarray(ib.num_prompt_tokens[:n], dtype=np.int64)
        wanted = np.array([rid not in self.skip for rid in req_ids], dtype=bool)
        end = computed + np.diff(bounds)
        generated = end - prompt  # tokens generated before this pass's own
        sampled = np.nonzero(refines_at(generated, self.stride) & wanted)[0]
        in_prompt = np.clip(np.minimum(end, prompt) - computed, 0, None) * wanted
        prompt_reqs = np.nonzero(in_prompt)[0] if self.prompt_index else np.zeros(0, dtype=np.int64)
        decode_rows = None
        if len(sampled) and self.decode_index:
            decode_rows = torch.from_numpy(bounds[sampled + 1] - 1)
        p = _Pass(req_ids, computed == 0, prompt_reqs, in_prompt[prompt_reqs], bounds[prompt_reqs],
                  sampled if decode_rows is not None else sampled[:0], generated[sampled], decode_rows, bounds[1:] - 1)
        if self.last:
            p.last_reqs = np.nonzero(wanted & (computed <= prompt - 1) & (end >= prompt))[0]
            p.last_prompt_rows = torch.from_numpy(bounds[p.last_reqs] + prompt[p.last_reqs] - 1 - computed[p.last_reqs])
        if self.decode_kinds:  # every generated token's row: positions max(computed, P) .. end - 1
            reqs, rows, _ = generated_rows(computed, prompt, bounds)
            keep = wanted[reqs]
            p.pool_reqs, p.pool_rows = reqs[keep], torch.from_numpy(rows[keep])
        if self.prompt_entropy:
            p.prompt_rows = torch.from_numpy(segments(p.prompt_starts, p.prompt_counts))
        return p

    def _on_layer(self, layer: int, output) -> None:
        if not self.armed:  # a forward pass outside execute_model (vLLM's warm-up or profiling)
            return
        p = self.pass_ = self.pass_ or self._plan()
        device = first_output(output).device
        if layer in self.prompt_index:
            li = self.prompt_index[layer]
            if len(p.prompt_reqs):
                parts = residual_parts(output)
                if p.prompt_sums is None:
                    p.prompt_sums = torch.zeros(len(self.prompt_index), len(p.prompt_reqs), parts[0].shape[-1],
                                                dtype=torch.float32, device=parts[0].device)
                sums = p.prompt_sums[li]
                for k, (a, n) in enumerate(zip(p.prompt_starts.tolist(), p.prompt_counts.tolist())):
                    for part in parts:  # sum(mlp out + residual) = sum(mlp out) + sum(residual): no add, no copy
                        sums[k] += torch.sum(part[a:a + n], 0, dtype=torch.float32)
                if p.prompt_rows is not None:  # weighted once the pass's entropies are known
                    p.prompt_states[li] = _rows(output, p.prompt_rows.to(device))
            if p.last_prompt_rows is not None and len(p.last_reqs):
                p.last[li] = _rows(output, p.last_prompt_rows.to(device))
        if layer in self.decode_index:
            if p.decode_rows is not None:
                p.decode[self.decode_index[layer]] = _rows(output, p.decode_rows.to(device))
            if p.pool_rows is not None and len(p.pool_reqs):
                p.pool[self.decode_index[layer]] = _rows(output, p.pool_rows.to(device))

    def _entropies(self, p: _Pass) -> None:
        """H of every row of the pass whose pool needs one: vLLM's own logits for each request's last
        row, `compute_logits` on the final hidden states for the others (prompt rows, recomputed ones)."""
        state = self.runner.execute_model_state
        if state.logits.shape[0] != len(p.req_ids):
            raise RuntimeError(f"vLLM computed logits for {state.logits.shape[0]} rows, not one per request "
                               f"({len(p.req_ids)}); the extraction supports no speculative decoding")
        hidden = state.hidden_states
        entropy = torch.full((hidden.shape[0],), float("nan"), device=hidden.device)
        needed = [rows for rows in (p.prompt_rows, p.pool_rows if "entropy" in self.decode_kinds else None)
                  if rows is not None and len(rows)]
        last = torch.from_numpy(p.last_rows).to(hidden.device)
        if needed:
            rows = torch.unique(torch.cat(needed).to(hidden.device))
            others = rows[~torch.isin(rows, last)]
            for a in range(0, len(others), 256):  # bounded logits: 256 rows of the vocabulary at a time
                chunk = others[a:a + 256]
                entropy[chunk] = token_entropy(self.runner.model.compute_logits(hidden.index_select(0, chunk)))
        entropy[last] = token_entropy(state.logits)
        p.entropy = entropy

    def _slot(self, rid: str) -> int:
        """The request's row of the running pools (a new one starts empty)."""
        if rid not in self.slot_of:
            slot = self.free_slots.pop() if self.free_slots else len(self.slot_of)
            self.slot_of[rid] = slot
            self.pools.grow(slot + 1)
            self.pools.reset(slot)
        return self.slot_of[rid]

    def _finish_pass(self) -> None:
        p, self.pass_, self.armed = self.pass_, None, False
        if p is None:
            return
        for i in np.nonzero(p.restart)[0].tolist():  # a new or recomputed request: its pools start again
            rid = p.req_ids[i]
            self.prompt_wsums.pop(rid, None)
            if self.pools is not None and rid in self.slot_of:
                self.pools.reset(self.slot_of[rid])
        for k, i in enumerate(p.prompt_reqs.tolist()):
            rid = p.req_ids[i]
            if p.restart[i] or rid not in self.prompt_sums:
                self.prompt_sums[rid], self.prompt_counts[rid] = p.prompt_sums[:, k].clone(), 0
            else:
                self.prompt_sums[rid] += p.prompt_sums[:, k]
            self.prompt_counts[rid] += int(p.prompt_counts[k])
        self._finish_prompt_pools(p)
        self._finish_decode_pools(p)
        if len(p.sampled):
            block = torch.stack([p.decode[i] for i in range(len(self.decode_index))]).to(self.storage).cpu()
            pooled = self._sampled_pools(p)
            for k, (i, j) in enumerate(zip(p.sampled.tolist(), p.generated.tolist())):
                rid = p.req_ids[i]
                self.decode.setdefault(rid, []).append(block[:, k])
                self.generated.setdefault(rid, []).append(int(j))
                self.decode_pooled.setdefault(rid, []).append(pooled[k])

    def _finish_prompt_pools(self, p: _Pass) -> None:
        """The last prompt token's states, and the entropy-weighted prompt sums of this pass's chunks."""
        for k, i in enumerate(p.last_reqs.tolist()):
            self.prompt_last[p.req_ids[i]] = torch.stack([p.last[li][k] for li in range(len(self.prompt_index))])
        if p.prompt_rows is None or not len(p.prompt_reqs):
            return
        weights = p.entropy[p.prompt_rows.to(p.entropy.device)]
        owner = torch.from_numpy(np.repeat(np.arange(len(p.prompt_reqs)), p.prompt_counts)).to(weights.device)
        wsum = torch.zeros(len(p.prompt_reqs), device=weights.device).index_add_(0, owner, weights)
        per_layer = []
        for li in range(len(self.prompt_index)):
            states = p.prompt_states[li].float() * weights[:, None]
            per_layer.append(torch.zeros(len(p.prompt_reqs), states.shape[-1], device=states.device)
                             .index_add_(0, owner, states))
        sum_wh = torch.stack(per_layer, 1)  # [requests, Lp, d]
        for k, i in enumerate(p.prompt_reqs.tolist()):
            old = self.prompt_wsums.get(p.req_ids[i])
            self.prompt_wsums[p.req_ids[i]] = ([sum_wh[k], wsum[k]] if old is None
                                               else [old[0] + sum_wh[k], old[1] + wsum[k]])

    def _finish_decode_pools(self, p: _Pass) -> None:
        """Every generated token of the pass into its request's running pools."""
        if not self.decode_kinds or not len(p.pool_reqs):
            return
        states = torch.stack([p.pool[i] for i in range(len(self.decode_index))], 1)  # [rows, Ld, d]
        if self.pools is None:
            self.pools = RunningPools(0, tuple(states.shape[1:]), "entropy" in self.decode_kinds, states.device)
        slots = torch.tensor([self._slot(p.req_ids[i]) for i in p.pool_reqs.tolist()], device=states.device)
        weights = p.entropy[p.pool_rows.to(states.device)] if "entropy" in self.decode_kinds else None
        self.pools.add(slots, states, weights)

    def _sampled_pools(self, p: _Pass) -> list[dict]:
        """The running pools of the sampled requests, after this pass: [Ld, d] each, and the weights."""
        if not self.decode_kinds:
            return [{} for _ in p.sampled]
        slots = torch.tensor([self.slot_of[p.req_ids[i]] for i in p.sampled.tolist()], device=self.pools.count.device)
        values = {f"decode_{kind}": self.pools.pooled(kind, slots).to(self.storage).cpu() for kind in self.decode_kinds}
        if "entropy" in self.decode_kinds:
            values["decode_entropy_sum"] = self.pools.sum_w[slots].cpu()
            values["decode_token_entropy"] = p.entropy[torch.from_numpy(p.last_rows[p.sampled]).to(p.entropy.device)].cpu()
        return [{name: v[k] for name, v in values.items()} for k in range(len(p.sampled))]

    def take(self, req_ids: list[str]) -> dict:
        """The finished requests' states, forgotten here, as wire tensors: {id: {"mean": the prompt mean
        [Lp, d] float32 or None, "decode": [Ld, m, d] or None, "generated": j per state, "pooled": the
        pooled inputs by shard tensor name}}."""
        out = {}
        for rid in req_ids:
            sums, count = self.prompt_sums.pop(rid, None), self.prompt_counts.pop(rid, 0)
            states, generated = self.decode.pop(rid, []), self.generated.pop(rid, [])
            pooled = self._pooled(rid, sums, count, len(states))
            out[rid] = {"mean": None if sums is None else to_wire((sums / max(count, 1)).cpu()),
                        "decode": to_wire(torch.stack(states, 1)) if states else None, "generated": generated,
                        "pooled": {name: to_wire(t) for name, t in pooled.items()}}
            if rid in self.slot_of:
                self.free_slots.append(self.slot_of.pop(rid))
        return out

    def _pooled(self, rid: str, sums: torch.Tensor | None, count: int, num_states: int) -> dict[str, torch.Tensor]:
        """A finished request's pooled inputs (store's shard tensors), forgotten here."""
        out = {}
        last, weighted = self.prompt_last.pop(rid, None), self.prompt_wsums.pop(rid, None)
        if self.last and last is not None:
            out["prompt_last"] = last.to(self.storage).cpu()
        if self.prompt_entropy and sums is not None:
            sum_wh, sum_w = weighted if weighted is not None else (torch.zeros_like(sums), torch.zeros(()))
            pooled = prompt_input("entropy", sums, max(count, 1), sum_wh=sum_wh, sum_w=sum_w)
            out["prompt_entropy"], out["prompt_entropy_sum"] = pooled.to(self.storage).cpu(), sum_w.float().cpu()
        if self.decode_names:
            samples = self.decode_pooled.pop(rid, [])
            d = samples[0]["decode_mean"].shape[-1] if samples else (sums.shape[-1] if sums is not None else 0)
            out.update(decode_pooled(samples, len(self.decode_index), d, self.storage, self.decode_names))
        return out


class ExtractionWorkerExtension:
    """Methods vLLM adds to its worker (`worker_extension_cls`); prefixed so they never clash with its own."""

    def trail_probe_extract_attach(self, prompt_layers: list[int], decode_layers: list[int], stride: int,
                                   storage_dtype: str, inputs: dict | None = None) -> int:
        from trail_probe.offline.store import OLD_INPUTS
        from trail_probe.serving.vllm_internals import skip_cpu_generator_rewind

        runner = self.model_runner
        skip_cpu_generator_rewind(runner)  # sampled answers are seeded (extract.num_samples)
        if getattr(runner, "_trail_probe_extract", None) is None:
            runner._trail_probe_extract = _Capture(runner, prompt_layers, decode_layers, stride, storage_dtype,
                                                   inputs or OLD_INPUTS)
        capture = runner._trail_probe_extract
        return len(capture.aux_layers or capture.capture.layers)

    def trail_probe_extract_skip(self, req_ids: list[str]) -> None:
        """Requests whose states are not wanted (an extraction's sampled answers: lengths only)."""
        self.model_runner._trail_probe_extract.skip.update(req_ids)

    def trail_probe_extract_take(self, req_ids: list[str]) -> dict:
        return self.model_runner._trail_probe_extract.take(req_ids)
