"""The serving model: loading it, its decoder layers, its chat prompt and EOS tokens (any HF decoder-only model).

`name_or_path` may be a hub id, a local folder, a `.gguf` file, or `pkg://<package>/<file>`; where
its files are, their hashes and a GGUF's plain copy are `trail_probe.model_files`.
"""

from __future__ import annotations

import torch
from torch import nn

from trail_probe.errors import UserError
from trail_probe.model_files import resolve_model_path

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def dtype_of(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise UserError(f"dtype '{name}' is not one of {', '.join(DTYPES)}")
    return DTYPES[name]


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"device '{device}' asked for but no CUDA GPU is visible; set model.device=cpu")
    return torch.device(device)


def load_causal_lm(cfg) -> tuple[nn.Module, object]:
    """(model in eval mode on its device, tokenizer) for a `ModelConfig`."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    where, gguf = resolve_model_path(cfg.name_or_path)
    kwargs = {"gguf_file": gguf} if gguf else {}
    kwargs["trust_remote_code"] = cfg.trust_remote_code
    try:
        config = AutoConfig.from_pretrained(where, **kwargs)
    except (OSError, ValueError) as e:
        raise UserError(
            f"cannot find model '{cfg.name_or_path}' ({str(e).splitlines()[0][:120]}); "
            "give a hub id, a local folder or a .gguf file"
        ) from None
    if getattr(config, "is_encoder_decoder", False):
        raise UserError(f"model '{cfg.name_or_path}' is an encoder-decoder; trail-probe needs a decoder-only causal LM")
    try:
        tokenizer = AutoTokenizer.from_pretrained(where, **kwargs)
        model = AutoModelForCausalLM.from_pretrained(where, dtype=dtype_of(cfg.dtype), **kwargs)
    except ValueError as e:  # AutoModelForCausalLM raises ValueError for unsupported configs
        raise UserError(f"model '{cfg.name_or_path}' is not a causal LM ({str(e).splitlines()[0][:120]}); pick a decoder-only model") from None
    model.to(resolve_device(cfg.device)).eval()
    return model, tokenizer


def encode_prompt(tokenizer, text: str) -> list[int]:
    """Token ids of `text` as the user turn of the model's chat template (plain text if it has none)."""
    if getattr(tokenizer, "chat_template", None):
        rendered = tokenizer.apply_chat_template(
            [{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True
        )
        return tokenizer(rendered, add_special_tokens=False)["input_ids"]
    return tokenizer(text)["input_ids"]


def eos_token_ids(model, tokenizer) -> set[int]:
    """The tokens that end an answer: the generation config's EOS ids and the tokenizer's. `model` is
    a model or its `GenerationConfig` (an engine that loads the weights itself)."""
    ids = getattr(getattr(model, "generation_config", model), "eos_token_id", None)
    ids = ids if isinstance(ids, list) else [ids]
    ids = {i for i in ids if i is not None}
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    if not ids:
        raise UserError("the model defines no EOS token, so answer lengths are undefined; use an instruct model")
    return ids


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The model's list of decoder blocks (Llama/Mistral/Qwen: model.layers; GPT-2: transformer.h)."""
    base = model.get_decoder() if hasattr(model, "get_decoder") else model
    for attr in ("layers", "h", "blocks"):
        layers = getattr(base, attr, None)
        if isinstance(layers, nn.ModuleList):
            return layers
    for attr in ("model", "transformer"):
        inner = getattr(model, attr, None)
        for name in ("layers", "h"):
            layers = getattr(inner, name, None) if inner is not None else None
            if isinstance(layers, nn.ModuleList):
                return layers
    raise UserError(f"cannot find the decoder layers of {type(model).__name__}; it is not a supported decoder-only model")
