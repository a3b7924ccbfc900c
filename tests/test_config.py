"""Recipes load and validate; overrides are typed; mistakes give one-line errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from trail_probe.config import load_recipe, resolve_layers
from trail_probe.errors import UserError

RECIPES = sorted((Path(__file__).resolve().parents[1] / "recipes").glob("*.yaml"))


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.name)
def test_every_shipped_recipe_loads_and_validates(recipe):
    cfg = load_recipe(recipe)
    assert cfg.run_name and cfg.generation.max_new_tokens == 512
    assert cfg.bins.num_bins == 10 and cfg.bins.max_len == 512
    assert cfg.train.epochs == 30 and cfg.train.batch_size == 32
    if "\nbase:" not in recipe.read_text():  # the paper's recipe; a recipe on a base says what it changes
        assert cfg.train.lr == 0.01 and cfg.train.validation_fraction == 0.0
    assert cfg.train.train_fraction == 0.75
    num_layers = 30 if "smollm2" in recipe.name else 32
    for spec in (cfg.extract.prompt_layers, cfg.extract.decode_layers, *([] if cfg.train.layer_search else [cfg.train.layers])):
        assert resolve_layers(spec, num_layers)
    # the recipe's first line comment shows how to run it
    assert recipe.read_text().startswith("#") and "trail-probe" in recipe.read_text().split("\n\n")[0]


def test_recipes_cover_the_embedded_and_the_paper_setup():
    names = {p.name for p in RECIPES}
    assert {"smollm2_alpaca.yaml", "smollm2_alpaca_hf.yaml", "llama3_8b_alpaca.yaml"} <= names
    paper = load_recipe(Path(RECIPES[0]).parent / "llama3_8b_alpaca.yaml")
    assert paper.model.name_or_path == "meta-llama/Meta-Llama-3-8B-Instruct"
    assert paper.model.dtype == "bfloat16" and paper.model.device == "cuda"
    assert paper.prompts.source == "tatsu-lab/alpaca"


def test_overrides_are_parsed_and_typed():
    cfg = load_recipe(None, ["train.epochs=5", "train.lr=1e-3", "extract.decode_layers=[3, 4]",
                             "prompts.num_prompts=null", "train.loggers=[csv, tensorboard]"])
    assert cfg.train.epochs == 5 and cfg.train.lr == 1e-3
    assert cfg.extract.decode_layers == [3, 4] and cfg.prompts.num_prompts is None
    assert cfg.train.loggers == ["csv", "tensorboard"]


@pytest.mark.parametrize("override, match", [
    ("train.epoch=5", "unknown config key 'train.epoch'"),
    ("train.epochs=five", "'train.epochs' = 'five' is not a int"),
    ("nosuchsection.x=1", "unknown config key 'nosuchsection'"),
    ("train.epochs", "not of the form key=value"),
])
def test_bad_overrides_are_refused(override, match):
    with pytest.raises(UserError, match=match):
        load_recipe(None, [override])


@pytest.mark.parametrize("spec, expected", [("all", [0, 1, 2, 3]), ("1-2", [1, 2]), ("3,1", [1, 3]),
                                            (2, [2]), ([0, 3], [0, 3])])
def test_layer_specs(spec, expected):
    assert resolve_layers(spec, 4) == expected


@pytest.mark.parametrize("spec", ["4", "-1", "x", "2-9", []])
def test_bad_layer_specs(spec):
    with pytest.raises(UserError):
        resolve_layers(spec, 4)


def test_a_recipe_on_a_base_changes_only_its_own_keys(tmp_path):
    (tmp_path / "base.yaml").write_text("run_name: a\ntrain:\n  lr: 0.01\n  epochs: 7\nbins:\n  num_bins: 12\n")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "child.yaml").write_text("base: ../base.yaml\nrun_name: b\ntrain:\n  lr: 0.001\n")
    cfg = load_recipe(tmp_path / "sub" / "child.yaml", ["train.epochs=3"])
    assert (cfg.run_name, cfg.train.lr, cfg.train.epochs, cfg.bins.num_bins) == ("b", 0.001, 3, 12)
    assert load_recipe(tmp_path / "base.yaml").train.epochs == 7
    (tmp_path / "base.yaml").write_text("base: sub/child.yaml\n")
    with pytest.raises(UserError, match="leads back to itself"):
        load_recipe(tmp_path / "sub" / "child.yaml")
    (tmp_path / "sub" / "child.yaml").write_text("base: nowhere.yaml\n")
    with pytest.raises(UserError, match="nowhere.yaml' not found"):
        load_recipe(tmp_path / "sub" / "child.yaml")


def test_the_default_is_the_fast_path_and_the_fallback_the_transformers_one():
    """The names say which is the default; each keeps the run folder its committed report and predictor live in."""
    root = Path(RECIPES[0]).parent
    fast, hf = load_recipe(root / "smollm2_alpaca.yaml"), load_recipe(root / "smollm2_alpaca_hf.yaml")
    assert (fast.extract.engine, fast.model.dtype, fast.train.layer_search, fast.train.stack_layers) == \
        ("vllm", "bfloat16", True, 5)
    assert fast.baseline.group_by_length and fast.baseline.precision == "bf16-mixed"
    assert (hf.extract.engine, hf.model.dtype, hf.train.layers, hf.train.stack_layers) == ("hf", "float32", "all", 0)
    assert not hf.baseline.group_by_length and hf.baseline.precision == "32-true"
    assert fast.prompts == hf.prompts and (fast.train.lr, fast.train.epochs) == (hf.train.lr, hf.train.epochs)
    repo = root.parent
    assert (repo / "reports" / fast.run_name / "report.md").is_file() and fast.run_name == "smollm2_alpaca_vllm"
    assert (repo / "reports" / hf.run_name / "report.md").is_file() and (hf.paths.predictor / "config.json").is_file()


def test_tuned_recipe_is_the_paper_recipe_plus_the_validation_choices():
    root = Path(RECIPES[0]).parent
    paper, tuned = load_recipe(root / "smollm2_alpaca_hf.yaml"), load_recipe(root / "smollm2_alpaca_tuned.yaml")
    assert tuned.paths.data == paper.paths.data and tuned.paths.checkpoints != paper.paths.checkpoints
    assert tuned.train.validation_fraction > 0 and tuned.train.standardize
    assert (tuned.train.epochs, tuned.train.batch_size, tuned.bins, tuned.generation) == \
        (paper.train.epochs, paper.train.batch_size, paper.bins, paper.generation)


def test_missing_recipe_file():
    with pytest.raises(UserError, match="not found"):
        load_recipe("recipes/nope.yaml")


def test_overrides_may_follow_a_commands_options(tmp_path, capsys):
    from trail_probe.cli import main

    missing = tmp_path / "nowhere"
    assert main(["extract", "recipes/smollm2_alpaca.yaml", "--verify", f"extract.out_dir={missing}"]) == 2
    assert str(missing) in capsys.readouterr().err  # the override reached the config, not argparse
    with pytest.raises(SystemExit):
        main(["extract", "recipes/smollm2_alpaca.yaml", "--verify", "not-an-override"])
    assert "unrecognized arguments: not-an-override" in capsys.readouterr().err


def test_an_extraction_stores_what_its_probes_read_and_a_renamed_key_names_its_successor():
    from trail_probe.offline.store import OLD_INPUTS, stored_inputs

    cfg = load_recipe(None, ["train.prompt_input=last", "train.decode_input=current+entropy"])
    assert cfg.extract.inputs == "trained"
    assert stored_inputs(cfg.extract.inputs, cfg.extract.entropy, cfg.train.prompt_input, cfg.train.decode_input) == \
        {"prompt": ["mean", "last"], "decode": ["current", "entropy"]}
    assert stored_inputs("trained") == stored_inputs("trail") == OLD_INPUTS  # TRAIL's own probes: TRAIL's two
    assert stored_inputs("all", entropy=False) == {"prompt": ["mean", "last"], "decode": ["current", "mean"]}
    with pytest.raises(UserError, match="extract.inputs = 'some' is not one of trained, all, trail"):
        stored_inputs("some")
    with pytest.raises(UserError, match="'extract.pooled_inputs' is now 'extract.inputs' .*false is extract.inputs=trail"):
        load_recipe(None, ["extract.pooled_inputs=false"])


def test_every_serve_setting_the_scheduler_shares_reaches_it():
    """A `serve.*` recipe field named like a TrailSettings field is passed to the scheduler
    (`serving_setup.trail_settings`): set each to another valid value and read it back."""
    import dataclasses

    from trail_probe.config import ServeConfig
    from trail_probe.offline.serving_setup import trail_settings
    from trail_probe.serving.trail_settings import TrailSettings

    other = {"initial": "none", "max_prefill_tokens": 300, "max_running": 33, "max_throughput_loss": 0.02,
             "prefill_order": "arrival", "prefills_alone": False, "refine_when": "always",
             "predictor": "checkpoints/smollm2_alpaca_vllm/predictor", "prompt_predictor": "elsewhere/prompt", "bert": None}
    shared = {f.name for f in dataclasses.fields(ServeConfig)} & {f.name for f in dataclasses.fields(TrailSettings)}
    assert shared <= set(other), f"give the new shared field {sorted(shared - set(other))} a value here"
    # the scheduler's other settings come from refine: (aging ... refine_interval), are derived (client_estimates
    # from initial, extraction_check from serve.vllm_extraction_check) or are set per engine run, never by a recipe
    elsewhere = {"aging", "cadence", "likelihood", "preemption_c", "refine_interval", "client_estimates", "extraction_check",
                 "policy", "record", "record_states", "stats_interval_s"}
    assert {f.name for f in dataclasses.fields(TrailSettings)} - shared == elsewhere, "a new scheduler setting: add serve.<it>"
    overrides = [f"serve.{k}={v}" for k, v in other.items() if v is not None]
    got = trail_settings(load_recipe("recipes/smollm2_alpaca.yaml", overrides))
    for name, value in other.items():
        if value is not None and name != "predictor":  # the predictor path is resolved against the recipe's folders
            assert getattr(got, name) == value, name
