"""The pooled probe inputs the transformers extraction stores beside TRAIL's mean and current states.

    pooled = PooledStates(inputs, num_slots=64, storage_dtype=torch.float16)
    row_pooled = pooled.prompt([states of each prompt layer [P, d]], logits [P, V])   # after a prefill
    pooled.reset(slot)                                         # a new request takes the slot
    pooled.step(states [B, Ld, d], logits [B, V])              # every decode step, every slot
    pooled.sampled(rows)                                       # their values at the sampled positions

The definitions are `runtime/probe_inputs.py`'s (the serving runtime computes the same online); this
module only feeds them: the prompt's states and its logits at every position once, and per slot the
generated tokens' running sums (`RunningPools`), added every decode step, so that the values at a
sampled position cover all the tokens generated so far without keeping any of their states.
"""

from __future__ import annotations

import torch

from trail_probe.runtime.probe_inputs import RunningPools, prompt_input, token_entropy


class PooledStates:
    """`inputs`: the manifest's stored inputs ({"prompt": [...], "decode": [...]}, `store.stored_inputs`)."""

    def __init__(self, inputs: dict, num_slots: int, storage_dtype: torch.dtype):
        self.last = "last" in inputs["prompt"]
        self.prompt_entropy = "entropy" in inputs["prompt"]
        self.decode_kinds = [kind for kind in ("mean", "entropy") if kind in inputs["decode"]]
        self.num_slots, self.storage_dtype = num_slots, storage_dtype
        self.pools: RunningPools | None = None  # made at the first step, when the states' shape is known
        self.entropy: torch.Tensor | None = None  # the latest step's token entropies, per slot

    @property
    def needs_prompt_logits(self) -> bool:
        """Whether a prefill must keep the logits of every prompt position (for the prompt entropies)."""
        return self.prompt_entropy

    @property
    def active(self) -> bool:
        return self.last or self.prompt_entropy or bool(self.decode_kinds)

    def prompt(self, states: list[torch.Tensor], logits: torch.Tensor | None) -> dict[str, torch.Tensor]:
        """The prompt's pooled inputs per prompt layer from its states [P, d] (one per layer) and, for the
        entropy pool, the logits of every prompt position [P, V]."""
        out = {}
        if self.last:
            out["prompt_last"] = torch.stack([h[-1] for h in states]).to(self.storage_dtype).cpu()
        if self.prompt_entropy:
            weights = token_entropy(logits)
            sum_h = torch.stack([h.float().sum(0) for h in states])
            sum_wh = torch.stack([weights @ h.float() for h in states])
            pooled = prompt_input("entropy", sum_h, len(weights), sum_wh=sum_wh, sum_w=weights.sum())
            out["prompt_entropy"] = pooled.to(self.storage_dtype).cpu()
            out["prompt_entropy_sum"] = weights.sum().cpu()
        return out

    def reset(self, slot: int) -> None:
        if self.pools is not None:
            self.pools.reset(slot)

    def keep(self, index: torch.Tensor) -> None:
        if self.pools is not None:
            self.pools.keep(index)
            self.entropy = None if self.entropy is None else self.entropy[index]

    def step(self, states: torch.Tensor, logits: torch.Tensor) -> None:
        """One decode step of every slot: its state [B, Ld, d] at every decode layer, and its logits [B, V]."""
        if not self.decode_kinds:
            return
        weighted = "entropy" in self.decode_kinds
        if self.pools is None:
            self.pools = RunningPools(self.num_slots, tuple(states.shape[1:]), weighted, states.device)
        self.entropy = token_entropy(logits) if weighted else None
        self.pools.add(torch.arange(len(states), device=states.device), states, self.entropy)

    def sampled(self, rows: list[int]) -> list[dict[str, torch.Tensor]]:
        """Per row of `rows` (slots at a sampled position, after their `step`): its decode pools [Ld, d]
        in the storage dtype, and the weights (sum of entropies so far, the entropy at this position)."""
        if not self.decode_kinds or not rows:
            return [{} for _ in rows]
        index = torch.tensor(rows, device=self.pools.count.device)
        values = {f"decode_{kind}": self.pools.pooled(kind, index).to(self.storage_dtype).cpu() for kind in self.decode_kinds}
        if self.entropy is not None:
            values["decode_entropy_sum"] = self.pools.sum_w[index].cpu()
            values["decode_token_entropy"] = self.entropy[index].cpu()
        return [{name: v[k] for name, v in values.items()} for k in range(len(rows))]


def decode_pooled(samples: list[dict[str, torch.Tensor]], num_layers: int, hidden_size: int,
                  storage_dtype: torch.dtype, names: list[str]) -> dict[str, torch.Tensor]:
    """A request's sampled decode pools as the shard keeps them: [Ld, m, d] per pool, [m] per weight."""
    out = {}
    for name in names:
        per_layer = name in ("decode_mean", "decode_entropy")
        if samples:
            out[name] = torch.stack([s[name] for s in samples], 1 if per_layer else 0)
        else:
            out[name] = (torch.zeros(num_layers, 0, hidden_size, dtype=storage_dtype) if per_layer
                         else torch.zeros(0, dtype=torch.float32))
    return out


def decode_names(inputs: dict) -> list[str]:
    """The shard tensors of the stored decode pools and their weights."""
    kinds = [kind for kind in ("mean", "entropy") if kind in inputs["decode"]]
    return [f"decode_{kind}" for kind in kinds] + (["decode_entropy_sum", "decode_token_entropy"]
                                                   if "entropy" in kinds else [])
