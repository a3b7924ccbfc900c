"""Prompt sources, and the prompt set the default recipe reads: the same 2,000 prompts from the shared
file where it exists, else from the hub (a fake `datasets.load_dataset` here; never the network)."""

from __future__ import annotations

import json
import random

import pytest

from conftest import REPO, SHARED_PROMPTS
from trail_probe.config import load_recipe
from trail_probe.errors import UserError
from trail_probe.offline.prompts import load_prompts, prompt_id, read_prompt_set

PROMPT_SET = REPO / "recipes" / "alpaca_2000.ids"
needs_shared = pytest.mark.skipif(not SHARED_PROMPTS.is_file(), reason="the shared Alpaca prompts are not here")


def fake_hub(monkeypatch, rows=None, error=None):
    """`datasets.load_dataset` answering with `rows` (or raising `error`); returns the calls it got."""
    import datasets

    calls = []

    def load_dataset(name, split=None):
        calls.append((name, split))
        if error:
            raise error
        return rows

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    return calls


def as_hub_rows(prompts):
    """Alpaca rows (instruction, input, output) that make these prompt texts."""
    rows = []
    for text in prompts:
        instruction, _, extra = text.partition("\n\n")
        rows.append({"instruction": instruction, "input": extra, "output": "..."})
    return rows


def test_the_default_recipes_read_the_prompt_set():
    assert load_recipe(REPO / "recipes" / "smollm2_alpaca.yaml").prompts.source == "recipes/alpaca_2000.ids"
    ids, sources = read_prompt_set(PROMPT_SET)
    assert sources == ["../shared/data/alpaca_prompts.jsonl", "tatsu-lab/alpaca"]
    assert len(ids) == 2000 and all(i.startswith("alpaca-") and len(i) == 19 for i in ids)


@needs_shared
def test_the_id_rule_and_the_committed_ids_match_the_shared_file(monkeypatch, capsys):
    rows = [json.loads(line) for line in SHARED_PROMPTS.read_text().splitlines()]
    assert all(row["id"] == prompt_id(row["prompt"]) for row in rows)  # the rule the hub path relies on
    assert read_prompt_set(PROMPT_SET)[0] == [row["id"] for row in rows]
    monkeypatch.chdir(REPO)
    calls = fake_hub(monkeypatch, error=AssertionError("the hub must not be asked"))
    prompts, _ = load_prompts("recipes/alpaca_2000.ids")
    assert prompts == load_prompts(str(SHARED_PROMPTS))[0] and not calls
    assert "from the local file '../shared/data/alpaca_prompts.jsonl'" in capsys.readouterr().out


@needs_shared
def test_without_the_shared_file_the_same_prompts_come_from_the_hub(monkeypatch, tmp_path, capsys):
    shared = load_prompts(str(SHARED_PROMPTS))[0]
    rows = as_hub_rows([p.text for p in shared]) + as_hub_rows(["Name a bird.", "Add these.\n\n2 + 3"])
    rows += rows[:5] + [{"instruction": "", "input": ""}]  # Alpaca's duplicates, and a row that makes no prompt
    random.Random(0).shuffle(rows)
    calls = fake_hub(monkeypatch, rows)
    monkeypatch.chdir(tmp_path)  # no ../shared/data/alpaca_prompts.jsonl from here
    prompts, skipped = load_prompts(str(PROMPT_SET), split="train")
    assert prompts == shared and skipped == 0 and calls == [("tatsu-lab/alpaca", "train")]
    line = capsys.readouterr().out.strip()
    assert line == (f"prompts: 2000 of the prompt set '{PROMPT_SET}' from the hub dataset (train split) 'tatsu-lab/alpaca' "
                    "('../shared/data/alpaca_prompts.jsonl': not found)")


def write_set(path, ids, *sources):
    path.write_text("# a test set\n" + "".join(f"source: {s}\n" for s in sources) + "\n".join(ids) + "\n")
    return path


def test_a_prompt_set_takes_its_ids_in_its_order_and_says_what_is_missing(monkeypatch, tmp_path):
    texts = ["Say hi.", "Sum these.\n\n1 2", "Name a colour."]
    ids = [prompt_id(t) for t in texts]
    fake_hub(monkeypatch, as_hub_rows(texts))
    chosen = write_set(tmp_path / "set.ids", [ids[2], ids[0]], tmp_path / "none.jsonl", "some/alpaca")
    assert [p.text for p in load_prompts(str(chosen))[0]] == [texts[2], texts[0]]
    lacking = write_set(tmp_path / "more.ids", [ids[1], "alpaca-000000000000"], "some/alpaca")
    with pytest.raises(UserError, match=r"'some/alpaca' lacks 1 of the 2 prompts .*\(first: alpaca-000000000000\)"):
        load_prompts(str(lacking))
    local = tmp_path / "local.jsonl"  # a local file that exists is used, and must hold every id
    local.write_text(json.dumps({"id": ids[0], "prompt": texts[0]}) + "\n")
    with pytest.raises(UserError, match="local.jsonl' lacks 1 of the 2 prompts.*move it away"):
        load_prompts(str(write_set(tmp_path / "l.ids", ids[:2], local, "some/alpaca")))


def test_no_reachable_source_is_one_line_that_says_what_to_do(monkeypatch, tmp_path):
    fake_hub(monkeypatch, error=ConnectionError("offline"))
    path = write_set(tmp_path / "set.ids", ["alpaca-0123456789ab"], tmp_path / "gone.jsonl", "tatsu-lab/alpaca")
    with pytest.raises(UserError) as e:
        load_prompts(str(path))
    message = str(e.value)
    assert "\n" not in message and "gone.jsonl': not found" in message and "'tatsu-lab/alpaca': ConnectionError" in message
    assert "hub access" in message and "prompts.source" in message
    (tmp_path / "empty.ids").write_text("# nothing\nalpaca-0123456789ab\n")
    with pytest.raises(UserError, match="needs 'source: ...' lines"):
        load_prompts(str(tmp_path / "empty.ids"))
