"""vLLM's own scheduler without a model: its real `schedule` and `update_from_output`, fed a stand-in
model output, to test TRAIL's decisions against vLLM's and to time them.

    s = dry_scheduler(folder, TrailSettings(predictor=...), max_num_seqs=8)
    model = StandInModel(s, lengths={"r0": 40})
    s.add_request(dry_request("r0", prompt=list(range(30)), max_tokens=64))
    while s.has_requests():
        model.step()

`folder` needs only a model's config.json (tests use a tiny random Llama). The scheduler is vLLM's
(`Scheduler`, or TRAIL's subclass with `settings`) with its KV cache manager over `num_blocks`
blocks; `StandInModel` plays the worker: each scheduled request that samples gets one token (EOS
when it reaches its length), and the probe-layer states the scheduler asked for (`Wants`) come back
as the worker would send them, from a fixed function of (request, position) so they do not depend
on the batch (a function of the tokens up to the position, as a causal model's state is). With `async_scheduling` the stand-in keeps one step in flight, as vLLM's engine core
does: step N+1 is scheduled before step N's output is applied. Each step calls the scheduler's
`get_grammar_bitmask` after `schedule`, as vLLM's step does (`grammar_call=False`: a step that skips it).
"""

from __future__ import annotations

import zlib
from collections import deque

import numpy as np
import torch

EOS = 2


def dry_config(folder, settings=None, *, max_num_seqs: int = 8, max_num_batched_tokens: int = 256,
               block_size: int = 16, async_scheduling: bool = False, enable_prefix_caching: bool = True,
               max_model_len: int = 512):
    from vllm.config import CacheConfig, ModelConfig, SchedulerConfig, VllmConfig

    model = ModelConfig(model=str(folder), dtype="float32", max_model_len=max_model_len, skip_tokenizer_init=True,
                        seed=0)
    sched = SchedulerConfig(max_num_seqs=max_num_seqs, max_num_batched_tokens=max_num_batched_tokens,
                            max_model_len=max_model_len, is_encoder_decoder=False, enable_chunked_prefill=True,
                            async_scheduling=async_scheduling)
    cache = CacheConfig(block_size=block_size, cache_dtype="auto", enable_prefix_caching=enable_prefix_caching)
    config = VllmConfig(model_config=model, scheduler_config=sched, cache_config=cache,
                        additional_config={} if settings is None else settings.additional_config())
    config.scheduler_config.async_scheduling = async_scheduling  # the CPU platform turns it off; a test may want it
    return config


def dry_scheduler(folder, settings=None, *, num_blocks: int = 1000, **config_kwargs):
    """vLLM's scheduler (TRAIL's with `settings`, else the recording FCFS one) over a KV cache of `num_blocks`."""
    from vllm.v1.core.kv_cache_utils import init_none_hash
    from vllm.v1.kv_cache_interface import FullAttentionSpec, KVCacheConfig, KVCacheGroupSpec
    from vllm.v1.structured_output import StructuredOutputManager
    from vllm.utils.hashing import sha256

    from trail_probe.serving.vllm_scheduler import RecordingScheduler, TrailVLLMScheduler

    config = dry_config(folder, settings, **config_kwargs)
    block_size = config.cache_config.block_size
    init_none_hash(sha256)
    kv = KVCacheConfig(num_blocks=num_blocks, kv_cache_tensors=[], kv_cache_groups=[
        KVCacheGroupSpec(["layer"], FullAttentionSpec(block_size=block_size, num_kv_heads=1, head_size=32,
                                                      dtype=torch.float32))])
    config.cache_config.num_gpu_blocks = num_blocks
    cls = RecordingScheduler if settings is None else TrailVLLMScheduler
    return cls(vllm_config=config, kv_cache_config=kv, log_stats=True,
               structured_output_manager=StructuredOutputManager(config), block_size=block_size)


def dry_request(rid: str, prompt: list[int], max_tokens: int, arrival: float = 0.0, extra_args: dict | None = None,
                block_size: int = 16):
    from vllm import SamplingParams
    from vllm.utils.hashing import sha256
    from vllm.v1.core.kv_cache_utils import get_request_block_hasher, init_none_hash
    from vllm.v1.request import Request

    init_none_hash(sha256)

    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, extra_args=extra_args)
    params.update_from_generation_config({}, EOS)
    return Request(rid, list(prompt), params, None, arrival_time=arrival,
                   block_hasher=get_request_block_hasher(block_size, sha256))


def fixed_state(tokens: list[int], width: int) -> torch.Tensor:
    """The state of the last of `tokens`: random, but fixed by the tokens up to it (as a causal model's
    is), so two requests that share a prefix share its states, whatever the batch."""
    return torch.randn(width, generator=torch.Generator().manual_seed(zlib.crc32(np.asarray(tokens, np.int64).tobytes())))


class StandInModel:
    """The worker's side of each step: tokens (EOS at each request's length) and the states asked for."""

    def __init__(self, scheduler, lengths: dict[str, int], width: int = 64, async_scheduling: bool = False,
                 grammar_call: bool = True):
        self.s, self.lengths, self.width, self.grammar_call = scheduler, lengths, width, grammar_call
        self.in_flight: deque = deque()
        self.depth = 2 if async_scheduling else 1
        self.steps = 0
        self.batches: list[list[str]] = []
        self.states_asked = 0  # decode-layer states the scheduler asked for (refinements; last_token's first ones)

    def step(self) -> dict:
        """Schedule one step (and, once `depth` steps are in flight, apply the oldest's output).
        Returns the scheduler's outputs of the applied step."""
        out = self.s.schedule()
        if self.grammar_call:  # as vLLM's EngineCore.step does while the worker runs the pass
            self.s.get_grammar_bitmask(out)
        self.batches.append(list(out.num_scheduled_tokens))
        # what the pass computes is fixed now; its tokens are known once the steps before it are applied
        at = {rid: (self.s.requests[rid].num_computed_tokens - 1, self.s.requests[rid].is_prefill_chunk)
              for rid in out.num_scheduled_tokens}
        self.in_flight.append((out, at))
        self.steps += 1
        if len(self.in_flight) < self.depth and self.s.has_requests():
            return {}
        return self._apply_oldest()

    def drain(self, max_steps: int = 100_000) -> None:
        while (self.s.has_requests() or self.in_flight) and max_steps:
            if self.s.has_requests():
                self.step()
            else:
                self._apply_oldest()
            max_steps -= 1

    def _apply_oldest(self) -> dict:
        out, at = self.in_flight.popleft()
        return self.s.update_from_output(out, self._output(out, at))

    def _output(self, out, at: dict):
        from vllm.v1.outputs import ModelRunnerOutput

        from trail_probe.serving.vllm_worker import PAYLOAD_ATTR, WANTS_ATTR

        ids, tokens = list(out.num_scheduled_tokens), []
        for rid in ids:
            r = self.s.requests.get(rid)
            if r is None or at[rid][1]:  # finished meanwhile, or a prefill chunk that samples nothing
                tokens.append([])
                continue
            tokens.append([EOS if r.num_output_tokens + 1 >= self.lengths.get(rid, 10**9) else 7])
        result = ModelRunnerOutput(req_ids=ids, req_id_to_index={rid: i for i, rid in enumerate(ids)},
                                   sampled_token_ids=tokens)
        wants = getattr(out, WANTS_ATTR, None)
        if wants:
            self.states_asked += len(wants.states)
            setattr(result, PAYLOAD_ATTR, self._payload(at, wants))
        return result

    def _payload(self, at: dict, wants):
        """What the worker would send: the last scheduled token's state (a pooled decode probe's input, by
        `probe_inputs.decode_input`, as the worker's pools give it), prompt sums per block, and the last
        prompt token's state (the stand-in model's states are the same at every layer)."""
        from trail_probe.runtime.probe_inputs import decode_input, pools_needed
        from trail_probe.serving.vllm_worker import Payload

        states, last, tokens = [], {}, {}
        kind = self.s.runtime.decode_input  # wants come only from TRAIL's scheduler
        for rid, (position, _) in at.items():
            last[rid] = position  # of the last scheduled token
            tokens[rid] = list(self.s.requests[rid].all_token_ids) if rid in self.s.requests else []
        for rid in wants.states:
            state = fixed_state(tokens[rid][: last[rid] + 1], self.width)
            if pools_needed(kind):
                generated = range(self.s.requests[rid].num_prompt_tokens, last[rid] + 1)
                total = sum((fixed_state(tokens[rid][: p + 1], self.width) for p in generated), torch.zeros(self.width))
                state = decode_input(kind, state, sum_h=total, count=len(generated))
            states.append(state)
        p_ids, p_blocks, p_sums, p_counts = [], [], [], []
        for rid, (start, prompt_len) in wants.prompt.items():
            end = min(last[rid] + 1, prompt_len)
            for b in range(start // wants.block_size, (end - 1) // wants.block_size + 1):
                lo, hi = max(start, b * wants.block_size), min(end, (b + 1) * wants.block_size)
                p_ids.append(rid)
                p_blocks.append(b)
                p_sums.append(torch.stack([fixed_state(tokens[rid][: p + 1], self.width) for p in range(lo, hi)]).sum(0))
                p_counts.append(hi - lo)
        lasts = [fixed_state(tokens[rid][: last[rid] + 1], self.width) for rid in wants.last]
        stack = (lambda xs: torch.stack(xs).numpy() if xs else np.zeros((0, self.width), np.float32))
        return Payload(list(wants.states), stack(states), p_ids, np.array(p_blocks, dtype=np.int64), stack(p_sums),
                       np.array(p_counts, dtype=np.int64), list(wants.last), stack(lasts))
