"""The vLLM extraction's worker hooks (`offline/vllm_capture.py`) on a stand-in model runner, without vLLM:
a toy model whose token states do not depend on their neighbours, run the way vLLM's runner runs a
model (one flattened batch per pass, prefills in chunks, decode steps, a request recomputed after a
preemption, a request whose states are not wanted), so every stored value has a reference computed
token by token. The real engine is tested against the transformers extraction in test_vllm_extract.py."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn

from trail_probe.offline.store import stored_inputs
from trail_probe.offline.vllm_capture import _Capture, from_wire

D, VOCAB, LAYERS = 8, 23, 3


class ToyLayer(nn.Module):
    """vLLM's decoder-layer contract: (hidden, residual) in, (mlp output, residual) out; their sum is
    the residual stream after the layer."""

    def __init__(self):
        super().__init__()
        self.mlp = nn.Linear(D, D)

    def forward(self, hidden, residual):
        x = hidden if residual is None else hidden + residual
        return torch.tanh(self.mlp(x)), x


class ToyModel(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.model = nn.Module()
        self.model.embed = nn.Embedding(VOCAB, D)
        self.model.layers = nn.ModuleList([ToyLayer() for _ in range(LAYERS)])
        self.lm_head = nn.Linear(D, VOCAB)
        with torch.no_grad():
            self.lm_head.weight.mul_(4.0)  # entropies that differ from token to token

    def forward(self, ids):
        hidden, residual = self.model.embed(ids), None
        for layer in self.model.layers:
            hidden, residual = layer(hidden, residual)
        return torch.tanh(hidden + residual)  # the "final norm"

    def compute_logits(self, hidden):
        return self.lm_head(hidden)


class FakeRunner:
    """The runner attributes the hooks read, and vLLM's execute_model / sample_tokens pair. With
    `aux_layers` it runs "compiled": no hook fires (none is registered), and each pass's states of those
    layers come as the model's auxiliary outputs, as `vllm_internals.request_aux_states` sets them up."""

    def __init__(self, model, aux_layers=None):
        self.model, self.execute_model_state = model, None
        self.vllm_config = SimpleNamespace(model_config=SimpleNamespace(enforce_eager=aux_layers is None))
        if aux_layers is not None:
            self._trail_probe_aux_layers = sorted(aux_layers)

    def execute_model(self, batch):
        """`batch`: (request id, its tokens, computed, prompt length, tokens in this pass) per request."""
        counts = [n for *_, n in batch]
        self.input_batch = SimpleNamespace(num_reqs=len(batch), req_ids=[b[0] for b in batch],
                                           num_computed_tokens_cpu=np.array([b[2] for b in batch]),
                                           num_prompt_tokens=np.array([b[3] for b in batch]))
        self.query_start_loc = SimpleNamespace(np=np.concatenate([[0], np.cumsum(counts)]))
        ids = torch.tensor([t for _, tokens, c, _, n in batch for t in tokens[c:c + n]])
        aux = None
        with torch.inference_mode():
            if hasattr(self, "_trail_probe_aux_layers"):
                streams, (hidden, residual) = [], (self.model.model.embed(ids), None)
                for layer in self.model.model.layers:
                    hidden, residual = layer(hidden, residual)
                    streams.append(hidden + residual)
                hidden = torch.tanh(hidden + residual)
                aux = [streams[layer] for layer in self._trail_probe_aux_layers]
            else:
                hidden = self.model(ids)
            logits = self.model.compute_logits(hidden[torch.tensor(np.cumsum(counts) - 1)])
        self.execute_model_state = SimpleNamespace(logits=logits, hidden_states=hidden, aux_hidden_states=aux)

    def sample_tokens(self, grammar=None):
        self.execute_model_state = None
        return "sampled"


def token_reference(model, tokens):
    """Per position: the residual stream after each layer [T, L, d] and the next-token entropy [T]."""
    states = []
    hooks = [layer.register_forward_hook(lambda m, i, out: states.append(out[0] + out[1])) for layer in model.model.layers]
    with torch.no_grad():
        logits = model.compute_logits(model(torch.tensor(tokens)))
    for h in hooks:
        h.remove()
    p = torch.softmax(logits, -1)
    return torch.stack(states, 1), -(p * torch.log_softmax(logits, -1)).sum(-1)


@pytest.mark.parametrize("compiled", [False, True], ids=["hooks", "aux_states"])
def test_the_worker_hooks_store_each_input_as_defined_through_chunks_and_a_recompute(compiled):
    model, stride = ToyModel(), 2
    runner = FakeRunner(model, aux_layers=[0, 1, 2] if compiled else None)
    capture = _Capture(runner, [0, 1, 2], [0, 2], stride, "float32", stored_inputs("all"))
    capture.skip.add("c")  # a sampled answer: nothing of it is kept
    g = torch.Generator().manual_seed(1)
    full = {"a": torch.randint(0, VOCAB, (7 + 9,), generator=g).tolist(),  # prompt 7, 9 generated
            "b": torch.randint(0, VOCAB, (3 + 7,), generator=g).tolist(),  # prompt 3, 7 generated
            "c": torch.randint(0, VOCAB, (4 + 3,), generator=g).tolist()}
    prompt = {"a": 7, "b": 3, "c": 4}
    passes = [[("a", 0, 4), ("c", 0, 4)],             # a's prompt in two chunks
              [("a", 4, 3), ("b", 0, 3), ("c", 4, 1)],
              *[[("a", 6 + g, 1), ("b", 2 + g, 1)] for g in (1, 2, 3)],  # b generates up to 4 tokens
              [("a", 10, 1), ("b", 0, 7)],            # b preempted: recomputed, prompt + 4 generated in one pass
              *[[("a", 10 + g, 1), ("b", 6 + g, 1)] for g in (1, 2)],
              [("a", 13, 1)], [("a", 14, 1)]]
    for batch in passes:
        runner.execute_model([(rid, full[rid], c, prompt[rid], n) for rid, c, n in batch])
        assert runner.sample_tokens() == "sampled"
    out = capture.take(["a", "b"])
    assert not capture.prompt_sums and not capture.slot_of and "c" not in capture.decode
    for rid, last_g in (("a", 9), ("b", 7)):  # (one past the last step g)
        P, got = prompt[rid], out[rid]
        states, H = token_reference(model, full[rid])
        pooled = {name: from_wire(w) for name, w in got["pooled"].items()}
        torch.testing.assert_close(from_wire(got["mean"]), states[:P].mean(0), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(pooled["prompt_last"], states[P - 1], atol=1e-6, rtol=1e-6)
        weighted = (H[:P, None, None] * states[:P]).sum(0) / H[:P].sum()
        torch.testing.assert_close(pooled["prompt_entropy"], weighted, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(pooled["prompt_entropy_sum"], H[:P].sum(), atol=1e-5, rtol=1e-5)
        expected_g = [j for j in range(1, last_g) if (j - 1) % stride == 0]
        assert got["generated"] == expected_g, rid
        decode = from_wire(got["decode"])  # [Ld, m, d]
        for k, j in enumerate(expected_g):
            gen = slice(P, P + j)
            cur = states[P - 1 + j][[0, 2]]
            torch.testing.assert_close(decode[:, k], cur, atol=1e-6, rtol=1e-6)
            torch.testing.assert_close(pooled["decode_mean"][:, k], states[gen][:, [0, 2]].mean(0), atol=1e-5, rtol=1e-5)
            expected = (H[gen, None, None] * states[gen][:, [0, 2]]).sum(0) / H[gen].sum()
            torch.testing.assert_close(pooled["decode_entropy"][:, k], expected, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(pooled["decode_entropy_sum"][k], H[gen].sum(), atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(pooled["decode_token_entropy"][k], H[P - 1 + j], atol=1e-5, rtol=1e-5)
        assert not torch.allclose(pooled["decode_entropy"], pooled["decode_mean"], atol=1e-3)


def test_without_pooled_inputs_the_worker_keeps_trails_states_only():
    model = ToyModel()
    runner = FakeRunner(model)
    capture = _Capture(runner, [1], [1], 1, "float32", stored_inputs("trail"))
    tokens = list(range(5, 15))
    for c, n in ((0, 6), (6, 1), (7, 1)):
        runner.execute_model([("a", tokens, c, 6, n)])
        runner.sample_tokens()
    got = capture.take(["a"])["a"]
    states, _ = token_reference(model, tokens)
    assert got["pooled"] == {} and got["generated"] == [1, 2]
    torch.testing.assert_close(from_wire(got["decode"])[0], states[[6, 7], 1], atol=1e-6, rtol=1e-6)


def test_a_compiled_engine_without_auxiliary_states_is_refused_in_one_line():
    """Forward hooks do not run in compiled graphs: without the model's auxiliary outputs the extraction
    would store nothing, so it stops and says which setting works."""
    runner = FakeRunner(ToyModel())
    runner.vllm_config.model_config.enforce_eager = False
    with pytest.raises(RuntimeError, match="returns no auxiliary hidden states.*extract.vllm_compile=false"):
        _Capture(runner, [1], [1], 1, "float32", stored_inputs("trail"))
