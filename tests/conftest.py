"""Shared fixtures: tiny random decoder models built from configs (no download), prompt files."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

os.environ.setdefault("TRAIL_PROBE_QUIET", "1")
os.environ.setdefault("WANDB_MODE", "offline")
torch.set_num_threads(min(2, torch.get_num_threads()))

REPO = Path(__file__).resolve().parents[1]
SHARED_PROMPTS = REPO.parent / "shared" / "data" / "alpaca_prompts.jsonl"

CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<eos>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def _byte_tokenizer(chat: bool):
    """A byte-level tokenizer built in memory: 256 byte tokens + specials."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    for special in ("<eos>", "<|user|>", "<|assistant|>"):
        vocab[special] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(["<eos>", "<|user|>", "<|assistant|>"])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<eos>")
    if chat:
        fast.chat_template = CHAT_TEMPLATE
    return fast


def build_tiny_model(folder: Path, arch: str = "llama", seed: int = 0, eos_bias: float = 4.0,
                     hidden: int = 64, heads: int = 4, kv_heads: int = 2) -> Path:
    """Save a tiny random causal LM + tokenizer to `folder`. `eos_bias` makes EOS likely enough
    that greedy answers end at varied lengths instead of all running to the cap. (vLLM's CPU
    attention needs a head size of 32 or more: hidden=128, heads=2 there.)"""
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    tokenizer = _byte_tokenizer(chat=arch == "llama")
    vocab, eos = len(tokenizer), tokenizer.eos_token_id
    if arch == "llama":
        config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=3,
                             num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=512,
                             eos_token_id=eos, bos_token_id=eos, pad_token_id=eos, tie_word_embeddings=False)
        model = LlamaForCausalLM(config)
    else:
        config = GPT2Config(vocab_size=vocab, n_embd=64, n_layer=3, n_head=4, n_positions=512,
                            eos_token_id=eos, bos_token_id=eos, pad_token_id=eos, tie_word_embeddings=False)
        model = GPT2LMHeadModel(config)
    with torch.no_grad():
        head = model.get_output_embeddings().weight
        head[eos] = torch.randn(head.shape[1]) * eos_bias / head.shape[1] ** 0.5
    model.generation_config.eos_token_id = eos
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny-llama"), "llama")


@pytest.fixture(scope="session")
def vllm_llama(tmp_path_factory) -> Path:
    """A tiny Llama vLLM's CPU attention takes (head size 64), EOS likely enough for varied answers."""
    return build_tiny_model(tmp_path_factory.mktemp("vllm-llama"), hidden=128, heads=2, kv_heads=1, eos_bias=0.85)


@pytest.fixture(scope="session")
def tiny_gpt2(tmp_path_factory) -> Path:
    # random GPT-2s end every prompt at the same length, so no EOS bias: answers run to the cap
    return build_tiny_model(tmp_path_factory.mktemp("tiny-gpt2"), "gpt2", eos_bias=0.0)


BERT_WORDS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "synthetic", "prompt"] + [str(d) for d in range(10)] + \
    [f"##{d}" for d in range(10)]


def make_tiny_bert_encoder(folder: Path) -> Path:
    """A 2-layer, 32-wide BERT encoder (no classification head, like MiniLM) and its WordPiece
    tokenizer over a 27-word vocabulary, saved as a local model folder."""
    from transformers import BertConfig, BertModel, BertTokenizerFast

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.txt").write_text("\n".join(BERT_WORDS) + "\n")
    BertTokenizerFast(vocab_file=str(folder / "vocab.txt")).save_pretrained(folder)
    torch.manual_seed(0)
    config = BertConfig(vocab_size=len(BERT_WORDS), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=64)
    BertModel(config).save_pretrained(folder)
    return folder


def write_prompts(path: Path, n: int = 10, rows: list | None = None) -> Path:
    rows = rows if rows is not None else [
        {"id": f"p{i}", "prompt": f"Tell me fact number {i} about {'cats' if i % 2 else 'the sea'}."} for i in range(n)
    ]
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


@pytest.fixture
def prompts_file(tmp_path) -> Path:
    return write_prompts(tmp_path / "prompts.jsonl")


# ------------------------------------------------------------------------------------------
# Predictor directories as TRAIL's runtime loads them, written from scratch
# ------------------------------------------------------------------------------------------
D, HIDDEN, K, MAX_LEN = 12, 16, 10, 512


def trail_weights(d=D, hidden=HIDDEN, k=K, seed=0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"fc1.weight": torch.randn(hidden, d, generator=g), "fc1.bias": torch.randn(hidden, generator=g),
            "fc2.weight": torch.randn(k, hidden, generator=g), "fc2.bias": torch.randn(k, generator=g)}


def write_trail_dir(folder, weights, weights_file="model.safetensors", sequential=False, **config_changes):
    """A predictor directory laid out as TRAIL_NOTES section 5 describes, written from scratch."""
    folder.mkdir(parents=True, exist_ok=True)
    config = {"hidden_size": D, "hidden_dim": HIDDEN, "num_labels": K, "max_len": MAX_LEN,
              "probe_layer_idx": 3, "dtype": "float32", "device": "cuda"}
    config.update(config_changes)
    (folder / "config.json").write_text(json.dumps(config))
    if sequential:
        weights = {k.replace("fc1.", "0.").replace("fc2.", "2."): v for k, v in weights.items()}
    if weights_file == "model.safetensors":
        save_file(weights, str(folder / weights_file))
    else:
        torch.save(weights, folder / weights_file)
    return folder


PREDICTOR_WORDS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "write", "a", "poem", "about", "the", "sea", "list", "three"]


def make_tiny_bert_predictor(folder, num_labels=K, max_len=MAX_LEN, with_tokenizer=True):
    """A trained-baseline-like BERT directory (classification head, max_len, baseline.json), random weights."""
    from transformers import BertConfig, BertForSequenceClassification, BertTokenizer

    torch.manual_seed(0)
    config = BertConfig(vocab_size=len(PREDICTOR_WORDS), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=64, num_labels=num_labels)
    config.max_len = max_len
    config.bin_edges = torch.linspace(0, max_len, num_labels + 1).tolist()
    BertForSequenceClassification(config).save_pretrained(folder)
    tokenizer = BertTokenizer(vocab={w: i for i, w in enumerate(PREDICTOR_WORDS)})
    if with_tokenizer:
        tokenizer.save_pretrained(folder)
    (folder / "baseline.json").write_text(json.dumps({"max_length": 32, "metrics": {"val/mae": 46.1}}))
    return tokenizer


# ------------------------------------------------------------------------------------------
# Synthetic extractions with the pooled probe inputs (issue 27), and recipes over them
# ------------------------------------------------------------------------------------------
PROBE_RECIPE = str(REPO / "recipes" / "smollm2_alpaca_hf.yaml")


@pytest.fixture(scope="module")
def pooled_dir(tmp_path_factory):
    """Layers 1 and 2 carry the length in every stored input; 3 sampled answers per prompt."""
    from trail_probe.offline.synthetic import make_synthetic_extraction

    return make_synthetic_extraction(tmp_path_factory.mktemp("pooled") / "ext", num_requests=120, hidden_size=8,
                                     num_layers=3, informative=(1, 2), noise=0.05, pooled=True, num_samples=3)


@pytest.fixture(scope="module")
def old_dir(tmp_path_factory):
    """An extraction as made before the pooled inputs: TRAIL's mean and current states only, no samples."""
    from trail_probe.offline.synthetic import make_synthetic_extraction

    return make_synthetic_extraction(tmp_path_factory.mktemp("old") / "ext", num_requests=60, hidden_size=8, num_layers=3)


def pooled_overrides(ext, out, *extra) -> list[str]:
    """A small, quick decode probe on layer 1 of a synthetic extraction, into `out`."""
    from trail_probe.offline.synthetic import SYNTHETIC_MODEL

    return [f"model.name_or_path={SYNTHETIC_MODEL}", f"extract.out_dir={ext}", f"train.out_dir={out}",
            "train.hidden_dim=32", "train.epochs=4", "train.num_threads=1", "train.task=decode", "train.layers=1",
            "train.multi_layer=none", *extra]


def pooled_config(ext, out, *extra):
    from trail_probe.config import load_recipe

    return load_recipe(PROBE_RECIPE, pooled_overrides(ext, out, *extra))
