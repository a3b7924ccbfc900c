"""The request split: deterministic per id, disjoint, saved once and reused, refused when stale."""

import json
import random

import pytest

from trail_probe.config import load_recipe
from trail_probe.errors import UserError
from trail_probe.offline.split import load_or_make_split, make_split
from trail_probe.offline.store import Extraction
from trail_probe.offline.synthetic import SYNTHETIC_MODEL, make_synthetic_extraction

IDS = [f"req-{i}" for i in range(1000)]


def test_split_is_disjoint_complete_and_near_the_fraction():
    train, val = make_split(IDS, 0.75, seed=0)
    assert not set(train) & set(val)
    assert sorted(train + val) == sorted(IDS)
    assert 0.70 < len(train) / len(IDS) < 0.80


def test_an_id_keeps_its_side_when_the_list_is_reordered_or_grows():
    train, _ = make_split(IDS, 0.75, seed=0)
    shuffled = IDS[:500] + [f"new-{i}" for i in range(300)]
    random.Random(1).shuffle(shuffled)
    train2, _ = make_split(shuffled, 0.75, seed=0)
    assert set(train2) & set(IDS) == set(train) & set(IDS[:500])


def test_the_seed_changes_the_split():
    assert make_split(IDS, 0.75, seed=0) != make_split(IDS, 0.75, seed=1)


@pytest.mark.parametrize("fraction", [0.0, 1.0, 1.5])
def test_fraction_outside_zero_one_is_refused(fraction):
    with pytest.raises(UserError, match="train_fraction"):
        make_split(IDS, fraction, seed=0)


def test_an_empty_side_is_refused():
    with pytest.raises(UserError, match="no requests"):
        make_split(IDS[:3], 0.001, seed=0)


@pytest.fixture()
def extraction(tmp_path):
    return Extraction(make_synthetic_extraction(tmp_path / "ext", num_requests=40, hidden_size=4, num_layers=3))


def _cfg(tmp_path, *overrides):
    return load_recipe(None, [f"train.out_dir={tmp_path / 'ck'}", f"model.name_or_path={SYNTHETIC_MODEL}", *overrides])


def test_split_json_is_written_then_reused(tmp_path, extraction):
    cfg = _cfg(tmp_path)
    split = load_or_make_split(cfg, extraction)
    on_disk = json.loads(cfg.paths.split.read_text())
    assert on_disk == split
    assert set(split) == {"seed", "train_fraction", "extraction_manifest_sha256", "train_ids", "val_ids"}
    assert sorted(split["train_ids"] + split["val_ids"]) == sorted(extraction.ids)
    # A hand-edited split.json is what the next run uses: proof that it is read, not remade.
    on_disk["val_ids"], on_disk["train_ids"] = on_disk["val_ids"][:1], on_disk["train_ids"] + on_disk["val_ids"][1:]
    cfg.paths.split.write_text(json.dumps(on_disk))
    assert load_or_make_split(cfg, extraction)["val_ids"] == on_disk["val_ids"]


def test_split_from_another_extraction_is_refused(tmp_path, extraction):
    cfg = _cfg(tmp_path)
    load_or_make_split(cfg, extraction)
    other = Extraction(make_synthetic_extraction(tmp_path / "other", num_requests=40, hidden_size=4, num_layers=3, seed=1))
    with pytest.raises(UserError, match="another extraction"):
        load_or_make_split(cfg, other)


@pytest.mark.parametrize("override", ["train.split_seed=3", "train.train_fraction=0.5"])
def test_split_with_other_seed_or_fraction_is_refused(tmp_path, extraction, override):
    load_or_make_split(_cfg(tmp_path), extraction)
    with pytest.raises(UserError, match="was made with train_fraction"):
        load_or_make_split(_cfg(tmp_path, override), extraction)
