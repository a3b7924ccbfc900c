"""The worker side of TRAIL in vLLM: the probe layers' states of each forward pass, as the scheduler asked.

A vLLM general plugin (`register`, this package's `vllm.general_plugins` entry point) wraps the
model runners' `load_model`: in an engine configured for TRAIL (`--additional-config
'{"trail_probe": {...}}'`) the runner then asks the model for the probe layers' residual streams
as auxiliary outputs, the path vLLM's EAGLE-3 support uses (`set_aux_hidden_state_layers`), so the
states come out of the compiled graph under torch.compile and CUDA graphs, vLLM's defaults. A model
without that path falls back to forward hooks, which run only with `--enforce-eager`.

Each step the scheduler attaches `Wants` to its `SchedulerOutput` (pickled to the worker with it):
which requests need the decode probe layer's state of their last scheduled token (those on the
refinement cadence, and a completed prefill for initial=last_token), which need the sums of their
prompt rows at the prompt probe's layer, per KV block (a prompt probe reading the mean prompt
state; per block so the scheduler can add the blocks a prefix-cache hit skipped), and which need
the prompt layer's state of their last prompt token (a prompt probe reading the last token: that
token is always computed, prefix cache or not). A decode probe that reads the generated tokens' mean
(`mean`, `current+mean`) has its running pools kept here (`WorkerPools`): every pass adds each
request's generated rows, and the states sent are the probe's inputs. Only those rows leave the device; they ride on the step's
`ModelRunnerOutput` (also under async scheduling, inside its async wrapper) as a `Payload`, which
pickles to numpy arrays. Layer numbering is TRAIL's: layer L is the residual stream after decoder
layer L, vLLM's auxiliary output L + 1. The internals used are listed in `vllm_internals`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from trail_probe.runtime.probe_inputs import RequestPools, device_index, generated_rows, pools_needed
from trail_probe.serving import vllm_internals as vi

WANTS_ATTR = "trail_probe_wants"  # on SchedulerOutput
PAYLOAD_ATTR = "trail_probe_payload"  # on ModelRunnerOutput


@dataclass
class Wants:
    """What the scheduler needs from one forward pass."""

    states: list[str] = field(default_factory=list)  # the state of each request's last scheduled token
    prompt: dict[str, tuple[int, int]] = field(default_factory=dict)  # request -> (first position in the pass, prompt length)
    last: list[str] = field(default_factory=list)  # the prompt layer's state of the last prompt token (its prefill ends here)
    block_size: int = 16

    def __bool__(self) -> bool:
        return bool(self.states or self.prompt or self.last)


class Payload:
    """What comes back: `state_ids` with `states` [n, d]; per (request, KV block) prompt sums
    (`prompt_ids`, `prompt_blocks` [m], `prompt_sums` [m, d], `prompt_counts` [m]); `last_ids` with
    `last_states` [l, d], the prompt layer's state of their last prompt token. Tensors while in the
    worker (a device-to-host copy may still run), numpy arrays once pickled."""

    def __init__(self, state_ids, states, prompt_ids, prompt_blocks, prompt_sums, prompt_counts,
                 last_ids=(), last_states=None):
        self.state_ids, self.states = state_ids, states
        self.prompt_ids, self.prompt_blocks, self.prompt_sums, self.prompt_counts = (
            prompt_ids, prompt_blocks, prompt_sums, prompt_counts)
        self.last_ids, self.last_states = list(last_ids), last_states

    def __reduce__(self):
        def arr(x):
            return x.numpy() if isinstance(x, torch.Tensor) else x
        return Payload, (self.state_ids, arr(self.states), self.prompt_ids, arr(self.prompt_blocks),
                         arr(self.prompt_sums), arr(self.prompt_counts), self.last_ids, arr(self.last_states))


def _to_host(t: torch.Tensor) -> torch.Tensor:
    t = t.float()
    if t.device.type != "cuda":
        return t.cpu()
    host = torch.empty(t.shape, dtype=torch.float32, pin_memory=True)
    host.copy_(t, non_blocking=True)  # before the step's own output copy, whose event then covers it
    return host


class StateCapture:
    """Where a runner's probe-layer states come from: the model's auxiliary outputs, or forward hooks."""

    def __init__(self, runner, layers: list[int]):
        self.layers = sorted(set(layers))
        model = runner.get_model()
        if vi.request_aux_states(runner, self.layers):
            self.hooks = None
        elif vi.is_eager(runner):
            from trail_probe.runtime.capture import LayerCapture, residual_sum

            self.hooks = LayerCapture(model, self.layers, states_of=residual_sum)
        else:
            raise RuntimeError(f"the TRAIL plugin reads layer states through vLLM's auxiliary hidden-state outputs, which "
                               f"{type(model).__name__} does not provide; serve it with --enforce-eager (forward hooks)")

    def layer_states(self, runner) -> dict[int, torch.Tensor] | None:
        """Each captured layer's states [tokens, d] for the pass just executed (before sampling)."""
        if self.hooks is not None:
            outputs = self.hooks.outputs
            return {layer: outputs[layer] for layer in self.layers} if all(l in outputs for l in self.layers) else None
        aux = vi.aux_states(runner)
        if aux is None or len(aux) != len(self.layers):
            return None
        return dict(zip(self.layers, aux))


class WorkerPools:
    """The running pools of a pooled decode probe, per request, in the worker (which sees every row):
    `schedule` reads each step's `SchedulerOutput` (prompt lengths, each request's first position,
    finished requests, whose pools are freed), `add_pass` adds the pass's generated rows at the decode
    layer (position >= prompt length: the rows of generated = 1, 2, ...; `RequestPools` skips rows a
    recomputation repeats)."""

    def __init__(self, kind: str, width: int):
        self.kind, self.width = kind, width
        self.pools = RequestPools(kind, width)  # moved to the states' device (a GPU's) by the first pass
        self.prompt_len: dict[str, int] = {}
        self.starts: dict[str, int] = {}

    def schedule(self, scheduler_output) -> None:
        prompt_lens, self.starts, finished = vi.pass_starts(scheduler_output)
        self.pools.drop(finished)
        for rid in finished:
            self.prompt_len.pop(rid, None)
        self.prompt_len.update(prompt_lens)

    def add_pass(self, decode: torch.Tensor, req_ids: list[str], bounds) -> None:
        if self.pools.pools.count.device != decode.device and not len(self.pools):
            self.pools = RequestPools(self.kind, self.width, device=decode.device)
        never = 1 << 62  # a request whose prompt length or position is unknown has no generated row here
        starts = [self.starts.get(rid, 0) for rid in req_ids]
        prompts = [self.prompt_len.get(rid, never) if rid in self.starts else never for rid in req_ids]
        reqs, rows, gens = generated_rows(starts, prompts, np.asarray(bounds[: len(req_ids) + 1]))
        if len(rows):
            picked = decode.index_select(0, device_index(rows, decode.device))
            self.pools.add([req_ids[k] for k in reqs.tolist()], gens.tolist(), picked)

    def inputs(self, ids: list[str], current: torch.Tensor) -> torch.Tensor:
        return self.pools.inputs(ids, current)


def build_payload(states: dict[int, torch.Tensor], req_ids: list[str], bounds: np.ndarray, wants: Wants,
                  layer: int, prompt_layer: int | None, pools: WorkerPools | None = None) -> Payload:
    """The rows `wants` asks for out of one pass's layer states (`bounds`: query_start_loc [n + 1]);
    with `pools`, the decode rows sent are the pooled probe's inputs."""
    index = {rid: i for i, rid in enumerate(req_ids)}
    decode = states[layer]

    def last_rows(layer_states: torch.Tensor, wanted: list[str]) -> tuple[list[str], torch.Tensor]:
        ids = [r for r in wanted if r in index]
        if not ids:
            return ids, torch.empty(0, layer_states.shape[-1])
        rows = torch.as_tensor([int(bounds[index[r] + 1]) - 1 for r in ids], dtype=torch.long)
        return ids, layer_states.index_select(0, rows.to(layer_states.device))

    ids, picked = last_rows(decode, wants.states)
    if pools is not None and ids:
        picked = pools.inputs(ids, picked)
    last_ids, last_states = last_rows(states[prompt_layer], wants.last) if prompt_layer is not None else ([], None)
    p_ids, p_rows, p_segments, p_blocks = [], [], [], []
    for rid, (start, prompt_len) in wants.prompt.items():
        i = index.get(rid)
        if i is None or prompt_layer is None:
            continue
        lo, hi = int(bounds[i]), int(bounds[i + 1])
        n = max(0, min(hi - lo, prompt_len - start))  # a recomputed request's pass also holds generated tokens
        if n == 0:
            continue
        blocks, segment = np.unique(np.arange(start, start + n) // wants.block_size, return_inverse=True)
        p_segments.append(segment + len(p_blocks))
        p_ids += [rid] * len(blocks)
        p_blocks += blocks.tolist()
        p_rows.append(np.arange(lo, lo + n))
    if p_rows:
        prompt = states[prompt_layer]
        rows_t = torch.as_tensor(np.concatenate(p_rows), dtype=torch.long, device=prompt.device)
        seg = torch.as_tensor(np.concatenate(p_segments), dtype=torch.long, device=prompt.device)
        sums = torch.zeros(len(p_blocks), prompt.shape[-1], dtype=torch.float32, device=prompt.device)
        sums.index_add_(0, seg, prompt.index_select(0, rows_t).float())
        counts = torch.bincount(seg, minlength=len(p_blocks))
        prompt_part = (p_ids, torch.as_tensor(p_blocks, dtype=torch.long), _to_host(sums), counts.cpu())
    else:
        prompt_part = ([], torch.empty(0, dtype=torch.long), torch.empty(0, decode.shape[-1]), torch.empty(0, dtype=torch.long))
    return Payload(ids, _to_host(picked), *prompt_part, last_ids, None if last_states is None else _to_host(last_states))


def attach(runner, layer: int, prompt_layer: int | None = None, decode_input: str = "current") -> dict:
    """Hook `runner` (once) so each of its outputs carries the states the scheduler asked for (for a
    decode probe reading a pool, `decode_input`, its inputs). Returns the model's shape and how the
    states are read."""
    vi.check_runner(runner)
    model = runner.get_model()
    config = getattr(model, "config", None) or runner.vllm_config.model_config.hf_config
    capture = getattr(runner, "_trail_probe_capture", None)
    if capture is None:
        capture = runner._trail_probe_capture = StateCapture(runner, [layer] + ([] if prompt_layer is None else [prompt_layer]))
        pools = None
        if pools_needed(decode_input):  # the text model's width (a multimodal config nests it)
            vi.check_scheduler_output()
            pools = WorkerPools(decode_input, int(runner.vllm_config.model_config.get_hidden_size()))
        runner._trail_probe_decode_input = decode_input
        _wrap_steps(runner, capture, layer, prompt_layer, pools)
    elif runner._trail_probe_decode_input != decode_input:
        raise RuntimeError(f"this worker already serves a decode probe reading '{runner._trail_probe_decode_input}', "
                           f"not '{decode_input}'; start a new engine for another predictor")
    return {"num_layers": int(getattr(config, "num_hidden_layers", 0)), "hidden_size": getattr(config, "hidden_size", None),
            "mode": "hooks" if capture.hooks is not None else "aux_hidden_states", "decode_input": decode_input}


def _is_output_rank() -> bool:
    """Only the first tensor-parallel rank's output reaches the scheduler; the others skip the copy."""
    try:
        from vllm.distributed.parallel_state import get_tensor_model_parallel_rank

        return get_tensor_model_parallel_rank() == 0
    except (AssertionError, ImportError, RuntimeError):
        return True


def _wrap_steps(runner, capture: StateCapture, layer: int, prompt_layer: int | None,
                pools: WorkerPools | None = None) -> None:
    execute, sample = runner.execute_model, runner.sample_tokens
    output_rank = _is_output_rank()
    pools = pools if output_rank else None
    runner._trail_probe_wants = None
    runner._trail_probe_pools = pools

    def execute_model(scheduler_output, *args, **kwargs):
        runner._trail_probe_wants = getattr(scheduler_output, WANTS_ATTR, None)
        if pools is not None:
            pools.schedule(scheduler_output)
        return execute(scheduler_output, *args, **kwargs)

    def sample_tokens(*args, **kwargs):
        wants, runner._trail_probe_wants = runner._trail_probe_wants, None
        payload = None
        if (wants or pools is not None) and output_rank:
            states = capture.layer_states(runner)
            if states is not None:
                req_ids, bounds = vi.batch_layout(runner)
                if pools is not None:
                    pools.add_pass(states[layer], req_ids, bounds)
                if wants:
                    payload = build_payload(states, req_ids, bounds, wants, layer, prompt_layer, pools)
        out = sample(*args, **kwargs)
        if payload is not None and out is not None:
            setattr(vi.inner_output(out), PAYLOAD_ATTR, payload)
        return out

    runner.execute_model, runner.sample_tokens = execute_model, sample_tokens


class TrailWorkerExtension:
    """Methods vLLM adds to its worker (`worker_extension_cls`); prefixed so they never clash with its own."""

    def trail_probe_attach(self, layer: int, prompt_layer: int | None = None, decode_input: str = "current") -> dict:
        return attach(self.model_runner, layer, prompt_layer, decode_input)


def _attach_from_settings(runner) -> None:
    from trail_probe.serving.vllm_checks import check_engine, decode_input_of, probe_layers
    from trail_probe.serving.trail_settings import TrailSettings

    extra = getattr(runner.vllm_config, "additional_config", None) or {}
    if isinstance(extra, dict) and vi.EXTRACT_KEY in extra:  # an extraction engine (offline/vllm_generation.py)
        vi.request_aux_states(runner, list(extra[vi.EXTRACT_KEY]["layers"]))
        return
    settings = TrailSettings.from_vllm_config(runner.vllm_config)
    if settings is None or settings.is_oracle:
        return
    check_engine(settings, runner.vllm_config)
    vi.skip_cpu_generator_rewind(runner)  # a client's `seed` must not kill a CPU server
    attach(runner, *probe_layers(settings), decode_input=decode_input_of(settings))


def register() -> None:
    """The vLLM general plugin: wrap each model runner's `load_model` so that a worker of an engine
    configured for TRAIL hooks the probe layers as soon as its model is loaded (before vLLM compiles
    the model or captures graphs, so the auxiliary outputs are part of them); in an extraction engine
    (`vllm_internals.EXTRACT_KEY`, `extract.vllm_compile`) the extracted layers the same way."""
    for cls in vi.runner_classes():
        original = cls.__dict__.get("load_model")
        if original is None or getattr(original, "_trail_probe", False):
            continue

        def load_model(self, *args, _original=original, **kwargs):
            _original(self, *args, **kwargs)
            _attach_from_settings(self)

        load_model._trail_probe = True
        cls.load_model = load_model
