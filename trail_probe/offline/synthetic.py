"""Synthetic hidden states in which the answer length is a known function of the state, and an
extraction folder made of them.

Used by fast tests of the stages after `extract` (`make_synthetic_extraction`, no model needed) and by
the training benchmarks (`LengthSignal`: tensors of the real shape, the same rule). In the layers
listed as `informative`, a fixed random direction of the hidden state carries the (total or
remaining) length, plus Gaussian noise; the other layers carry only noise. So a probe trained on an
informative layer must beat a constant predictor, and a layer sweep must find those layers.
`gains` ({layer: strength}, instead of `informative`) gives each layer its own signal strength, so
that one layer is clearly best and its neighbours next best, as a layer search expects. With `pooled`
the extraction also stores the pooled probe inputs (each the same rule with its own noise, so every
input can be trained on; their entropy weights are random), and with `num_samples` each prompt's
sampled answer lengths (the true length moved by up to 40 tokens).

    python -m trail_probe.offline.synthetic data/synthetic   # writes a small one for experiments
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from trail_probe.atomic import atomic_write_json
from trail_probe.offline.store import (
    FORMAT,
    LAYER_NUMBERING,
    ExtractedRequest,
    shard_name,
    stored_inputs,
    write_shard,
)

SYNTHETIC_MODEL = "synthetic://linear-length"


class LengthSignal:
    """The synthetic rule: a fixed random unit `direction` carries length / max_new_tokens (times a
    layer's gain) and every dimension Gaussian noise of std `noise`; draws come from `generator` in
    the order of the calls."""

    def __init__(self, hidden_size: int, max_new_tokens: int = 512, noise: float = 0.05,
                 generator: torch.Generator | None = None):
        self.generator = generator if generator is not None else torch.Generator().manual_seed(0)
        direction = torch.randn(hidden_size, generator=self.generator)
        self.direction = direction / direction.norm()
        self.max_new_tokens, self.noise = max_new_tokens, noise

    def states(self, length: torch.Tensor, num_layers: int = 1, gains: dict[int, float] | None = None) -> torch.Tensor:
        """[num_layers, n, d] float32: the length signal in the layers of `gains` ({layer: gain};
        default: layer 0, gain 4), noise everywhere."""
        out = torch.randn(num_layers, len(length), len(self.direction), generator=self.generator) * self.noise
        signal = (length.float() / self.max_new_tokens)[:, None] * self.direction
        for layer, gain in ({0: 4.0} if gains is None else gains).items():
            out[layer] += signal * gain
        return out


def make_synthetic_extraction(root: str | Path, num_requests: int = 200, hidden_size: int = 16,
                              num_layers: int = 4, informative: tuple[int, ...] = (1, 2),
                              decode_stride: int = 8, max_new_tokens: int = 512, noise: float = 0.05,
                              shard_size: int = 64, seed: int = 0, dtype: torch.dtype = torch.float16,
                              gains: dict[int, float] | None = None, pooled: bool = False, num_samples: int = 0) -> Path:
    root = Path(root)
    gains = {layer: 4.0 for layer in informative} if gains is None else gains
    signal = LengthSignal(hidden_size, max_new_tokens, noise, torch.Generator().manual_seed(seed))
    g = signal.generator
    layers = list(range(num_layers))

    def states(length: torch.Tensor) -> torch.Tensor:
        return signal.states(length, num_layers, gains).to(dtype)

    lengths = torch.randint(0, max_new_tokens + 1, (num_requests,), generator=g)
    prompt_states = states(lengths)
    requests = []
    for i in range(num_requests):
        n = int(lengths[i])
        generated = torch.arange(1, n + 1, decode_stride)
        text = f"synthetic prompt {i}"
        record = {"id": f"syn-{i:06d}", "prompt": text, "response": "x" * n, "prompt_tokens": 8 + i % 50,
                  "output_tokens": n, "hit_cap": n >= max_new_tokens, "truncated": False}
        requests.append(ExtractedRequest(record, prompt_states[:, i], states(n - generated), generated))
        if pooled:
            m = len(generated)
            requests[-1].pooled = {"prompt_last": states(lengths[i:i + 1])[:, 0], "prompt_entropy": states(lengths[i:i + 1])[:, 0],
                                   "prompt_entropy_sum": torch.rand((), generator=g) * 50,
                                   "decode_mean": states(n - generated), "decode_entropy": states(n - generated),
                                   "decode_entropy_sum": torch.rand(m, generator=g) * 50,
                                   "decode_token_entropy": torch.rand(m, generator=g) * 3}

    model = {"name_or_path": SYNTHETIC_MODEL, "weights_sha256": None, "architecture": "Synthetic",
             "num_layers": num_layers, "hidden_size": hidden_size, "max_position_embeddings": 0,
             "dtype": "float32"}
    manifest = {
        "format": FORMAT, "identity": {"synthetic": True, "seed": seed}, "model": model,
        "layer_numbering": LAYER_NUMBERING, "prompt_layers": layers, "decode_layers": layers,
        "decode_stride": decode_stride, "storage_dtype": str(dtype).removeprefix("torch."),
        "generation": {"max_new_tokens": max_new_tokens, "do_sample": False},
        "prompts": {"source": "synthetic", "num_available": num_requests, "num_selected": num_requests},
        "num_workers": 1, "config": {"synthetic": {"gains": {str(k): v for k, v in gains.items()}, "noise": noise}},
        **({"inputs": stored_inputs("all")} if pooled else {}),
    }
    if num_samples:
        moved = lengths[:, None] + torch.randint(-40, 41, (num_requests, num_samples), generator=g)
        atomic_write_json(root / "samples" / "worker-0.json", {"worker_index": 0, "num_samples": num_samples, "lengths": {
            r.record["id"]: moved[i].clamp(0, max_new_tokens).tolist() for i, r in enumerate(requests)}})
    atomic_write_json(root / "manifest.json", manifest)
    for seq, start in enumerate(range(0, num_requests, shard_size)):
        write_shard(root / "shards" / shard_name(0, seq), requests[start:start + shard_size],
                    num_layers, num_layers, hidden_size, dtype)
    atomic_write_json(root / "workers" / "worker-0.json",
                      {"worker_index": 0, "expected": num_requests, "done": num_requests, "complete": True})
    return root


if __name__ == "__main__":
    print(make_synthetic_extraction(sys.argv[1] if len(sys.argv) > 1 else "data/synthetic"))
