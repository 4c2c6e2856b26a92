"""run_generate.py: the CLI end to end on a tiny trained model (real objects, CPU), in-process through main(argv)
and, where the process boundary matters (streaming, exit status, no traceback), as a subprocess."""

import json
import math
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from conftest import ROOT, make_model, run_cli as run, train_briefly
from tokenization_char import CharTokenizer

from nanoebm.analysis import position_stats, score_continuations
from nanoebm.compare import comparison_table
from nanoebm.corpus import EMBEDDED_CORPUS, fixed_blocks, resolve_data_path, validation_text
from nanoebm.scoring import TEMPERATURES

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def save(model, tokenizer, folder):
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def tokenizer(corpus_text):
    return CharTokenizer.from_corpus(corpus_text)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, corpus_text, tokenizer):
    """A tiny mixture model (block_size 32, so 40 new characters already slide the window), trained a few steps."""
    ids = torch.tensor(tokenizer(corpus_text[:30000])["input_ids"])
    model = train_briefly(make_model(landscape="mixture", think_lr=1.0, correction_scale=0.5), ids, steps=30)
    return save(model, tokenizer, tmp_path_factory.mktemp("gen-mixture"))


@pytest.fixture(scope="module")
def linear_dir(tmp_path_factory, corpus_text, tokenizer):
    ids = torch.tensor(tokenizer(corpus_text[:30000])["input_ids"])
    model = train_briefly(make_model(seed=1, landscape="linear"), ids, steps=15)
    return save(model, tokenizer, tmp_path_factory.mktemp("gen-linear"))


def generate_json(capsys, tmp_path, model_dir, *argv, name="out.json"):
    path = tmp_path / name
    code, out, err = run(capsys, "--model_name_or_path", model_dir, "--output_json", path, *argv)
    assert code == 0, err
    return json.loads(path.read_text(encoding="utf-8")), out, err


def subprocess_run(*argv, timeout=240):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    return subprocess.run([sys.executable, "run_generate.py", *map(str, argv)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


# ---------------------------------------------------------------------------------------------------------------
# end to end


@pytest.mark.slow
def test_cli_subprocess_streams_and_writes_json(model_dir, tmp_path, loaded, tokenizer):
    out_json = tmp_path / "sample.json"
    done = subprocess_run("--model_name_or_path", model_dir, "--prompt", "ROMEO:", "--max_new_tokens", 40,
                          "--think_steps", 3, "--think_lr", 0.8, "--do_sample", "--top_k", 20, "--temperature", 0.9,
                          "--top_p", 0.95, "--seed", 7, "--device", "cpu", "--output_json", out_json)
    assert done.returncode == 0, done.stderr
    assert "Traceback" not in done.stderr
    record = json.loads(out_json.read_text(encoding="utf-8"))
    assert done.stdout == "ROMEO:" + record["text"] + "\n"  # streamed: prompt, then each character as produced
    assert {"prompt", "text", "settings", "tokens", "summary"} <= record.keys()
    assert record["prompt"] == "ROMEO:" and len(record["text"]) == 40 and len(record["tokens"]) == 40
    settings = record["settings"]
    assert (settings["think_steps"], settings["think_lr"], settings["top_k"], settings["temperature"],
            settings["top_p"], settings["seed"], settings["do_sample"], settings["use_thinking"]) == (
        3, 0.8, 20, 0.9, 0.95, 7, True, True)
    for token, char in zip(record["tokens"], record["text"]):
        assert token["char"] == char
        assert 0.0 <= token["p_system1"] <= 1.0 and 0.0 <= token["p_system2"] <= 1.0
        assert math.isfinite(token["energy"]) and math.isfinite(token["energy_gap"])
    # thinking descends the expected energy: the gap J0 - JK is positive on average
    assert record["summary"]["mean_energy_gap"] > 0
    # kl is KL(S2 || S1) of each character, computed here from the model's own distributions
    ids = tokenizer("ROMEO:" + record["text"], return_tensors="pt")["input_ids"]
    scores = score_continuations(loaded, ids, len("ROMEO:"), think_steps=3, think_lr=0.8)
    expected = F.kl_div(scores["logp1"][0], scores["logp2"][0], log_target=True, reduction="none").sum(-1)
    assert expected.mean() > 1e-5  # thinking moved the distributions: a KL of 0 would be wrong
    kl = torch.tensor([token["kl"] for token in record["tokens"]])
    assert torch.allclose(kl, expected, rtol=1e-2, atol=1e-6), (kl - expected).abs().max()


def test_kl_is_of_system2_from_system1():
    """KL(p2 || p1) = sum p2 log(p2 / p1), on distributions whose value is known."""
    p1, p2 = torch.tensor([[0.5, 0.5]]), torch.tensor([[0.9, 0.1]])
    scores = dict(logp1=p1.log()[None], logp2=p2.log()[None], targets=torch.tensor([[0]]),
                  energy=torch.zeros(1, 1), trace=None)
    expected = 0.9 * math.log(0.9 / 0.5) + 0.1 * math.log(0.1 / 0.5)
    assert float(position_stats(scores)["kl"][0]) == pytest.approx(expected, rel=1e-6)


def test_greedy_decoding_matches_model_generate(capsys, tmp_path, model_dir, loaded, tokenizer):
    ids = tokenizer("ROMEO:", return_tensors="pt")["input_ids"]

    def reference(**kw):
        return tokenizer.decode(loaded.generate(ids, max_new_tokens=40, do_sample=False, **kw)[0, ids.shape[1]:])

    system1 = reference(use_thinking=False)
    for flags in (["--no_thinking"], ["--use_thinking", "false"], ["--no_use_thinking"], ["use_thinking=false"]):
        record, _, _ = generate_json(capsys, tmp_path, model_dir, "--prompt", "ROMEO:", "--max_new_tokens", 40,
                                     *flags)
        assert record["text"] == system1, flags
        assert record["settings"]["use_thinking"] is False
    thinking = reference(think_steps=6, think_lr=3.0)
    record, _, _ = generate_json(capsys, tmp_path, model_dir, "--prompt", "ROMEO:", "--max_new_tokens", 40,
                                 "--think_steps", 6, "--think_lr", 3.0)
    assert record["text"] == thinking
    assert record["summary"]["mean_kl"] > 0  # thinking really changed the distributions


def test_sampling_flags_reach_generate(capsys, tmp_path, model_dir):
    common = ("--prompt", "ROMEO:", "--max_new_tokens", 30, "--no_stream")
    greedy = generate_json(capsys, tmp_path, model_dir, *common)[0]["text"]
    # top_k=1, a tiny nucleus or a tiny temperature each make sampling greedy: proof that the flag arrived
    for flags in (("--top_k", 1), ("--top_p", 1e-6), ("--temperature", 1e-4)):
        sampled = generate_json(capsys, tmp_path, model_dir, *common, "--do_sample", "--seed", 3, *flags)[0]
        assert sampled["text"] == greedy, flags
    a = generate_json(capsys, tmp_path, model_dir, *common, "--do_sample", "--seed", 1)[0]["text"]
    b = generate_json(capsys, tmp_path, model_dir, *common, "--do_sample", "--seed", 1)[0]["text"]
    c = generate_json(capsys, tmp_path, model_dir, *common, "--do_sample", "--seed", 2)[0]["text"]
    assert a == b != c != greedy


def test_research_code_syntax_maps_onto_the_flags(capsys, tmp_path, model_dir):
    path = tmp_path / "research.json"
    code, out, err = run(capsys, f"checkpoint={model_dir}", "use_thinking=true", "think_steps=4", "topk=64",
                         "sample=true", "sample_temp=1.2", "sample_top_p=0.9", "prompt=HAMLET:", "max_new_tokens=25",
                         "seed=5", f"output_json={path}")
    assert code == 0, err
    research = json.loads(path.read_text(encoding="utf-8"))
    s = research["settings"]
    assert (s["use_thinking"], s["think_steps"], s["top_k"], s["do_sample"], s["temperature"], s["top_p"]) == (
        True, 4, 64, True, 1.2, 0.9)
    assert research["prompt"] == "HAMLET:" and len(research["text"]) == 25
    flags, _, _ = generate_json(capsys, tmp_path, model_dir, "--use_thinking", "true", "--think_steps", 4,
                                "--top_k", 64, "--do_sample", "--temperature", 1.2, "--top_p", 0.9,
                                "--prompt", "HAMLET:", "--max_new_tokens", 25, "--seed", 5, name="flags.json")
    assert flags["text"] == research["text"]
    # a value that looks like key=value after a flag that takes a value stays a value
    record, _, _ = generate_json(capsys, tmp_path, model_dir, "--prompt", "a=b", "--max_new_tokens", 3,
                                 "--unk_token", " ", name="kv.json")  # ('=' is not a Shakespeare character)
    assert record["prompt"] == "a=b"


def test_prompt_file_empty_prompt_and_several_sequences(capsys, tmp_path, model_dir):
    prompt_file = tmp_path / "prompt.txt"
    prompt_file.write_text("KING RICHARD III:\n", encoding="utf-8")
    record, out, _ = generate_json(capsys, tmp_path, model_dir, "--prompt_file", prompt_file, "--max_new_tokens", 10)
    assert record["prompt"] == "KING RICHARD III:\n" and out.startswith("KING RICHARD III:\n")

    record, _, err = generate_json(capsys, tmp_path, model_dir, "--prompt", "", "--max_new_tokens", 10)
    assert record["prompt"] == "\n" and "newline" in err

    record, out, _ = generate_json(capsys, tmp_path, model_dir, "--prompt", "ROMEO:", "--max_new_tokens", 12,
                                   "--do_sample", "--num_return_sequences", 3)
    assert len(record["samples"]) == 3 and all(len(s["text"]) == 12 for s in record["samples"])
    assert out.count("----- sample") == 3
    assert all(f"ROMEO:{s['text']}" in out for s in record["samples"])


def test_unknown_characters_with_unk_token(capsys, tmp_path, model_dir):
    record, _, _ = generate_json(capsys, tmp_path, model_dir, "--prompt", "Hé€llo", "--unk_token", " ",
                                 "--max_new_tokens", 5)
    assert record["prompt"] == "Hé€llo" and len(record["text"]) == 5


# ---------------------------------------------------------------------------------------------------------------
# self-verified sampling


@pytest.mark.parametrize("select", ["min_energy", "min_nll"])
def test_self_verified_sampling_returns_the_best_candidate(capsys, tmp_path, model_dir, loaded, tokenizer, select):
    record, out, err = generate_json(capsys, tmp_path, model_dir, "--prompt", "ROMEO:", "--max_new_tokens", 20,
                                     "--num_candidates", 5, "--select", select, "--seed", 11)
    candidates = record["candidates"]
    assert len(candidates) == 5 and len({c["text"] for c in candidates}) > 1
    key = "total_energy" if select == "min_energy" else "nll"
    best = min(candidates, key=lambda c: c[key])
    assert record["selected"] == best["index"] and record["text"] == best["text"]
    assert out == "ROMEO:" + best["text"] + "\n"
    assert err.count("energy ") >= 5 and "--do_sample is implied" in err  # every candidate's energy is reported
    # the reported total energy is the sum of E_base of the chosen characters, from one teacher-forced pass
    for c in candidates:
        ids = torch.tensor([tokenizer("ROMEO:" + c["text"])["input_ids"]])
        with torch.no_grad():
            output = loaded(ids, use_cache=False)
        energies = output.energies[0, 5:-1].gather(-1, ids[0, 6:, None])[:, 0]
        assert c["total_energy"] == pytest.approx(float(energies.sum()), rel=1e-4, abs=1e-4)
        nll = F.cross_entropy(output.logits[0, 5:-1], ids[0, 6:], reduction="sum")
        assert c["nll"] == pytest.approx(float(nll), rel=1e-4, abs=1e-4)


def test_scoring_windows_past_block_size_match_direct_forwards(loaded, tokenizer):
    """Past block_size every target is scored from the window recorded for it (block // 2 .. block context)."""
    text = "ROMEO:\nWhat light through yonder window breaks? It is the east, and Juliet is the sun."
    ids = torch.tensor([tokenizer(text)["input_ids"]])
    block = loaded.config.block_size
    assert ids.shape[1] > 2 * block
    scores = score_continuations(loaded, ids, 6)
    n = ids.shape[1] - 6
    assert scores["logp1"].shape[:2] == (1, n) and scores["trace"].shape[:2] == (1, n)
    for i in (0, 10, n // 2, n - 1):
        target, start = 6 + i, int(scores["window_start"][i])
        assert block // 2 <= target - start <= block or start == 0
        with torch.no_grad():
            out = loaded(ids[:, start:target], use_cache=False)
        assert torch.allclose(scores["logp2"][0, i], F.log_softmax(out.logits[0, -1], -1), atol=1e-5)
        assert torch.allclose(scores["trace"][0, i], out.energy_trace[0, -1], atol=1e-5)


# ---------------------------------------------------------------------------------------------------------------
# pictures and comparison


def assert_png(path):
    import matplotlib.image

    assert path.read_bytes()[:8] == PNG_SIGNATURE, path
    pixels = matplotlib.image.imread(path)
    assert pixels.ndim == 3 and pixels.std() > 0, path  # something was drawn


def test_plots_are_written(capsys, tmp_path, model_dir):
    plots = tmp_path / "plots"
    code, _, err = run(capsys, "--model_name_or_path", model_dir, "--prompt", "ROMEO:", "--max_new_tokens", 40,
                       "--think_steps", 4, "--plot", plots, "--plot_position", -3)
    assert code == 0, err
    for name in ("energy_trace.png", "thinking_at_position.png", "kl_strip.png", "energy_descent.png"):
        assert_png(plots / name)


def test_compare_mode(capsys, tmp_path, model_dir, linear_dir, loaded, corpus_text, tokenizer):
    out_json = tmp_path / "compare.json"
    code, out, err = run(capsys, "--compare", model_dir, linear_dir, "--eval_blocks", 3, "--max_new_tokens", 8,
                         "--plot", tmp_path / "plots", "--output_json", out_json, "--reading_chars", 100,
                         "--adapt_window", 16, "--adapt_lr", 0.01, "--adapt_rule", "sgd")
    assert code == 0, err
    assert "bpc System 1" in out and model_dir.name in out and linear_dir.name in out and "reading: S1" in out
    rows = json.loads(out_json.read_text(encoding="utf-8"))["models"]
    assert [r["landscape"] for r in rows] == ["mixture", "linear"]
    for r in rows:
        assert 0 < r["bpc_system1"] < 10 and 0 < r["bpc_system2"] < 10
        assert r["reading_chars"] == 100 and 0 < r["bpc_system1_adapted"] < 10
        assert r["bpc_system1_adapted"] != r["bpc_system1_static_reading"]
        assert r["tokens_per_s_system1"] > 0 and r["tokens_per_s_system2"] > 0
        assert r["n_chars"] == 3 * 32
    assert_png(tmp_path / "plots" / "compare.png")
    # System 1 bits per character, recomputed by hand on the same deterministic blocks
    val = torch.tensor(tokenizer(validation_text(corpus_text))["input_ids"])
    blocks = fixed_blocks(val, 32, 3)
    with torch.no_grad():
        logits = loaded(blocks[:, :-1], use_cache=False).system1_logits
    nll = F.cross_entropy(logits.flatten(0, 1), blocks[:, 1:].flatten())
    assert rows[0]["bpc_system1"] == pytest.approx(float(nll) / math.log(2), rel=1e-4)
    # System 1 calibrated: its temperature fitted on blocks 0 and 2, scored on block 1 (System 2 beside it there)
    tempered = torch.stack([F.cross_entropy((logits / t).transpose(1, 2), blocks[:, 1:], reduction="none").mean(1)
                            for t in TEMPERATURES], -1)
    k = int(tempered[[0, 2]].mean(0).argmin())
    assert rows[0]["temperature_system1"] == pytest.approx(TEMPERATURES[k])
    assert rows[0]["bpc_system1_calibrated"] == pytest.approx(float(tempered[1, k]) / math.log(2), rel=1e-4)
    assert 0 < rows[0]["bpc_system2_heldout"] < 10 and "S2 - calibrated S1 (T)" in out
    single_block = dict(rows[0], temperature_system1=None, bpc_system1_calibrated=None, bpc_system2_heldout=None)
    assert f"{rows[0]['bpc_system2'] - rows[0]['bpc_system1']:+.4f} | - |" in comparison_table([single_block])


# ---------------------------------------------------------------------------------------------------------------
# bad input: a message on stderr, exit status 2, no traceback


@pytest.mark.parametrize("argv, message", [
    (["--max_new_tokens", "0"], "--max_new_tokens must be >= 1"),
    (["--top_p", "1.5"], "--top_p must be in (0, 1]"),
    (["--top_p", "0"], "--top_p must be in (0, 1]"),
    (["--temperature", "0"], "--temperature must be > 0"),
    (["--temperature", "-1", "--do_sample"], "--temperature must be > 0"),
    (["--prompt", "Hé€llo"], "'é', '€'"),
    (["--num_return_sequences", "2"], "needs --do_sample"),
    (["--think_lr", "0"], "--think_lr must be > 0"),
    (["sampel=true"], "did you mean 'sample'"),
    (["--use_thinking", "maybe"], "Truthy value expected"),
    (["--tmperature", "2"], "did you mean --temperature"),
    (["--max_new_tokns", "5"], "did you mean --max_new_tokens"),
    (["--tmperature=2"], "did you mean --temperature"),
])
def test_bad_arguments(capsys, model_dir, argv, message):
    code, _, err = run(capsys, "--model_name_or_path", model_dir, *argv)
    assert code == 2
    assert message in err and "Traceback" not in err


def test_bad_model_folders(capsys, tmp_path, model_dir):
    (tmp_path / "notes.txt").write_text("not a model")
    cases = [(tmp_path, "no config.json"), (tmp_path / "missing", "does not exist"),
             (tmp_path / "notes.txt", "is a file, not a model folder")]
    other = tmp_path / "other"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    cases.append((other, "not a nanoebm one"))
    no_tokenizer = Path(shutil.copytree(model_dir, tmp_path / "no-tokenizer"))
    (no_tokenizer / "vocab.json").unlink()
    cases.append((no_tokenizer, "vocab.json is missing"))
    for folder, message in cases:
        code, _, err = run(capsys, "--model_name_or_path", folder)
        assert code == 2 and message in err, (folder, err)
    code, _, err = run(capsys, "--prompt", "x")
    assert code == 2 and "--model_name_or_path" in err


@pytest.mark.slow
def test_bad_input_in_a_subprocess_has_no_traceback(model_dir, tmp_path):
    done = subprocess_run("--model_name_or_path", tmp_path, "--prompt", "x")
    assert done.returncode == 2 and "no config.json" in done.stderr and "Traceback" not in done.stderr
    done = subprocess_run("--model_name_or_path", model_dir, "--prompt", "naïve")
    assert done.returncode == 2 and "'ï'" in done.stderr and "--unk_token" in done.stderr
    assert "Traceback" not in done.stderr
    # a mistyped flag is bad input (2), never the status of diverged thinking (1)
    done = subprocess_run("--model_name_or_path", model_dir, "--tmperature", "2")
    assert done.returncode == 2 and "did you mean --temperature" in done.stderr and "Traceback" not in done.stderr
    done = subprocess_run(f"checkpoint={model_dir}", "sampel=true")
    assert done.returncode == 2 and "did you mean 'sample'" in done.stderr and "Traceback" not in done.stderr


def damage_weights(folder, how):
    """Spoil the model.safetensors of a saved model folder (a copy: the module's model_dir stays intact)."""
    weights = folder / "model.safetensors"
    data = weights.read_bytes()
    if how == "missing":
        weights.unlink()
    elif how == "empty":
        weights.write_bytes(b"")
    elif how == "truncated":  # an interrupted copy or save: the header promises more bytes than there are
        weights.write_bytes(data[:len(data) // 2])
    elif how == "random":  # overwritten: the size is right, nothing else
        weights.write_bytes(random.Random(0).randbytes(len(data)))
    else:
        raise ValueError(how)
    return folder


@pytest.mark.parametrize("how", ["empty", "truncated", "random", "missing"])
def test_damaged_weights_are_one_message(capsys, tmp_path, model_dir, how):
    folder = damage_weights(Path(shutil.copytree(model_dir, tmp_path / "model")), how)
    code, out, err = run(capsys, "--model_name_or_path", folder, "--prompt", "ROMEO:", "--max_new_tokens", 5)
    assert code == 2, err
    assert out == "" and "Traceback" not in err
    assert err.count("error:") == 1 and len(err.strip().splitlines()) == 1, err  # one message, one line
    assert str(folder / "model.safetensors") in err
    assert "save_pretrained" in err and "retrain" in err  # what to do about it
    code, _, err = run(capsys, "--compare", folder, "--eval_blocks", 1, "--max_new_tokens", 2)  # compare mode too
    assert code == 2 and "model.safetensors" in err and "Traceback" not in err


@pytest.mark.slow
def test_damaged_weights_in_a_subprocess_print_one_line(model_dir, tmp_path):
    """The whole stderr of the process (transformers' own logging included) is the one message."""
    folder = damage_weights(Path(shutil.copytree(model_dir, tmp_path / "model")), "truncated")
    done = subprocess_run("--model_name_or_path", folder, "--prompt", "x")
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.startswith("run_generate.py: error: ") and len(done.stderr.strip().splitlines()) == 1, (
        done.stderr)
    assert "model.safetensors" in done.stderr and "Traceback" not in done.stderr


def test_tokenizer_with_more_characters_than_the_model(capsys, tmp_path, tokenizer):
    """Characters are counted (tokenizer.vocab_size), not the pad token, whose id lies outside the vocabulary."""
    folder = save(make_model(vocab_size=tokenizer.vocab_size - 5), tokenizer, tmp_path / "small")
    code, _, err = run(capsys, "--model_name_or_path", folder, "--prompt", "x")
    assert code == 2 and f"the tokenizer has {tokenizer.vocab_size} characters but the model only" in err


@pytest.mark.slow
def test_help_and_imports_stay_light():
    """--help needs no torch, and the helper modules import neither torch nor run_generate (no import cycle)."""
    script = (
        "import sys\n"
        "import nanoebm.analysis, nanoebm.compare, nanoebm.plots\n"
        "assert 'run_generate' not in sys.modules\n"
        "heavy = {'torch', 'transformers', 'matplotlib'} & set(sys.modules)\n"
        "assert not heavy, heavy\n"
        "from run_generate import main\n"
        "assert main(['--help']) == 0\n"
        "assert 'matplotlib' not in sys.modules\n"
        # transformers' argument parser imports torch in some releases (5.0 does): torch only if it does
        "import subprocess\n"
        "parser_alone = subprocess.run([sys.executable, '-c', 'import sys; from transformers import HfArgumentParser; "
        "print(\"torch\" in sys.modules)'], capture_output=True, text=True).stdout.strip() == 'True'\n"
        "assert 'torch' not in sys.modules or parser_alone\n"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "--model_name_or_path" in done.stdout


@pytest.mark.slow
def test_compare_prints_only_the_table_on_stdout(model_dir):
    """In a fresh process with WANDB_MODE=offline, importing the Trainer prints an info line; it must not land in
    the table a user pipes somewhere."""
    env = dict(os.environ, WANDB_MODE="offline", HF_HUB_OFFLINE="1")
    done = subprocess.run([sys.executable, str(ROOT / "run_generate.py"), "--compare", str(model_dir), "--eval_blocks",
                           "3", "--max_new_tokens", "4", "--reading_chars", "100"], capture_output=True, text=True,
                          env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.startswith("| model"), done.stdout[:300]


def test_compare_without_corpus_names_the_paths_tried(capsys, tmp_path, model_dir):
    missing = tmp_path / "nowhere.txt"
    code, _, err = run(capsys, "--compare", model_dir, "--data_path", missing)
    assert code == 2 and str(missing) in err and "--data_path" in err and "Traceback" not in err


def test_resolve_data_path(tmp_path, monkeypatch):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("hello")
    assert resolve_data_path(corpus) == corpus
    (tmp_path / "tinyshakespeare.txt").write_text("hello")
    assert resolve_data_path(tmp_path) == tmp_path / "tinyshakespeare.txt"  # a folder: the corpus inside it
    monkeypatch.setenv("NANOEBM_DATA", str(corpus))
    assert resolve_data_path() == corpus
    monkeypatch.setenv("NANOEBM_DATA", str(tmp_path / "gone.txt"))
    with pytest.raises(FileNotFoundError, match="gone.txt"):
        resolve_data_path()  # an explicit choice is never silently replaced by a default
    monkeypatch.delenv("NANOEBM_DATA")
    assert resolve_data_path() == EMBEDDED_CORPUS  # no flag, no variable: the corpus that ships with nanoebm
    assert EMBEDDED_CORPUS.stat().st_size == 1_115_394


def test_help_explains_every_flag(capsys):
    code, out, _ = run(capsys, "--help")
    assert code == 0
    for flag in ("--model_name_or_path", "--prompt", "--prompt_file", "--max_new_tokens", "--use_thinking",
                 "--no_thinking", "--think_steps", "--think_lr", "--do_sample", "--top_k", "--temperature", "--top_p",
                 "--seed", "--num_return_sequences", "--num_candidates", "--select", "--stream", "--device",
                 "--unk_token", "--plot", "--plot_position", "--output_json", "--compare", "--data_path",
                 "--eval_blocks", "--output_dir", "sample_top_p=P", "checkpoint=DIR"):
        assert flag in out, flag


# ---------------------------------------------------------------------------------------------------------------
# beam search, repetition control and the weights' precision (--num_beams, --repetition_penalty,
# --no_repeat_ngram_size, --dtype)

DECODING_FLAGS = dict(num_beams=3, repetition_penalty=1.3, no_repeat_ngram_size=3)


def test_beam_search_and_repetition_flags_reach_generate(capsys, model_dir, loaded, tokenizer, tmp_path):
    ids = tokenizer("ROMEO:", return_tensors="pt")["input_ids"]

    def reference(**kw):
        return tokenizer.decode(loaded.generate(ids, max_new_tokens=30, do_sample=False, **kw)[0, ids.shape[1]:])

    expected = reference(**DECODING_FLAGS)
    for name in DECODING_FLAGS:  # each flag changes the text: matching `expected` proves all three arrived
        assert reference(**{k: v for k, v in DECODING_FLAGS.items() if k != name}) != expected, name
    out_json = tmp_path / "beams.json"
    code, out, err = run(capsys, "--model_name_or_path", model_dir, "--prompt", "ROMEO:", "--max_new_tokens", 30,
                         "--num_beams", 3, "--repetition_penalty", 1.3, "--no_repeat_ngram_size", 3,
                         "--device", "cpu", "--output_json", out_json)
    assert code == 0, err
    record = json.loads(out_json.read_text(encoding="utf-8"))
    assert record["text"] == expected
    assert out == "ROMEO:" + expected + "\n"  # beams cannot stream: printed once at the end
    assert "beam search (3 beams)" in err and "repetition_penalty=1.3" in err
    assert {k: record["settings"][k] for k in DECODING_FLAGS} == DECODING_FLAGS
    text = "ROMEO:" + expected
    trigrams = [text[i:i + 3] for i in range(len(text) - 2)]
    assert len(trigrams) == len(set(trigrams))


def test_several_beams_are_returned_without_sampling(capsys, tmp_path, model_dir, loaded, tokenizer):
    record, out, err = generate_json(capsys, tmp_path, model_dir, "--prompt", "ROMEO:", "--max_new_tokens", 20,
                                     "--num_beams", 3, "--num_return_sequences", 2)
    ids = tokenizer("ROMEO:", return_tensors="pt")["input_ids"]
    beams = loaded.generate(ids, max_new_tokens=20, do_sample=False, num_beams=3, num_return_sequences=2)
    assert [s["text"] for s in record["samples"]] == [tokenizer.decode(row[ids.shape[1]:]) for row in beams]
    assert "sample 2/2" in out


def chosen_energies(model, tokenizer, text, prompt_len):
    ids = torch.tensor([tokenizer(text)["input_ids"]])
    with torch.no_grad():
        energies = model(ids, use_cache=False).energies[0, prompt_len - 1:-1]
    return energies.gather(-1, ids[0, prompt_len:, None])[:, 0].float()


def test_dtype_loads_the_weights_in_that_precision(capsys, model_dir, loaded, tokenizer, tmp_path):
    from transformers import AutoModelForCausalLM

    out_json = tmp_path / "bf16.json"
    code, _, err = run(capsys, "--model_name_or_path", model_dir, "--prompt", "ROMEO:", "--max_new_tokens", 20,
                       "--dtype", "bfloat16", "--device", "cpu", "--output_json", out_json)
    assert code == 0, err
    assert "in bfloat16" in err
    record = json.loads(out_json.read_text(encoding="utf-8"))
    assert record["settings"]["dtype"] == "bfloat16"
    half = AutoModelForCausalLM.from_pretrained(model_dir, trust_remote_code=True, dtype=torch.bfloat16).eval()
    assert half.dtype == torch.bfloat16
    text = "ROMEO:" + record["text"]
    reported = torch.tensor([t["energy"] for t in record["tokens"]])
    in_half = chosen_energies(half, tokenizer, text, 6)
    in_full = chosen_energies(loaded, tokenizer, text, 6)
    # the energies the CLI reports are those of bfloat16 weights, measurably not those of float32 ones
    assert (reported - in_half).abs().max() < 0.25 * (reported - in_full).abs().max()
    assert (reported - in_full).abs().max() > 1e-3


@pytest.mark.parametrize("argv, message", [
    (["--num_beams", "0"], "--num_beams must be >= 1 (got 0)"),
    (["--repetition_penalty", "0"], "--repetition_penalty must be > 0 (got 0.0)"),
    (["--repetition_penalty", "-1.5"], "--repetition_penalty must be > 0 (got -1.5)"),
    (["--no_repeat_ngram_size", "-1"], "--no_repeat_ngram_size must be >= 0 (got -1)"),
    (["--dtype", "fp8"], "--dtype must be one of auto, float32, bfloat16, float16 (got 'fp8')"),
    (["--num_beams", "2", "--num_return_sequences", "3"], "--num_return_sequences 3 is more than --num_beams 2"),
    (["--num_beams", "2", "--num_candidates", "3"], "use either --num_beams"),
])
def test_bad_decoding_flags(capsys, tmp_path, model_dir, argv, message):
    out_json = tmp_path / "never.json"
    code, out, err = run(capsys, "--model_name_or_path", model_dir, "--output_json", out_json, *argv)
    assert code == 2 and message in err and "Traceback" not in err
    assert err.count("\n") == 1 and out == "" and not out_json.exists()


@pytest.mark.slow
def test_bad_decoding_flag_in_a_subprocess_is_one_line(model_dir):
    done = subprocess_run("--model_name_or_path", model_dir, "--dtype", "half")
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.splitlines() == ["run_generate.py: error: --dtype must be one of auto, float32, bfloat16, "
                                        "float16 (got 'half')"]


def test_help_explains_the_decoding_flags(capsys):
    code, out, _ = run(capsys, "--help")
    assert code == 0
    for flag in ("--num_beams", "--repetition_penalty", "--no_repeat_ngram_size", "--dtype"):
        assert flag in out, flag


# ---------------------------------------------------------------------------------------------------------------
# --compare says what each model trained on


def train_tiny(corpus, out):
    import run_train

    run_train.main(["--preset", "cpu", "--n_layer", "1", "--n_head", "2", "--n_embd", "32", "--block_size", "32",
                    "--per_device_train_batch_size", "4", "--eval_blocks", "2", "--eval_reading_chars", "200",
                    "--max_steps", "2", "--report_to",
                    "none", "--disable_tqdm", "true", "--dataloader_num_workers", "0", "--save_steps", "1000",
                    "--data_path", str(corpus), "--output_dir", str(out)])
    return out


def test_compare_labels_what_each_model_trained_on(capsys, tmp_path, model_dir, corpus_text):
    shakespeare, reversed_lines = tmp_path / "shakespeare.txt", tmp_path / "reversed.txt"
    shakespeare.write_text(corpus_text[:20000], encoding="utf-8")
    reversed_lines.write_text("\n".join(corpus_text[:20000].splitlines()[::-1]), encoding="utf-8")  # same characters
    here, other = train_tiny(shakespeare, tmp_path / "here"), train_tiny(reversed_lines, tmp_path / "other")
    capsys.readouterr()  # the training runs' own output
    out_json = tmp_path / "compare.json"
    code, out, err = run(capsys, "--compare", here, other, model_dir, "--data_path", shakespeare, "--eval_blocks", 2,
                         "--max_new_tokens", 4, "--output_json", out_json)
    assert code == 0, err
    rows = {r["model"]: r for r in json.loads(out_json.read_text(encoding="utf-8"))["models"]}
    assert (rows["here"]["on_this_text"], rows["other"]["on_this_text"], rows[model_dir.name]["on_this_text"]) == (
        True, False, None)
    assert rows["other"]["trained_on"] == str(reversed_lines)
    table = {line.split(" | ")[0][2:]: line.split(" | ")[1] for line in out.splitlines()[2:]}
    assert table == {"here": "this text", "other": f"other: {reversed_lines}",
                     model_dir.name: "? unknown (no nanoebm_run.json)"}
    warnings = [line for line in err.splitlines() if "warning:" in line]
    assert len(warnings) == 2 and "other trained on" in warnings[0] and "not on this text" in warnings[0]
    assert f"{model_dir.name} trained on unknown" in warnings[1]


def write_record(folder, *argvs):
    folder.mkdir()
    runs = [{"command": "python run_train.py", "argv": argv} for argv in argvs]
    (folder / "nanoebm_run.json").write_text(json.dumps({"runs": runs}), encoding="utf-8")
    return folder


def test_training_text_reads_the_whole_lineage(tmp_path, monkeypatch):
    from nanoebm.compare import training_text

    corpus = tmp_path / "a.txt"
    corpus.write_text("hello")
    (tmp_path / "b.txt").write_text("other")
    monkeypatch.delenv("NANOEBM_DATA", raising=False)
    cases = {
        "file": ([["--data_path", str(corpus)]], str(corpus), True),
        "equals": ([[f"--data_path={corpus}"]], str(corpus), True),
        "continued": ([["--data_path", str(corpus)], ["--data_path", str(tmp_path / "b.txt")]],
                      f"{corpus} then {tmp_path / 'b.txt'}", False),
        "dataset": ([["--dataset_name", "data/jsonl"]], "data set data/jsonl", False),
        "gone": ([["--data_path", "relative/where/training/ran.txt"]], "relative/where/training/ran.txt", None),
        "default": ([["--max_steps", "5"]], "the default corpus ($NANOEBM_DATA or the tiny Shakespeare)", False),
    }
    for name, (argvs, label, verdict) in cases.items():
        assert training_text(write_record(tmp_path / name, *argvs), corpus) == dict(
            trained_on=label, on_this_text=verdict), name
    # the default corpus is the one the same resolution finds here
    monkeypatch.setenv("NANOEBM_DATA", str(corpus))
    assert training_text(tmp_path / "default", corpus)["on_this_text"] is True


# ---------------------------------------------------------------------------------------------------------------
# the energy bowl picture: the title and the shading speak of the same per-logit trust region; names never overlap


def drawn_bowl(bowl):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from nanoebm.plots import _plot_bowl

    fig, ax = plt.subplots(figsize=(5.5, 4))
    _plot_bowl(ax, bowl)
    fig.canvas.draw()
    return fig, ax, fig.canvas.get_renderer()


@pytest.mark.parametrize("steps, lr", [(4, 3.0), (12, 40.0)])
def test_energy_bowl_title_and_shading_agree_and_names_do_not_overlap(loaded, tokenizer, corpus_text, steps, lr):
    import matplotlib.pyplot as plt
    from matplotlib.text import Text

    from nanoebm.analysis import energy_bowl
    from nanoebm.plots import move_summary

    ids = torch.tensor([tokenizer(corpus_text[:40])["input_ids"]])
    bowl = energy_bowl(loaded, ids, target=30, window_start=0, think_steps=steps, think_lr=lr)
    fig, ax, renderer = drawn_bowl(bowl)
    names = [t for t in ax.texts if t.get_text().startswith("v")]
    assert names[0].get_text() in {f"v{k}" for k in range(steps)} | {f"vK=v{steps}"}
    boxes = [Text.get_window_extent(t, renderer) for t in names]  # the names alone, without their lines
    for i, a in enumerate(boxes):
        for b in boxes[i + 1:]:
            assert not a.overlaps(b), [t.get_text() for t in names]
    # the title reports the largest move of one logit, the quantity the trust region bounds
    limit = loaded.config.think_max_move
    with torch.no_grad():
        out = loaded(ids[:, :30], use_cache=False, think_steps=steps, think_lr=lr)
        v0 = loaded.initial_logits(out.energies[:, -1:])
    vK = out.logits[:, -1:].float()
    move = float((vK - vK.mean(-1, keepdim=True) - v0).abs().max())
    assert bowl["max_move"] == pytest.approx(move, rel=1e-4)
    assert move_summary(bowl) == f"max_y |vK - v0| = {move:.3g} (trust region {limit:.3g} per logit)"
    shaded = [p.get_window_extent(renderer).transformed(ax.transData.inverted()) for p in ax.patches]
    if steps == 12:  # the descent pressed against the trust region: shading from where some logit leaves it
        assert bowl["trust_t"] == pytest.approx(limit / move, rel=1e-4) and bowl["trust_t"] < bowl["ts"][-1]
        assert [round(box.x0, 4) for box in shaded] == [round(bowl["trust_t"], 4)]
        assert any(f"think_max_move = {limit:.3g}" in t.get_text() for t in ax.get_legend().get_texts())
    else:
        assert bowl["trust_t"] > bowl["ts"][-1] and not shaded
    plt.close(fig)


# models whose outputs are more than the tokenizer's characters: sized len(tokenizer), resized, added tokens


def favouring(vocab_size, *ids):
    """An untrained model of `vocab_size` outputs whose lowest energy, everywhere, is at `ids`."""
    model = make_model(vocab_size=vocab_size)
    with torch.no_grad():
        model.energy_head.token_bias[list(ids)] = -30.0
    return model


def test_model_sized_len_tokenizer_generates_plots_and_json(capsys, tmp_path, tokenizer):
    """vocab_size=len(tokenizer), the pad the model's favourite and named nowhere in the folder: run_generate passes
    the tokenizer's pad id, so no '<pad>' is generated; the pictures and the JSON index tokens. Before, '<pad>' was
    generated and plot_kl_strip failed with IndexError (it indexed the characters of the decoded text)."""
    pad = tokenizer.pad_token_id
    folder = save(favouring(len(tokenizer), pad), tokenizer, tmp_path / "sized-len-tokenizer")
    assert len(tokenizer) == 66 and json.loads((folder / "config.json").read_text())["vocab_size"] == 66
    plots, out_json = tmp_path / "plots", tmp_path / "sample.json"
    code, _, err = run(capsys, "--model_name_or_path", folder, "--prompt", "ROMEO:", "--max_new_tokens", 30,
                       "--device", "cpu", "--no_stream", "--plot", plots, "--output_json", out_json)
    assert code == 0 and "Traceback" not in err, err[-3000:]
    for name in ("energy_trace.png", "thinking_at_position.png", "kl_strip.png", "energy_descent.png"):
        assert_png(plots / name)
    record = json.loads(out_json.read_text(encoding="utf-8"))
    assert "<pad>" not in record["text"] and len(record["tokens"]) == 30
    assert all(t["id"] != pad for t in record["tokens"])
    assert "".join(t["char"] for t in record["tokens"]) == record["text"]


@pytest.mark.parametrize("added", [True, False])
def test_tokens_longer_than_a_character_and_ids_the_tokenizer_lacks(capsys, tmp_path, corpus_text, added):
    """added: a token of three characters (add_tokens, then a model sized len(tokenizer)) is generated, and the JSON
    and the pictures index it once. Not added: a model resized past the tokenizer never generates the id the tokenizer
    cannot decode (before: ValueError 'id 66 is outside the vocabulary', a traceback)."""
    from tokenization_char import CharTokenizer

    tok = CharTokenizer.from_corpus(corpus_text)
    if added:
        tok.add_tokens(["<x>"])
    characters = tok.vocab_size
    favourite = characters + 1  # 66: the added token, or an id the tokenizer lacks
    folder = save(favouring(67, tok.pad_token_id, favourite), tok, tmp_path / "model")
    record, _, err = generate_json(capsys, tmp_path, folder, "--prompt", "ROMEO:", "--max_new_tokens", 12,
                                   "--no_stream", "--plot", tmp_path / "plots", "--plot_position", -1)
    ids = [t["id"] for t in record["tokens"]]
    assert len(ids) == 12 and "".join(t["char"] for t in record["tokens"]) == record["text"]
    if added:
        assert ids == [favourite] * 12 and record["text"] == "<x>" * 12
    else:
        assert all(i < characters for i in ids)
    assert_png(tmp_path / "plots" / "kl_strip.png")
    assert_png(tmp_path / "plots" / "thinking_at_position.png")


def test_generate_learning_while_reading(capsys, model_dir, corpus_text):
    """A prompt longer than the block, read with learning, continued by the adapted weights (and learning from its
    own output), streamed once."""
    prompt = corpus_text[1000:1100]
    code, out, err = run(capsys, "--model_name_or_path", model_dir, "--prompt", prompt, "--max_new_tokens", 40,
                         "--use_adaptation", "true", "--adapt_lr", 0.01, "--adapt_rule", "sgd", "--adapt_window", 16,
                         "--adapt_on_output", "true")
    assert code == 0, err
    assert out.startswith(prompt) and len(out) == len(prompt) + 40 + 1  # streamed once, then a newline
    assert "learning while reading (adapt_lr=0.01, a window of 16 characters, from its own output too)" in err


@pytest.mark.parametrize("flag, value", [("--adapt_window", 999), ("--adapt_params", "attention"),
                                         ("--adapt_lr", -1), ("--adapt_rule", "adam")])
def test_bad_learning_flags_are_one_line(capsys, model_dir, flag, value):
    code, _, err = run(capsys, "--model_name_or_path", model_dir, "--prompt", "x", "--use_adaptation", "true",
                       flag, value)
    assert code == 2 and flag in err and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
