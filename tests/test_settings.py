"""Settings as data: every model option is defined once (configuration_nanoebm.OPTIONS) and becomes a config field and
a flag; the layers merge in one order (defaults < preset < recipe < continued or resumed < command line); the run
record keeps each value with where it came from, and a resume repeats it."""

import json
import shutil

import pytest

import run_generate
import run_train
from configuration_nanoebm import OPTIONS, NanoEBMConfig
from nanoebm import continuing
from nanoebm.arguments import NANOEBM_ARGUMENTS
from nanoebm.cli import UsageError
from nanoebm.settings import merge

TINY = ["--preset", "cpu", "--n_layer", "1", "--n_head", "2", "--n_embd", "32", "--block_size", "32",
        "--per_device_train_batch_size", "4", "--eval_blocks", "4", "--eval_reading_chars", "200", "--warmup_steps",
        "1", "--save_steps", "2",
        "--report_to", "none", "--disable_tqdm", "true", "--dataloader_num_workers", "0"]


def test_every_option_is_a_config_field_and_a_flag_with_its_default():
    config = NanoEBMConfig()
    flags = {f.name: f for f in run_train.fields(run_train.ModelArguments)}
    for option in OPTIONS:
        expected = config.n_embd if option.name == "d_energy" else option.default
        if option.name != "use_soft_tokens":  # the research code's switch: read back from the landscape
            assert getattr(config, option.name) == expected, option.name
        assert option.name in NanoEBMConfig.__doc__
        if option.name != "vocab_size":  # set from the tokenizer
            assert flags[option.name].metadata["help"] == option.help
    assert set(flags) == {option.name for option in OPTIONS} - {"vocab_size"}
    assert {"rope_theta", "initializer_range"} <= set(flags)
    generate_flags = {f.name: f for f in run_train.fields(run_generate.GenerateArguments)}
    assert generate_flags["think_steps"].metadata["help"].startswith("Gradient steps K")


def test_the_table_read_without_importing_it_is_the_table():
    """run_generate reads the thinking options from configuration_nanoebm's source (importing it costs torch)."""
    from nanoebm.cli import model_options

    names = [option.name for option in OPTIONS]
    assert model_options(names) == {option.name: (option.help, option.aliases) for option in OPTIONS}
    with pytest.raises(KeyError, match="think_harder"):
        model_options(["think_harder"])


def test_tie_word_embeddings_is_refused_not_ignored():
    with pytest.raises(ValueError, match="tie_word_embeddings"):
        NanoEBMConfig(tie_word_embeddings=True)
    assert NanoEBMConfig(tie_word_embeddings=False).tie_word_embeddings is False


def test_a_flag_takes_effect_on_the_model(tmp_path):
    """rope_theta had no flag; it reaches the model's config now."""
    parsed = run_train.parse_args([*TINY, "--position_embedding", "rope", "--rope_theta", "500",
                                   "--initializer_range", "0.01", "--output_dir", str(tmp_path)])
    from nanoebm import continuing
    from tokenization_char import CharTokenizer

    model = continuing.build_model(None, parsed.model, CharTokenizer(vocab={c: i for i, c in enumerate("abc")}))
    assert (model.config.rope_theta, model.config.initializer_range) == (500.0, 0.01)


@pytest.mark.parametrize("power", ["0", "0.5"])
def test_residual_init_power_flag_reaches_the_config(tmp_path, power):
    """Both values (the default and the other) come through the flag to the config and the weights."""
    parsed = run_train.parse_args([*TINY, "--residual_init_power", power, "--output_dir", str(tmp_path)])
    assert parsed.model.residual_init_power == float(power)
    from nanoebm import continuing
    from tokenization_char import CharTokenizer

    model = continuing.build_model(None, parsed.model, CharTokenizer(vocab={c: i for i, c in enumerate("abc")}))
    assert model.config.residual_init_power == float(power)
    expected = 0.02 / (2 * 1) ** float(power)  # TINY has one layer
    assert float(model.transformer.h[0].mlp.c_proj.weight.std()) == pytest.approx(expected, rel=0.1)


def test_layers_merge_in_order_and_linked_settings_go_together():
    merged = merge([("default", {"a": 1, "b": 1, "use_contrastive": True}), ("preset", {"b": 2, "c": 2}),
                    ("recipe", {"c": 3, "use_contrastive": False}), ("command line", {"contrastive_type": "pcd"})])
    assert {k: (s.value, s.source) for k, s in merged.items()} == {
        "a": (1, "default"), "b": (2, "preset"), "c": (3, "recipe"), "contrastive_type": ("pcd", "command line")}


def test_each_value_says_where_it_came_from(tmp_path):
    parsed = run_train.parse_args(["--preset", "cpu", "--recipe", "ebt_hybrid", "--think_lr", "3",
                                   "model.think_steps=4", "--output_dir", str(tmp_path)])
    sources = {name: s.source for name, s in parsed.settings.items()}
    assert sources["n_layer"] == "preset cpu" and sources["landscape"] == "recipe ebt_hybrid"
    assert sources["think_lr"] == sources["think_steps"] == "command line" and sources["weight_decay"] == "default"
    assert (parsed.model.think_lr, parsed.model.think_steps, parsed.model.landscape) == (3.0, 4, "ebt")


def test_the_run_record_keeps_every_value_and_its_source_and_a_resume_repeats_them(tmp_path, corpus_text):
    corpus = tmp_path / "c.txt"
    corpus.write_text(corpus_text[:20000])
    out = tmp_path / "out"
    run_train.main([*TINY, "--data_path", str(corpus), "--output_dir", str(out), "--max_steps", "2",
                    "--recipe", "ebt_hybrid", "--think_steps", "1", "--keep_checkpoints", "true"])
    settings = json.loads((out / "nanoebm_run.json").read_text())["runs"][-1]["settings"]
    assert settings["think_steps"] == {"value": 1, "from": "command line"}
    assert settings["landscape"] == {"value": "ebt", "from": "recipe ebt_hybrid"}
    assert settings["vocab_size"]["from"] == "the tokenizer" and settings["rope_theta"]["from"] == "default"
    assert settings["contrastive_type"] == {"value": "cd", "from": "recipe ebt_hybrid"}
    checkpoint = out / "checkpoints" / "checkpoint-2"
    moved = tmp_path / "elsewhere"
    resumed = run_train.parse_args(["--resume_from_checkpoint", str(checkpoint), "--output_dir", str(moved)])
    assert resumed.model.think_steps is None  # the checkpoint's own config holds it
    assert (resumed.loss.aux_ce_weight, resumed.loss.contrastive_type, resumed.training.max_steps) == (0.1, "cd", 2)
    assert resumed.settings["max_steps"].source == f"resumed {checkpoint}"
    assert resumed.settings["output_dir"].source == "command line"
    with pytest.raises(UsageError, match="--aux_ce_weight 0.5"):
        run_train.parse_args(["--resume_from_checkpoint", str(checkpoint), "--aux_ce_weight", "0.5"])
    shutil.rmtree(moved, ignore_errors=True)


def test_a_continued_folder_ranks_above_the_recipe(tmp_path, corpus_text):
    """defaults < preset < recipe < the folder continued < the command line: the saved model's landscape and step
    size hold over a recipe's; the recipe's losses apply; a flag wins over all."""
    corpus = tmp_path / "c.txt"
    corpus.write_text(corpus_text[:20000])
    out = tmp_path / "out"
    run_train.main([*TINY, "--data_path", str(corpus), "--output_dir", str(out), "--max_steps", "1",
                    "--aux_ce_weight", "0.3"])
    parsed = run_train.parse_args(["--model_name_or_path", str(out), "--recipe", "ebt_hybrid", "--think_steps", "3",
                                   "--output_dir", str(tmp_path / "next")])
    assert parsed.model.landscape is None and parsed.model.think_lr is None  # the saved model's hold
    assert parsed.settings["landscape"].source == f"continued {out}"
    assert parsed.model.think_steps == 3 and parsed.loss.aux_ce_weight == 0.1  # the recipe's loss, the flag
    assert parsed.training.per_device_train_batch_size == 4  # the continued run's batch


def test_the_run_record_says_which_preset_the_machine_chose(tmp_path, corpus_text, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    corpus = tmp_path / "c.txt"
    corpus.write_text(corpus_text[:20000])
    out = tmp_path / "out"
    run_train.main([*TINY[2:], "--data_path", str(corpus), "--output_dir", str(out), "--max_steps", "1"])
    settings = json.loads((out / "nanoebm_run.json").read_text())["runs"][-1]["settings"]
    assert settings["preset"] == {"value": "cpu", "from": "the machine"}
    assert settings["residual_init_power"] == {"value": 0.0, "from": "preset cpu"}


def test_a_folder_saved_before_residual_init_power_is_what_it_was_made_with(tmp_path, corpus_text):
    """Before the option existed models were meant to start with nanoGPT's scaled init (0.5), which transformers 5.24
    skipped for a while (0): such a folder loads as 0.5, the record says the value is assumed, and a continue may
    state the true value."""
    corpus = tmp_path / "c.txt"
    corpus.write_text(corpus_text[:20000])
    old, new = tmp_path / "old", tmp_path / "new"
    run_train.main([*TINY, "--data_path", str(corpus), "--output_dir", str(old), "--max_steps", "1",
                    "--residual_init_power", "0.5"])
    config = json.loads((old / "config.json").read_text())
    del config["residual_init_power"]
    (old / "config.json").write_text(json.dumps(config))
    assert NanoEBMConfig.from_pretrained(old).residual_init_power == 0.5
    run_train.main(["--model_name_or_path", str(old), "--data_path", str(corpus), "--output_dir", str(new),
                    "--max_steps", "1", "--residual_init_power", "0.5", "--eval_blocks", "4", "--eval_reading_chars",
                    "200", *TINY[-6:]])
    settings = json.loads((new / "nanoebm_run.json").read_text())["runs"][-1]["settings"]
    assert settings["residual_init_power"] == {"value": 0.5, "from": "command line"}
    assert json.loads((new / "config.json").read_text())["residual_init_power"] == 0.5
    parsed = run_train.parse_args(["--model_name_or_path", str(old), "--output_dir", str(tmp_path / "x")])
    assert parsed.settings["residual_init_power"] == (0.5, f"assumed: {old} was saved before residual_init_power "
                                                           f"existed")
    true = tmp_path / "true"  # the user knows better: it was made on 5.24 before the fix
    run_train.main(["--model_name_or_path", str(old), "--data_path", str(corpus), "--output_dir", str(true),
                    "--max_steps", "1", "--residual_init_power", "0", "--eval_blocks", "4", "--eval_reading_chars",
                    "200", *TINY[-6:]])
    assert json.loads((true / "config.json").read_text())["residual_init_power"] == 0
    settings = json.loads((true / "nanoebm_run.json").read_text())["runs"][-1]["settings"]
    assert settings["residual_init_power"] == {"value": 0.0, "from": "command line"}
    parsed = run_train.parse_args(["--model_name_or_path", str(true), "--output_dir", str(tmp_path / "y"),
                                   "--residual_init_power", "0.5"])
    with pytest.raises(UsageError, match="--residual_init_power 0.5 differs"):  # once stated, the folder keeps it
        continuing.build_model(str(true), parsed.model, None)


def test_every_preset_and_recipe_names_real_settings():
    """Presets and recipes are data: a misspelt key would be silently dropped by the merge, so each must name a flag."""
    from transformers import TrainingArguments

    from nanoebm.recipes import RECIPES
    from nanoebm.settings import PRESETS, TRAINING_DEFAULTS

    known = {f.name for cls in (*NANOEBM_ARGUMENTS, TrainingArguments) for f in run_train.fields(cls)}
    for name, values in [*PRESETS.items(), *RECIPES.items(), ("defaults", TRAINING_DEFAULTS)]:
        assert set(values) <= known, (name, set(values) - known)
