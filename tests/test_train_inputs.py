"""`trail-probe train` with the pooled probe inputs, the sampled-answer labels and the ranking loss (issue 27),
on tiny synthetic extractions."""

import json
from types import SimpleNamespace

import pytest
import torch
from conftest import PROBE_RECIPE, pooled_config, pooled_overrides

from trail_probe.cli import main
from trail_probe.errors import UserError
from trail_probe.offline.artifacts import load_probe
from trail_probe.offline.probe_losses import rank_loss, training_loss
from trail_probe.offline.split import load_or_make_split
from trail_probe.offline.store import Extraction
from trail_probe.runtime.accuracy import kendall_tau
from trail_probe.runtime.bins import Bins
from trail_probe.runtime.probe import LengthProbe
from trail_probe.stages.train import ProbeSpec, load_data, train

config, overrides = pooled_config, pooled_overrides


def test_every_input_trains_on_what_the_extraction_stored_and_is_recorded(pooled_dir, tmp_path):
    ext = Extraction(pooled_dir)
    for task, kind in (("prompt", "last"), ("prompt", "entropy"), ("decode", "mean"), ("decode", "current+entropy")):
        out = tmp_path / kind
        epochs = 40 if task == "prompt" else 6  # (the prompt task has one row per request: 87 here)
        (meta,) = train(config(pooled_dir, out, f"train.task={task}", f"train.{task}_input={kind}", f"train.epochs={epochs}"))
        assert meta["input"] == kind and meta["input_dim"] == 8 * len(kind.split("+"))
        probe, _ = load_probe(out / "probes" / task / "layer-1")
        assert probe.input_dim == meta["input_dim"]
        cfg = config(pooled_dir, out, f"train.task={task}")
        data = load_data(ext, ProbeSpec(task, (1,)), load_or_make_split(cfg, ext), Bins(), 16, 0, kind)
        source = (ext.prompt_states(1, kind) if task == "prompt" else ext.decode(1, kind).states)
        assert any(torch.equal(data.train.tensors[0][0], row) for row in source)  # the rows of that input
        tokens = data.val.tensors[2]
        assert meta["metrics"]["val/mae"] < 0.6 * float((tokens - tokens.median()).abs().mean()), kind
    hparams = torch.load(tmp_path / "mean" / "probes" / "decode" / "layer-1" / "last.ckpt", weights_only=False)
    assert hparams["hyper_parameters"]["probe_input"] == "mean"


def test_a_layer_search_and_a_stacked_sweep_read_the_chosen_input(pooled_dir, tmp_path):
    results = train(config(pooled_dir, tmp_path, "train.task=both", "train.layers=all", "train.stack_layers=2",
                           "train.decode_input=current+mean", "train.prompt_input=entropy", "train.epochs=2"))
    assert {(m["task"], m["input"], m["input_dim"]) for m in results} == {("prompt", "entropy", 8),
                                                                         ("decode", "current+mean", 16)}
    sweep = json.loads((tmp_path / "sweep" / "layer_sweep.json").read_text())
    assert sweep["best_layer"]["decode"] in (1, 2)
    (searched,) = {m["input"] for m in train(config(pooled_dir, tmp_path / "search", "train.layers=search",
                                                    "train.search_points=2", "train.search_radius=1",
                                                    "train.decode_input=entropy", "train.epochs=2"))}
    assert searched == "entropy"


def test_an_old_extraction_reads_as_before_and_refuses_new_inputs_in_one_line(old_dir, tmp_path, capsys):
    (meta,) = train(config(old_dir, tmp_path / "old", "train.epochs=1"))
    assert meta["input"] == "current"
    for extra, what in ((["train.decode_input=current+mean"], "not 'mean'; extract again"),
                        (["train.task=prompt", "train.prompt_input=last"], "not 'last'; extract again"),
                        (["train.task=prompt", "train.prompt_input=mean", "train.prompt_labels=median"], "no sampled answers")):
        code = main(["train", PROBE_RECIPE, *overrides(old_dir, tmp_path / "x", *extra)])
        errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("trail-probe")]
        assert code == 2 and len(errors) == 1 and what in errors[0], errors
    assert not (tmp_path / "x" / "probes").exists()  # refused before any training


def test_a_checkpoint_of_another_input_is_not_resumed(pooled_dir, tmp_path):
    train(config(pooled_dir, tmp_path, "train.epochs=1", "train.decode_input=mean"))
    with pytest.raises(UserError, match="probe_input='mean' but the config gives None"):
        train(config(pooled_dir, tmp_path, "train.epochs=1"), resume=True)


def test_median_and_soft_labels_train_the_prompt_probe_and_the_held_out_side_stays_greedy(pooled_dir, tmp_path):
    ext = Extraction(pooled_dir)
    cfg = config(pooled_dir, tmp_path, "train.task=prompt")
    split, bins = load_or_make_split(cfg, ext), Bins()
    sampled = ext.sampled_lengths()
    train_rows = [i for i, rid in enumerate(ext.ids) if rid in set(split["train_ids"])]
    val_rows = [i for i, rid in enumerate(ext.ids) if rid in set(split["val_ids"])]
    median = load_data(ext, ProbeSpec("prompt", (1,)), split, bins, 16, 0, None, "median")
    expected = sampled[train_rows].double().median(1).values  # 3 samples: the middle one
    assert torch.equal(median.train.tensors[1], bins.label(expected))
    soft = load_data(ext, ProbeSpec("prompt", (1,)), split, bins, 16, 0, None, "soft")
    hist = soft.train.tensors[1]
    assert hist.shape == (len(train_rows), 10) and torch.allclose(hist.sum(1), torch.ones(len(train_rows)))
    assert torch.allclose(hist[0], torch.bincount(bins.label(sampled[train_rows[0]]), minlength=10).float() / 3)
    for data in (median, soft):  # what chooses the epoch: the greedy answers
        assert torch.equal(data.val.tensors[2], ext.output_tokens[val_rows].float())
    for labels in ("median", "soft"):
        (meta,) = train(config(pooled_dir, tmp_path / labels, "train.task=prompt", f"train.prompt_labels={labels}",
                               "train.loss=rank", "train.epochs=3"))
        assert meta["labels"] == labels and meta["loss"] == "rank" and meta["metrics"]["val/mae"] < 200


def test_the_ranking_loss_orders_what_cross_entropy_cannot():
    """Every length falls in the first bin, so cross-entropy learns one distribution for all and says
    nothing about their order; the ranking loss on the expected lengths orders them."""
    g = torch.Generator().manual_seed(0)
    bins, lengths = Bins(10, 512), torch.randint(0, 51, (96,), generator=g).float()
    direction = torch.randn(8, generator=g)
    x = lengths[:, None] / 51 * direction + 0.05 * torch.randn(96, 8, generator=g)
    labels = bins.label(lengths)
    taus = {}
    for loss in ("ce", "rank"):
        torch.manual_seed(0)
        probe = LengthProbe(8, 32, 10)
        hp = SimpleNamespace(loss=loss, label_smoothing=0.0, rank_weight=1.0)
        opt = torch.optim.Adam(probe.parameters(), lr=0.01)
        for _ in range(300):
            opt.zero_grad()
            training_loss(probe(x), labels, lengths, hp, torch.ones(10), bins).backward()
            opt.step()
        with torch.no_grad():
            taus[loss] = kendall_tau(bins.expectation(probe(x).softmax(-1)), lengths)
    assert taus["rank"] > 0.8 and taus["ce"] < 0.5, taus
    # ties carry no order; a stack's loss is each probe's own
    same = torch.zeros(4, 10)
    assert float(rank_loss(same, torch.full((4,), 7.0), bins)) == 0.0
    logits = torch.randn(6, 10, generator=g)
    stacked = rank_loss(torch.stack([logits, logits.flip(0)], 1), lengths[:6], bins)
    assert stacked.shape == (2,) and float(stacked[0]) == pytest.approx(float(rank_loss(logits, lengths[:6], bins)))

