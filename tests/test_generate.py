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

from conftest import ROOT, make_model, train_briefly
from tokenization_char import CharTokenizer

from nanoebm.analysis import score_continuations
from nanoebm.corpus import EMBEDDED_CORPUS, fixed_blocks, resolve_data_path, validation_text
from run_generate import main

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


@pytest.fixture(scope="module")
def loaded(model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir, trust_remote_code=True).eval()


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


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


def test_cli_subprocess_streams_and_writes_json(model_dir, tmp_path):
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
        assert math.isfinite(token["energy"]) and math.isfinite(token["energy_gap"]) and token["kl"] >= 0
    # thinking descends the expected energy: the gap J0 - JK is positive on average
    assert record["summary"]["mean_energy_gap"] > 0


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
                         "--plot", tmp_path / "plots", "--output_json", out_json)
    assert code == 0, err
    assert "bpc System 1" in out and model_dir.name in out and linear_dir.name in out
    rows = json.loads(out_json.read_text(encoding="utf-8"))["models"]
    assert [r["landscape"] for r in rows] == ["mixture", "linear"]
    for r in rows:
        assert 0 < r["bpc_system1"] < 10 and 0 < r["bpc_system2"] < 10
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


def test_compare_prints_only_the_table_on_stdout(model_dir):
    """In a fresh process with WANDB_MODE=offline, importing the Trainer prints an info line; it must not land in
    the table a user pipes somewhere."""
    env = dict(os.environ, WANDB_MODE="offline", HF_HUB_OFFLINE="1")
    done = subprocess.run([sys.executable, str(ROOT / "run_generate.py"), "--compare", str(model_dir), "--eval_blocks",
                           "3", "--max_new_tokens", "4"], capture_output=True, text=True, env=env, timeout=300)
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
# models whose outputs are more than the tokenizer's characters: sized len(tokenizer), resized, added tokens


def favouring(vocab_size, *ids):
    """An untrained model of `vocab_size` outputs whose lowest energy, everywhere, is at `ids`."""
    model = make_model(vocab_size=vocab_size)
    with torch.no_grad():
        model.energy_head.token_bias[list(ids)] = -30.0
    return model


def test_model_sized_len_tokenizer_generates_plots_and_json_in_a_subprocess(tmp_path, tokenizer):
    """vocab_size=len(tokenizer), the pad the model's favourite and named nowhere in the folder: run_generate passes
    the tokenizer's pad id, so no '<pad>' is generated; the pictures and the JSON index tokens. Before, '<pad>' was
    generated and plot_kl_strip failed with IndexError (it indexed the characters of the decoded text)."""
    pad = tokenizer.pad_token_id
    folder = save(favouring(len(tokenizer), pad), tokenizer, tmp_path / "sized-len-tokenizer")
    assert len(tokenizer) == 66 and json.loads((folder / "config.json").read_text())["vocab_size"] == 66
    plots, out_json = tmp_path / "plots", tmp_path / "sample.json"
    done = subprocess_run("--model_name_or_path", folder, "--prompt", "ROMEO:", "--max_new_tokens", 30, "--device",
                          "cpu", "--no_stream", "--plot", plots, "--output_json", out_json)
    assert done.returncode == 0 and "Traceback" not in done.stderr, done.stderr[-3000:]
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
