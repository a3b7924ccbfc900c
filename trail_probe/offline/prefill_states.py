"""The last prompt token's hidden state of each prompt: what TRAIL's release feeds its decode probe
at prefill for a request's first distribution (`serve.initial=last_token`).

    states = last_prompt_states(cfg.model, records, layers=[19])   # {19: [n, d]}

The extraction stores each prompt's mean state and the decode steps j >= 1, not the prefill's last
row, so `trail-probe eval refine.prior=last_token` recomputes it here: one teacher-forced forward pass
of the serving model (transformers, `model.dtype`) over each prompt, tokenized as the extraction
tokenized it (`runtime.models.encode_prompt`: the chat template's user turn), reading the residual
stream after layer L at the last position through the extraction's own hooks
(`runtime.capture.LayerCapture`: pre-norm at the last layer too, where `hidden_states` is normed).
One prompt per pass, so there is no padding to get wrong; a few hundred prompts of SmolLM2 take
seconds on a CPU.
"""

from __future__ import annotations

import torch

from trail_probe.errors import UserError
from trail_probe.progress import progress_bar
from trail_probe.runtime.capture import LayerCapture
from trail_probe.runtime.models import encode_prompt, load_causal_lm


def last_prompt_states(model_cfg, records: list[dict], layers: list[int], progress_settings=None,
                       show_progress: bool = True) -> dict[int, torch.Tensor]:
    """{layer: [len(records), d] float32}: the last prompt token's state after each layer in `layers`,
    for extraction records (their `prompt` text and `prompt_tokens` count, which must match)."""
    model, tokenizer = load_causal_lm(model_cfg)
    device = next(model.parameters()).device
    out = {L: [] for L in layers}
    with LayerCapture(model, layers) as capture, torch.inference_mode(), \
            progress_bar(progress_settings, total=len(records), desc="last prompt states", unit="prompt",
                         disable=not show_progress) as bar:
        for record in records:
            ids = encode_prompt(tokenizer, record["prompt"])
            if len(ids) != record["prompt_tokens"] or record.get("truncated"):
                raise UserError(f"request {record['id']}: its prompt is {len(ids)} tokens here but "
                                f"{record['prompt_tokens']} in the extraction (another tokenizer, or a truncated "
                                "prompt); refine.prior=last_token needs the extraction's own model and prompts")
            model(input_ids=torch.tensor([ids], device=device))
            for L in layers:
                out[L].append(capture.take(L)[0, -1].float().cpu())
            bar.update(1)
    return {L: torch.stack(v) for L, v in out.items()}
