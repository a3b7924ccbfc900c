"""The vLLM plugin's parts that need no engine: the worker's payload, live accuracy, the private vLLM
internals it relies on (each checked against the installed vLLM), and `trail-probe serve`'s command."""

import math

import numpy as np
import pytest
import torch

from trail_probe.serving.live_stats import LiveStats


def test_live_stats_score_finished_requests_by_hand():
    stats = LiveStats()
    stats.finished({"initial": 100.0, "trace": [(1, 80.0), (9, 60.0)]}, length=90)  # truth left: 89, 81
    stats.finished({"initial": 10.0, "trace": [(1, 20.0)]}, length=30)  # truth left: 29
    stats.finished({"initial": 50.0, "trace": []}, length=20)
    stats.finished(None, length=5)  # never admitted: nothing to score
    s = stats.snapshot()
    assert s["finished_scored"] == 3
    assert s["initial_mae"] == pytest.approx((10 + 20 + 30) / 3)
    assert s["refined_mae"] == pytest.approx((9 + 21 + 9) / 3) and s["refined_points"] == 3
    # initial estimates 100, 10, 50 against lengths 90, 30, 20: pairs (1,2) +, (1,3) +, (2,3) - -> tau = 1/3
    assert s["initial_tau"] == pytest.approx(1 / 3)
    # refined at step 1: (80, 89) and (20, 29) agree -> 1.0; step 9 has one point
    assert s["refined_tau_same_step"] == pytest.approx(1.0)
    stats.count("pauses", 2)
    assert "2 finished" not in stats.line() and "3 finished" in stats.line() and "pauses 2" in stats.line()
    assert math.isnan(LiveStats().snapshot()["initial_mae"])


def test_the_payload_holds_the_asked_rows_and_per_block_prompt_sums():
    from trail_probe.serving.vllm_worker import Payload, Wants, build_payload

    torch.manual_seed(0)
    layer0, layer1 = torch.randn(12, 4), torch.randn(12, 4)
    bounds = np.array([0, 5, 6, 12])  # requests a (5 rows), b (1 row), c (6 rows)
    wants = Wants(states=["b", "c", "gone"], prompt={"a": (14, 19), "c": (30, 33)}, last=["a", "gone"], block_size=16)
    p = build_payload({0: layer0, 1: layer1}, ["a", "b", "c"], bounds, wants, layer=1, prompt_layer=0)
    assert p.state_ids == ["b", "c"] and torch.equal(p.states, torch.stack([layer1[5], layer1[11]]))
    assert p.last_ids == ["a"] and torch.equal(p.last_states, layer0[4:5])  # the prompt layer's, at a's last row
    # a: positions 14..18 -> blocks 0 (14, 15) and 1 (16..18); c: positions 30..32, of which 30, 31 in block 1 and
    # 32 in block 2, then its prompt ends (33): rows 9..11 are generated tokens and are not summed
    assert p.prompt_ids == ["a", "a", "c", "c"] and p.prompt_blocks.tolist() == [0, 1, 1, 2]
    assert p.prompt_counts.tolist() == [2, 3, 2, 1]
    expected = torch.stack([layer0[0:2].sum(0), layer0[2:5].sum(0), layer0[6:8].sum(0), layer0[8]])
    assert torch.allclose(p.prompt_sums, expected)
    import pickle

    back = pickle.loads(pickle.dumps(p))  # crosses to the scheduler as numpy arrays
    assert isinstance(back, Payload) and isinstance(back.states, np.ndarray) and np.allclose(back.prompt_sums, expected.numpy())
    assert back.last_ids == ["a"] and np.allclose(back.last_states, layer0[4:5].numpy())


def _step(new=(), cached=(), finished=()):
    """A stand-in SchedulerOutput: new requests (id, prompt length, first position), cached ones (id,
    first position), finished ids."""
    from types import SimpleNamespace as NS

    return NS(scheduled_new_reqs=[NS(req_id=r, prompt_token_ids=[0] * n, num_computed_tokens=c) for r, n, c in new],
              scheduled_cached_reqs=NS(req_ids=[r for r, _ in cached], num_computed_tokens=[c for _, c in cached]),
              finished_req_ids=set(finished))


def test_the_worker_pools_the_generated_rows_once_and_sends_the_probe_input():
    """A decode probe reading current+mean: the worker adds each request's generated rows (positions >=
    its prompt length, across chunked prefills, decodes and a recomputation after a preemption) once, and
    the state it sends is [current, mean of the generated rows so far]; a finished request's pool is freed."""
    from trail_probe.serving.vllm_worker import Wants, WorkerPools, build_payload

    torch.manual_seed(0)
    h = {"a": torch.randn(12, 4), "b": torch.randn(12, 4)}  # each request's state at each position
    pools = WorkerPools("current+mean", 4)

    def run(step, layout, wants=None):
        """layout: [(request, first position, rows)] in batch order."""
        pools.schedule(step)
        rows = torch.cat([h[r][pos:pos + n] for r, pos, n in layout])
        bounds = np.cumsum([0] + [n for _, _, n in layout])
        req_ids = [r for r, _, _ in layout]
        pools.add_pass(rows, req_ids, bounds)
        return build_payload({1: rows}, req_ids, bounds, wants, layer=1, prompt_layer=None, pools=pools) if wants else None

    run(_step(new=[("a", 5, 0), ("b", 3, 0)]), [("a", 0, 3), ("b", 0, 3)])  # a: a chunk of its prompt; b: its prompt
    assert pools.pools.added == {}  # nothing generated yet (b's row 2 is the last prompt token, g = 0)
    run(_step(cached=[("a", 3), ("b", 3)]), [("a", 3, 2), ("b", 3, 1)])  # a: prompt ends; b: g = 1 (position 3)
    p = run(_step(cached=[("a", 5), ("b", 4)]), [("a", 5, 1), ("b", 4, 1)], Wants(states=["a", "b"]))
    assert p.state_ids == ["a", "b"]
    assert torch.allclose(p.states[0], torch.cat([h["a"][5], h["a"][5]]))  # a at g = 1: position 5 only
    assert torch.allclose(p.states[1], torch.cat([h["b"][4], h["b"][3:5].mean(0)]))  # b at g = 2
    # b preempted and recomputed from position 0 (prompt and its generated rows again, plus a new one)
    p = run(_step(cached=[("b", 0)]), [("b", 0, 6)], Wants(states=["b"]))
    assert pools.pools.added["b"] == 3
    assert torch.allclose(p.states[0], torch.cat([h["b"][5], h["b"][3:6].mean(0)]))
    run(_step(finished=["a"], cached=[("b", 6)]), [("b", 6, 1)])
    assert set(pools.pools.slots) == {"b"} and "a" not in pools.prompt_len


def test_prompt_sums_take_prefix_cached_blocks_from_the_cache():
    from trail_probe.serving.prompt_sums import PromptSums

    sums = PromptSums(block_size=2, width=3)
    ones, twos = torch.ones(3), 2 * torch.ones(3)
    sums.start("a", 0)
    sums.add("a", [0, 1], torch.stack([2 * ones, 2 * twos]), [2, 2])  # blocks 0 and 1 full
    sums.add("a", [2], ones[None], [1])
    sums.start("b", 4)  # b hit a's two blocks in the prefix cache
    sums.add("b", [2], twos[None], [1])
    assert sums.covered("b") == 5
    done = sums.finish({"a": ["h0", "h1"], "b": ["h0", "h1"]})
    total, count, complete = done["a"]
    assert count == 5 and torch.equal(total, 7 * ones) and complete
    total, count, complete = done["b"]
    assert count == 5 and torch.equal(total, 8 * ones) and complete  # 2 + 4 from the cache, 2 computed
    sums.start("c", 4)
    sums.add("c", [2], ones[None], [1])
    assert sums.finish({"c": ["x0", "x1"]})["c"][2] is False  # blocks it skipped were never seen: incomplete
    assert len(sums) == 0


def test_a_prefill_computed_again_after_a_preemption_is_summed_once():
    from trail_probe.serving.prompt_sums import PromptSums

    sums = PromptSums(block_size=2, width=3)
    ones = torch.ones(3)
    sums.start("a", 0, 4)
    sums.add("a", [0, 1], torch.stack([2 * ones, 4 * ones]), [2, 2])  # tokens 0-3
    sums.start("a", 0, 2)  # vLLM preempted it: its prefill starts over (no prefix-cache hit)
    sums.add("a", [0], (2 * ones)[None], [2])
    sums.start("a", 2, 5)
    sums.add("a", [1, 2], torch.stack([4 * ones, ones]), [2, 1])
    total, count, complete = sums.finish({"a": ["h0", "h1"]})["a"]
    assert count == 5 and torch.equal(total, 7 * ones) and complete


def test_every_vllm_internal_the_plugin_relies_on_is_there():
    pytest.importorskip("vllm")
    from vllm.v1.core.sched.async_scheduler import AsyncScheduler
    from vllm.v1.core.sched.request_queue import FCFSRequestQueue
    from vllm.v1.core.sched.scheduler import Scheduler
    from vllm.v1.outputs import ModelRunnerOutput
    from vllm.v1.request import Request
    from vllm.v1.worker.gpu_model_runner import AsyncGPUModelRunnerOutput, GPUModelRunner

    from trail_probe.serving import vllm_internals as vi

    assert vi.is_supported(vi.vllm_version())
    for name in vi.SCHEDULER_ATTRS:
        if name.startswith("_") or name in ("make_stats",):
            assert callable(getattr(Scheduler, name)), name
    for name in ("schedule", "update_from_output", "get_grammar_bitmask", "add_request", "_free_request", "_preempt_request"):
        assert callable(getattr(Scheduler, name)), name
    assert issubclass(AsyncScheduler, Scheduler) and issubclass(FCFSRequestQueue, __import__("collections").deque)
    for name in vi.RUNNER_METHODS + ("get_model",):
        assert callable(getattr(GPUModelRunner, name)), name
    request_fields = set(Request.__init__.__code__.co_names) | set(dir(Request))
    for name in vi.REQUEST_ATTRS:
        assert name in request_fields or name in Request.__init__.__code__.co_varnames, name
    assert "_model_runner_output" in AsyncGPUModelRunnerOutput.__init__.__code__.co_names
    assert "req_ids" in ModelRunnerOutput.__dataclass_fields__
    from vllm.model_executor.models.interfaces import supports_eagle3
    from vllm.model_executor.models.llama import LlamaForCausalLM

    assert supports_eagle3(LlamaForCausalLM) and callable(LlamaForCausalLM.set_aux_hidden_state_layers)
    assert len(vi.runner_classes()) >= 2  # V1's GPU runner and the CPU runner built on it (V2 where it imports)
    vi.check_scheduler_output()  # the fields a worker pooling a decode probe's input reads


def test_a_changed_internal_fails_loudly_with_the_version(monkeypatch):
    from trail_probe.serving import vllm_internals as vi

    class Bare:
        pass

    with pytest.raises(vi.VLLMInternalsChanged, match=r"vLLM .* changed an internal .*Scheduler\.running"):
        vi.require(Bare(), ("running",), "Scheduler")
    import vllm

    monkeypatch.setattr(vllm, "__version__", "0.40.1")
    from trail_probe.errors import UserError
    from trail_probe.serving.vllm_checks import check_vllm

    with pytest.raises(UserError, match=r"supports vllm >=0.32,<0.34.*found 0.40.1"):
        check_vllm()


def test_serve_prints_what_is_active_and_the_vllm_command(tmp_path, capsys):
    """`trail-probe serve --dry-run` on the committed predictor (decode probe only: initial=last_token)."""
    pytest.importorskip("vllm")
    from trail_probe.cli import main

    code = main(["serve", "recipes/smollm2_alpaca_hf.yaml", "serve.initial=last_token", "serve.max_running=16",
                 "serve.prefill_order=arrival", "--dry-run", "--", "--port", "8123"])
    out = capsys.readouterr().out
    assert code == 0, out
    line = next(x for x in out.splitlines() if x.startswith("trail-probe serve: TRAIL active"))
    assert "layer 19" in line and "initial estimate last_token" in line and "at most 16 decoding" in line
    assert "prefills in arrival order" in line, line
    cmd = out.strip().splitlines()[-1]
    assert "vllm.entrypoints.openai.api_server" in cmd and "--port 8123" in cmd
    assert "TrailVLLMScheduler" in cmd and '"max_running": 16' in cmd and "--enforce-eager" not in cmd
    assert main(["serve", "recipes/smollm2_alpaca.yaml", "--dry-run"]) == 0  # the default: its bundled prompt probe
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("trail-probe serve: TRAIL active"))
    assert "initial estimate prompt_probe" in line and "reading the last prompt token's state" in line, line
    assert "prefills shortest prompt first" in line, line
    assert main(["serve", "recipes/smollm2_alpaca_hf.yaml", "--dry-run", "--", "--scheduler-cls", "x"]) == 2
    assert "set by trail-probe serve" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # only serve passes arguments on
        main(["eval", "recipes/smollm2_alpaca_hf.yaml", "--", "--port", "1"])
    assert "takes no arguments after '--'" in capsys.readouterr().err


def test_the_running_limit_follows_the_engines_step_costs():
    from trail_probe.serving.step_cost import StepCost

    cpu = StepCost()
    for k in range(1, 129):  # each token costs about the same: a smaller batch loses little throughput
        cpu.add(k, 0.018 + 0.0027 * k)
    a, b = cpu.fit()
    assert a == pytest.approx(0.018) and b == pytest.approx(0.0027)
    k = cpu.running_limit(128, 0.05)
    throughput = [n / (a + b * n) for n in (k - 1, k, 128)]
    assert throughput[1] >= 0.95 * throughput[2] > throughput[0]  # the smallest batch within 5%
    gpu = StepCost()
    for k in range(1, 257):  # a step is mostly its fixed cost: the limit stays near vLLM's
        gpu.add(k, 0.010 + 0.00005 * k)
    assert gpu.running_limit(256, 0.05) > 220
    young, flat = StepCost(), StepCost()
    for _ in range(10):
        young.add(5, 0.03)
    for _ in range(100):
        flat.add(64, 0.2)
    assert young.running_limit(128, 0.05) == 128 and flat.running_limit(128, 0.05) == 128  # nothing to fit yet
    window = StepCost(window=60)
    for k in range(1, 200):
        window.add(k % 50 + 1, 1.0 + 0.5 * (k % 50 + 1) if k < 100 else 0.02 + 0.003 * (k % 50 + 1))
    assert window.fit()[1] == pytest.approx(0.003)  # only the latest steps count


def test_a_live_line_reads_back_as_the_numbers_it_shows():
    """Benchmarks read the server's live line back (`LiveStats.parse`): every field, in the line's own format."""
    stats = LiveStats()
    stats.finished({"initial": 100.0, "trace": [(1, 80.0), (9, 60.0)]}, length=90)
    stats.count("pauses", 4)
    stats.count("prefill_steps", 2)
    snap = {**stats.snapshot(), "running_limit": 71}
    back = LiveStats.parse("(EngineCore pid=7) INFO 12-08 03:23:31 [vllm_scheduler.py:284] " + stats.line(snap))
    for key, value in back.items():
        assert value == pytest.approx(snap[key], abs=0.05, nan_ok=True), key
    assert back["pauses"] == 4 and back["prefill_steps"] == 2 and back["running_limit"] == 71 and len(back) == 12
    assert LiveStats.parse("INFO Engine 000: Avg prompt throughput: 42.3 tokens/s") is None
