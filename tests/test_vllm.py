"""vLLM as a serving engine: the model folder it loads, and the engine itself on the embedded SmolLM2
(slow: a vLLM engine takes about 30 s to start on 2 cores)."""

from __future__ import annotations

import json

import pytest
import torch

from trail_probe.config import load_recipe
from trail_probe.runtime.models import (
    PLAIN_SOURCE_FILE,
    encode_prompt,
    file_sha256,
    plain_hf_folder,
    resolve_model_path,
)


def test_a_plain_folder_or_hub_id_is_used_as_it_is(tiny_llama, tmp_path):
    cfg = load_recipe(None, [f"model.name_or_path={tiny_llama}"])
    assert plain_hf_folder(cfg.model, tmp_path / "cache") == tiny_llama
    assert not (tmp_path / "cache").exists()


@pytest.mark.slow
def test_gguf_is_dequantized_once_into_a_plain_folder_that_gives_the_same_logits(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cfg = load_recipe("recipes/smollm2_alpaca.yaml")
    folder = plain_hf_folder(cfg.model, tmp_path)
    where, gguf = resolve_model_path(cfg.model.name_or_path)
    record = json.loads((folder / PLAIN_SOURCE_FILE).read_text())
    assert record["gguf_sha256"] == file_sha256(f"{where}/{gguf}") and folder.name.endswith(record["gguf_sha256"][:16])
    assert (folder / "model.safetensors").is_file() and "quantization_config" not in json.loads((folder / "config.json").read_text())
    stamp = (folder / "model.safetensors").stat().st_mtime_ns
    assert plain_hf_folder(cfg.model, tmp_path) == folder and (folder / "model.safetensors").stat().st_mtime_ns == stamp

    tokenizer = AutoTokenizer.from_pretrained(folder)
    ids = torch.tensor([encode_prompt(tokenizer, "Give three tips for staying healthy.")])
    plain = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    original = AutoModelForCausalLM.from_pretrained(where, gguf_file=gguf, dtype=torch.float32).eval()
    with torch.no_grad():
        assert torch.equal(plain(ids).logits, original(ids).logits)
