"""Bad input, systematically: property-based passes (hypothesis) over both command lines' flags and values, the
tokenizer's inputs and generate's thinking arguments.

The promise under test: every bad value ends in one line on stderr and exit status 2 (command line) or a ValueError
that names the argument (API) -- never a traceback, never another exit status, and nothing written to an output
folder. Examples are few and the model tiny, so the whole file stays within a few seconds per property.
"""

import math

import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

import run_generate
import run_train
from conftest import make_model
from tokenization_char import CharTokenizer

FEW = settings(max_examples=25, deadline=None, derandomize=True,
               suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])

NOT_A_NUMBER = st.sampled_from(["abc", "", "1,5", "0x1G", "--", "1e", "二"])
NOT_AN_INTEGER = st.one_of(NOT_A_NUMBER, st.sampled_from(["1.5", "nan", "inf", "2e0.5"]))
NON_FINITE = st.sampled_from(["nan", "inf", "-inf", "NaN"])
NEGATIVE = st.integers(min_value=-10**6, max_value=-1).map(str)
NOT_POSITIVE = st.one_of(NEGATIVE, st.just("0"))
NOT_A_BOOLEAN = st.sampled_from(["maybe", "2", "yess", "", "none?"])


def assert_one_line_exit_2(code, err, prog):
    """Exit status 2 with exactly one error line (notes on stderr may precede it) and no traceback."""
    errors = [line for line in err.splitlines() if line.startswith(f"{prog}: error:")]
    assert code == 2, (code, err)
    assert len(errors) == 1, err
    assert "Traceback" not in err and "usage:" not in err, err


# ---------------------------------------------------------------------------------------------------------------
# run_generate.py: every flag with a value it must refuse

GENERATE_BAD = {
    "max_new_tokens": st.one_of(NOT_AN_INTEGER, NOT_POSITIVE),
    "think_steps": st.one_of(NOT_AN_INTEGER, NEGATIVE),
    "think_lr": st.one_of(NOT_A_NUMBER, NON_FINITE, NOT_POSITIVE),
    "think_samples": st.one_of(NOT_AN_INTEGER, NOT_POSITIVE),
    "top_k": st.one_of(NOT_AN_INTEGER, NEGATIVE),
    "temperature": st.one_of(NOT_A_NUMBER, NON_FINITE, NOT_POSITIVE),
    "top_p": st.one_of(NOT_A_NUMBER, NON_FINITE, NOT_POSITIVE, st.sampled_from(["1.0001", "2", "1e9"])),
    "seed": st.one_of(NOT_AN_INTEGER, NEGATIVE, st.just(str(2 ** 40))),
    "num_return_sequences": st.one_of(NOT_AN_INTEGER, NOT_POSITIVE),
    "num_candidates": st.one_of(NOT_AN_INTEGER, NOT_POSITIVE),
    "select": st.text(min_size=1, max_size=8).filter(lambda s: s not in ("min_energy", "min_nll")),
    "device": st.sampled_from(["gpu", "tpu", "", "CPU0"]),
    "unk_token": st.sampled_from(["", "ab", "<unk>", "€"]),
    "eval_blocks": st.one_of(NOT_AN_INTEGER, NOT_POSITIVE),
    "use_thinking": NOT_A_BOOLEAN,
    "do_sample": NOT_A_BOOLEAN,
    "stream": NOT_A_BOOLEAN,
    "plot_position": st.one_of(NOT_AN_INTEGER, st.just("100000"), st.just("-100000")),
    "num_beams": st.one_of(NOT_AN_INTEGER, NOT_POSITIVE),
    "repetition_penalty": st.one_of(NOT_A_NUMBER, NON_FINITE, NOT_POSITIVE),
    "no_repeat_ngram_size": st.one_of(NOT_AN_INTEGER, NEGATIVE),
    "dtype": st.sampled_from(["float64x", "int8", "", "half"]),
    "reading_chars": st.one_of(NOT_AN_INTEGER, NEGATIVE),
    "use_adaptation": NOT_A_BOOLEAN,
    "adapt_on_output": NOT_A_BOOLEAN,
    "adapt_lr": st.one_of(NOT_A_NUMBER, NON_FINITE, NOT_POSITIVE),
    "adapt_params": st.text(min_size=1, max_size=8).filter(lambda s: s not in ("all", "head", "norms", "lora")),
    "adapt_rule": st.text(min_size=1, max_size=8).filter(lambda s: s not in ("sgd", "rms")),
    "adapt_decay": st.one_of(NOT_A_NUMBER, NON_FINITE, NEGATIVE, st.sampled_from(["1", "1.5"])),
    "adapt_window": st.one_of(NOT_AN_INTEGER, NOT_POSITIVE, st.sampled_from(["1", "100000"])),
    "adapt_rank": st.one_of(NOT_AN_INTEGER, NOT_POSITIVE),
    "html_chars": st.one_of(NOT_AN_INTEGER, NOT_POSITIVE),
    "report_to": st.sampled_from(["tensorboard", "", "WANDB", "all"]),
}


def test_every_generate_flag_with_a_value_is_covered():
    """A new flag that takes a value gets its bad values here too."""
    parser = run_generate.build_parser()
    takes_value = {a.dest for a in parser._actions if a.option_strings and a.nargs is None and a.dest != "help"}
    skipped = {"model_name_or_path", "prompt", "prompt_file", "plot", "output_json", "data_path", "output_dir",
               "no_thinking", "html"}
    assert takes_value - skipped - set(GENERATE_BAD) == set()


@FEW
@given(data=st.data())
def test_generate_cli_refuses_bad_values(capsys, generate_model_dir, tmp_path_factory, data):
    flag = data.draw(st.sampled_from(sorted(GENERATE_BAD)), label="flag")
    value = data.draw(GENERATE_BAD[flag], label="value")
    out = tmp_path_factory.mktemp("never")
    argv = ["--model_name_or_path", str(generate_model_dir), "--prompt", "First", "--max_new_tokens", "3",
            "--plot", str(out / "plots"), "--output_json", str(out / "sample.json"), "--html", str(out / "page.html"),
            f"--{flag}", value]
    if flag in ("temperature", "top_p", "top_k"):
        argv.append("--do_sample")
    code = run_generate.main(argv)
    _, err = capsys.readouterr()
    assert_one_line_exit_2(code, err, "run_generate.py")
    assert list(out.iterdir()) == [], "a refused command wrote files"


@pytest.mark.parametrize("word", ["two\nlines", "three\n\nlines\n"])
def test_generate_cli_error_is_one_line_when_the_input_spans_several(capsys, word):
    """The message echoes a word no flag takes; a newline inside it still leaves one line on stderr."""
    code = run_generate.main(["--model_name_or_path", "anywhere", word])
    _, err = capsys.readouterr()
    assert code == 2 and len(err.splitlines()) == 1 and err.startswith("run_generate.py: error: "), err


@pytest.mark.parametrize("mode", ["generate", "compare"])
def test_generate_cli_names_an_output_folder_it_cannot_make(capsys, generate_model_dir, tiny_corpus, tmp_path, mode):
    """A folder under a file cannot be made: one line naming it (and the flag that gave it), exit status 2."""
    blocker = tmp_path / "a_file"
    blocker.write_text("x", encoding="utf-8")
    target = blocker / "plots"
    model = ["--model_name_or_path", str(generate_model_dir)] if mode == "generate" else \
        ["--compare", str(generate_model_dir), "--data_path", str(tiny_corpus), "--eval_blocks", "1"]
    code = run_generate.main([*model, "--max_new_tokens", "2", "--no_stream", "--plot", str(target)])
    _, err = capsys.readouterr()
    assert_one_line_exit_2(code, err, "run_generate.py")
    assert f"cannot create {'--plot folder ' if mode == 'generate' else ''}{target}: " in err, err


@pytest.mark.parametrize("prompt", ["", "x" * 5000])
def test_generate_cli_empty_and_long_prompts_work(capsys, generate_model_dir, prompt):
    """An empty prompt starts from a newline; one longer than block_size is cropped (both are documented)."""
    code = run_generate.main(["--model_name_or_path", str(generate_model_dir), "--prompt", prompt,
                              "--max_new_tokens", "2", "--no_stream"])
    out, err = capsys.readouterr()
    assert code == 0, err


@FEW
@given(prompt=st.text(min_size=1, max_size=12).filter(lambda s: any(c not in VOCAB for c in s)))
def test_generate_cli_names_unknown_prompt_characters(capsys, generate_model_dir, prompt):
    code = run_generate.main(["--model_name_or_path", str(generate_model_dir), "--prompt", prompt,
                              "--max_new_tokens", "2"])
    _, err = capsys.readouterr()
    assert_one_line_exit_2(code, err, "run_generate.py")
    assert "--unk_token" in err
    assert repr(next(c for c in prompt if c not in VOCAB)) in err


# ---------------------------------------------------------------------------------------------------------------
# run_train.py: model, loss and data flags with values it must refuse, before anything is written

TRAIN_BAD = {
    "n_layer": st.one_of(NOT_AN_INTEGER, NOT_POSITIVE),
    "n_head": st.one_of(NOT_AN_INTEGER, NOT_POSITIVE, st.just("3")),  # 32 is not divisible by 3
    "n_embd": st.one_of(NOT_AN_INTEGER, NOT_POSITIVE, st.just("33")),
    "dropout": st.one_of(NOT_A_NUMBER, NON_FINITE, st.sampled_from(["-0.1", "1", "1.5"])),
    "bias": NOT_A_BOOLEAN,
    "position_embedding": st.sampled_from(["absolute", "", "ROPE"]),
    "d_energy": st.one_of(NOT_AN_INTEGER, NOT_POSITIVE),
    "landscape": st.sampled_from(["quadratic", "", "Linear"]),
    "correction_scale_init": st.one_of(NOT_A_NUMBER, NON_FINITE, st.sampled_from(["-0.5", "1", "3"])),
    "think_steps": st.one_of(NOT_AN_INTEGER, NEGATIVE),
    "think_lr": st.one_of(NOT_A_NUMBER, NON_FINITE, NOT_POSITIVE),
    "think_lr_random_scale": st.one_of(NOT_A_NUMBER, NON_FINITE, st.sampled_from(["0.5", "0", "-2"])),
    "think_samples": st.one_of(NOT_AN_INTEGER, NOT_POSITIVE),
    "think_samples_noise_std": st.one_of(NOT_A_NUMBER, NON_FINITE, st.just("-1")),
    "softmax_temperature": st.one_of(NOT_A_NUMBER, NON_FINITE, NOT_POSITIVE),
    "entropy_weight": st.one_of(NOT_A_NUMBER, NON_FINITE, st.just("-1")),
    "think_max_move": st.one_of(NOT_A_NUMBER, NON_FINITE, st.just("-0.25")),
    "think_init": st.sampled_from(["ones", "", "Random"]),
    "think_gradient": st.sampled_from(["mirror", ""]),
    "energy_convergence_threshold": st.one_of(NOT_A_NUMBER, NON_FINITE, st.just("-1")),
    "aux_ce_weight": st.one_of(NOT_A_NUMBER, NON_FINITE, st.sampled_from(["-0.1", "1.1"])),
    "contrastive_type": st.sampled_from(["pcd2", "", "CD"]),
    "contrastive_k": st.one_of(NOT_AN_INTEGER, NOT_POSITIVE),
    "contrastive_weight": st.one_of(NOT_A_NUMBER, NON_FINITE, st.just("-1")),
    "restart_prob": st.one_of(NOT_A_NUMBER, NON_FINITE, st.sampled_from(["-0.1", "1.5"])),
    "think_replay_prob": st.one_of(NOT_A_NUMBER, NON_FINITE, st.sampled_from(["-0.1", "1"])),
    "random_think_steps": st.sampled_from(["3-2", "a-b", "-1-2", "2", "1-2-3"]),
    "block_size": st.one_of(NOT_AN_INTEGER, NOT_POSITIVE),
    "train_fraction": st.one_of(NOT_A_NUMBER, NON_FINITE, st.sampled_from(["0", "1", "-0.5", "1.5"])),
    "eval_blocks": st.one_of(NOT_AN_INTEGER, NOT_POSITIVE),
    "preset": st.sampled_from(["tpu", "", "CPU"]),
    "max_steps": st.one_of(NOT_AN_INTEGER),
    "learning_rate": st.one_of(NOT_A_NUMBER, NON_FINITE, st.just("-1")),
    "per_device_train_batch_size": st.one_of(NOT_AN_INTEGER, NOT_POSITIVE),
    "eval_reading_chars": st.one_of(NOT_AN_INTEGER, NEGATIVE),
    "adapt_lr": st.one_of(NOT_A_NUMBER, NON_FINITE, NOT_POSITIVE),
    "adapt_params": st.sampled_from(["attention", "", "ALL"]),
    "adapt_window": st.one_of(NOT_AN_INTEGER, NOT_POSITIVE, st.sampled_from(["1", "33"])),
    "adapt_decay": st.one_of(NOT_A_NUMBER, NON_FINITE, st.sampled_from(["-0.1", "1"])),
}
TRAIN_TINY = ["--preset", "cpu", "--n_layer", "1", "--n_head", "2", "--n_embd", "32", "--block_size", "32",
              "--per_device_train_batch_size", "4", "--eval_blocks", "4", "--max_steps", "2", "--save_steps", "1000",
              "--report_to", "none", "--disable_tqdm", "true", "--use_contrastive", "false"]


@pytest.fixture(scope="module")
def tiny_corpus(tmp_path_factory, corpus_text):
    path = tmp_path_factory.mktemp("bad-input-data") / "tiny.txt"
    path.write_text(corpus_text[:4000], encoding="utf-8")
    return path


@FEW
@given(data=st.data())
def test_train_cli_refuses_bad_values_and_writes_nothing(capsys, tiny_corpus, tmp_path_factory, data):
    flag = data.draw(st.sampled_from(sorted(TRAIN_BAD)), label="flag")
    value = data.draw(TRAIN_BAD[flag], label="value")
    out = tmp_path_factory.mktemp("train-bad") / "out"
    argv = [*TRAIN_TINY, "--data_path", str(tiny_corpus), "--output_dir", str(out), f"--{flag}", value]
    if flag == "restart_prob":
        argv += ["--contrastive_type", "fast_pcd"]
    if flag in ("contrastive_type",):
        argv.remove("--use_contrastive"), argv.remove("false")
    code = run_train.cli(argv)
    _, err = capsys.readouterr()
    assert_one_line_exit_2(code, err, "run_train.py")
    assert not out.exists(), f"a refused run wrote {list(out.rglob('*'))}"


@FEW
@given(word=st.text(alphabet="abcdefghijklmnopqrstuvwxyz_", min_size=3, max_size=14))  # "zz" + word: no flag
def test_train_cli_refuses_unknown_flags_in_both_syntaxes(capsys, tiny_corpus, tmp_path_factory, word):
    out = tmp_path_factory.mktemp("train-unknown") / "out"
    for spelling in ([f"--zz{word}", "1"], [f"zz{word}=1"]):
        code = run_train.cli([*TRAIN_TINY, "--data_path", str(tiny_corpus), "--output_dir", str(out), *spelling])
        _, err = capsys.readouterr()
        assert_one_line_exit_2(code, err, "run_train.py")
        assert not out.exists()


# ---------------------------------------------------------------------------------------------------------------
# The tokenizer: unknown characters are named, out-of-range ids are refused, everything else round-trips

VOCAB = sorted(set("\n !$&',-.3:;?ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"))


@pytest.fixture(scope="module")
def char_tokenizer():
    return CharTokenizer.from_chars(VOCAB)


@FEW
@given(text=st.text(max_size=40))
@example(text="<pad>")
@example(text="\n\n  \t")
def test_tokenizer_round_trips_or_names_every_unknown_character(char_tokenizer, text):
    unknown = {c for c in text if c not in VOCAB}
    if not unknown:
        ids = char_tokenizer(text)["input_ids"]
        assert len(ids) == len(text) and char_tokenizer.decode(ids) == text
        return
    with pytest.raises(ValueError) as caught:
        char_tokenizer(text)
    first = next(c for c in text if c not in VOCAB)
    assert repr(first) in str(caught.value)  # the message lists the first few in order of appearance
    assert f"{first!r}@{text.index(first)}" in str(caught.value)  # and where it stands


@FEW
@given(ids=st.lists(st.integers(min_value=-5, max_value=200), min_size=1, max_size=10))
def test_tokenizer_decode_refuses_ids_outside_the_vocabulary(char_tokenizer, ids):
    pad = char_tokenizer.pad_token_id
    bad = [i for i in ids if not (0 <= i < len(VOCAB) or i == pad)]
    if not bad:
        assert len(char_tokenizer.decode(ids, skip_special_tokens=True)) == sum(i != pad for i in ids)
        return
    with pytest.raises(ValueError) as caught:
        char_tokenizer.decode(ids)
    assert str(bad[0]) in str(caught.value)


# ---------------------------------------------------------------------------------------------------------------
# generate's thinking arguments: a bad one is a ValueError naming it; a good one decodes

def valid_steps(v):
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def valid_lr(v):
    return v is None or (isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v > 0)


def valid_samples(v):
    return isinstance(v, int) and not isinstance(v, bool) and v >= 1


@pytest.fixture(scope="module")
def tiny_model():
    return make_model(landscape="mixture", correction_scale=0.5).eval()


@FEW
@given(
    steps=st.one_of(st.integers(-3, 4), st.floats(-2, 4), st.booleans()),
    lr=st.one_of(st.none(), st.floats(allow_nan=True, allow_infinity=True), st.integers(-2, 2)),
    samples=st.one_of(st.integers(-2, 3), st.floats(0, 3), st.booleans()),
)
@example(steps=2, lr=float("nan"), samples=1)
@example(steps=2.5, lr=0.5, samples=1)
@example(steps=2, lr=0.5, samples=2.0)
def test_generate_thinking_arguments(tiny_model, steps, lr, samples):
    ids = torch.tensor([[5, 6, 7]])
    kwargs = dict(max_new_tokens=2, do_sample=False, think_steps=steps, think_samples=samples)
    if lr is not None:
        kwargs["think_lr"] = lr
    problems = [name for name, ok in (("think_steps", valid_steps(steps)), ("think_lr", valid_lr(lr)),
                                      ("think_samples", valid_samples(samples))) if not ok]
    if not problems:
        try:
            out = tiny_model.generate(ids, **kwargs)
        except FloatingPointError as diverged:  # a huge but valid step: the documented error names the knob
            assert "think_lr" in str(diverged) and lr is not None and lr > 1e3, diverged
            return
        assert out.shape == (1, 5)
        return
    with pytest.raises(ValueError) as caught:
        tiny_model.generate(ids, **kwargs)
    assert any(name in str(caught.value) for name in problems), (problems, caught.value)


@pytest.fixture(scope="module")
def generate_model_dir(tmp_path_factory):
    """A tiny untrained mixture model and the tokenizer of VOCAB, saved as a model folder."""
    folder = tmp_path_factory.mktemp("bad-input-model")
    make_model(landscape="mixture", vocab_size=len(VOCAB)).save_pretrained(folder)
    CharTokenizer.from_chars(VOCAB).save_pretrained(folder)
    return folder
