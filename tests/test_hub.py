"""The HF surface: save_pretrained -> Auto classes with trust_remote_code from a folder alone, and pipeline."""

import contextlib
import json
import os
import textwrap

import pytest
import torch
from transformers import pipeline

from conftest import make_model, run_without_nanoebm, train_briefly
from tokenization_char import CharTokenizer


@pytest.fixture(scope="module")
def saved(tmp_path_factory, corpus_text):
    tokenizer = CharTokenizer.from_corpus(corpus_text)
    ids = torch.tensor(tokenizer(corpus_text[:30000])["input_ids"])
    # lambda < tau: thinking sharpens, so it visibly changes what is sampled even after a few training steps
    model = train_briefly(make_model(landscape="mixture", think_lr=1.0, entropy_weight=0.1), ids, steps=30)
    folder = tmp_path_factory.mktemp("nanoebm-model")
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder, model, tokenizer


def test_saved_folder_is_complete(saved):
    folder, _, _ = saved
    names = set(os.listdir(folder))
    assert {"config.json", "model.safetensors", "configuration_nanoebm.py", "modeling_nanoebm.py",
            "tokenization_char.py", "vocab.json", "tokenizer_config.json"} <= names
    auto_map = json.loads((folder / "config.json").read_text())["auto_map"]
    assert set(auto_map) >= {"AutoConfig", "AutoModel", "AutoModelForCausalLM"}


@pytest.mark.slow
def test_round_trip_through_trust_remote_code_in_a_clean_process(saved, tmp_path):
    """Load in a subprocess whose cwd and sys.path know nothing of this checkout: same weights, same text."""
    folder, model, tokenizer = saved
    prompt = "ROMEO:"
    ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
    expected = tokenizer.decode(model.generate(ids, max_new_tokens=20, do_sample=False, think_steps=3)[0])
    learning = dict(use_adaptation=True, adapt_lr=0.03, adapt_rule="sgd", adapt_window=4, max_new_tokens=20,
                    do_sample=False)
    expected_adapted = tokenizer.decode(model.generate(ids, **learning)[0])
    weights = {k: v.sum().item() for k, v in model.state_dict().items()}
    script = textwrap.dedent(f"""
        import json, sys, torch
        try:
            import modeling_nanoebm
            raise SystemExit("nanoebm must not be importable here")
        except ImportError:
            pass
        from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer
        folder = {str(folder)!r}
        tok = AutoTokenizer.from_pretrained(folder, trust_remote_code=True)
        lm = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)
        base = AutoModel.from_pretrained(folder, trust_remote_code=True)
        ids = tok({prompt!r}, return_tensors="pt")["input_ids"]
        text = tok.decode(lm.generate(ids, max_new_tokens=20, do_sample=False, think_steps=3)[0])
        from transformers import pipeline
        adapted = pipeline("text-generation", model=lm, tokenizer=tok)({prompt!r}, **{learning!r})
        hidden = base(ids).last_hidden_state
        same_hidden = torch.allclose(hidden, lm.transformer(ids).last_hidden_state)
        print(json.dumps(dict(text=text, adapted=adapted[0]["generated_text"],
                              cls=type(lm).__name__, base=type(base).__name__, same_hidden=same_hidden,
                              weights={{k: v.sum().item() for k, v in lm.state_dict().items()}})))
    """)
    done = run_without_nanoebm(script, cwd=tmp_path, modules_cache=tmp_path / "modules")
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["cls"] == "NanoEBMForCausalLM" and result["base"] == "NanoEBMModel" and result["same_hidden"]
    assert result["text"] == expected
    assert result["adapted"] == expected_adapted != expected  # learning while reading, through a pipeline
    assert result["weights"].keys() == weights.keys()
    assert all(abs(result["weights"][k] - weights[k]) < 1e-4 for k in weights)


def test_pipeline_reaches_the_thinking_loop(saved):
    folder, model, tokenizer = saved
    generator = pipeline("text-generation", model=str(folder), trust_remote_code=True)
    kw = dict(max_new_tokens=40, do_sample=True, return_full_text=False)

    def sample(call, **options):
        torch.manual_seed(0)
        return call(**options)

    thinking = sample(lambda **o: generator("ROMEO:", **o)[0]["generated_text"], think_steps=8, think_lr=4.0, **kw)
    system1 = sample(lambda **o: generator("ROMEO:", **o)[0]["generated_text"], use_thinking=False, **kw)
    assert thinking != system1  # thinking changed the distribution that was sampled
    # count the landscape evaluations: the mixture correction's activation runs once per thinking step of every
    # decoded token (its layers are folded with the vocabulary, so the Linear modules themselves are not called)
    calls = []
    hook = generator.model.energy_head.mixture[1].register_forward_hook(lambda *args: calls.append(1))
    try:
        generator("ROMEO:", think_steps=5, max_new_tokens=3, do_sample=False)
    finally:
        hook.remove()
    assert len(calls) == 5 * 3
    sampled = generator("ROMEO:", think_steps=4, top_k=64, do_sample=True, temperature=1.2, top_p=0.9,
                        max_new_tokens=10, return_full_text=False)[0]["generated_text"]
    assert len(sampled) == 10


# -- vocabulary resizing round trip, and the modes of a saved folder's files -----------------------------------

@pytest.mark.slow
def test_resized_model_round_trips_through_trust_remote_code(saved, tmp_path):
    """resize_token_embeddings(len(tokenizer) + 1) resizes every tensor sized by the vocabulary and config.vocab_size;
    the saved folder loads in a clean process, generates the same ids, and its energy head has the new size."""
    from transformers import AutoModelForCausalLM

    folder, _, tokenizer = saved
    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()
    model.resize_token_embeddings(len(tokenizer) + 1)
    resized = tmp_path / "resized"
    model.save_pretrained(resized)
    tokenizer.save_pretrained(resized)
    assert json.loads((resized / "config.json").read_text())["vocab_size"] == len(tokenizer) + 1 == 67
    ids = tokenizer("ROMEO:", return_tensors="pt")["input_ids"]
    expected = model.generate(ids, max_new_tokens=20, do_sample=False)[0]
    script = textwrap.dedent(f"""
        import json
        from transformers import AutoModelForCausalLM, AutoTokenizer
        tok = AutoTokenizer.from_pretrained({str(resized)!r}, trust_remote_code=True)
        lm = AutoModelForCausalLM.from_pretrained({str(resized)!r}, trust_remote_code=True)
        ids = tok("ROMEO:", return_tensors="pt")["input_ids"]
        out = lm.generate(ids, max_new_tokens=20, do_sample=False)[0]
        bias = lm.energy_head.token_bias.detach()
        print(json.dumps(dict(ids=out.tolist(), vocab=lm.config.vocab_size, wte=lm.transformer.wte.weight.shape[0],
                              bias=bias.shape[0], new_bias=bias[-2:].tolist())))
    """)
    done = run_without_nanoebm(script, cwd=tmp_path, modules_cache=tmp_path / "modules")
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["ids"] == expected.tolist()
    assert result["vocab"] == result["wte"] == result["bias"] == 67
    mean = float(model.energy_head.token_bias.detach()[:65].mean())
    assert result["new_bias"] == pytest.approx([mean, mean], abs=1e-6)


def file_modes(folder):
    return {str(p.relative_to(folder)): p.stat().st_mode & 0o777 for p in folder.rglob("*") if p.is_file()}


@contextlib.contextmanager
def umask(mask):
    previous = os.umask(mask)
    try:
        yield
    finally:
        os.umask(previous)


@pytest.mark.parametrize("mask, mode", [(0o022, 0o644), (0o077, 0o600)])
def test_save_pretrained_files_follow_the_umask(tmp_path, mask, mode):
    """safetensors writes the weights through a temporary file created 0600: model.safetensors was private while the
    folder's other files were readable to all. Every file now gets what the umask gives; a replaced file keeps the
    mode its owner gave it."""
    folder = tmp_path / "model"
    with umask(mask):
        make_model().save_pretrained(folder)
        CharTokenizer.from_corpus("abc").save_pretrained(folder)
    modes = file_modes(folder)
    assert "model.safetensors" in modes and set(modes.values()) == {mode}, modes
    os.chmod(folder / "model.safetensors", 0o640)
    with umask(mask):
        make_model(seed=1).save_pretrained(folder)
    assert file_modes(folder)["model.safetensors"] == 0o640


@pytest.mark.parametrize("mask, mode", [(0o022, 0o644), (0o077, 0o600)])
def test_run_train_folders_follow_the_umask(tmp_path, corpus_text, mask, mode):
    """Trainer.save_model and its checkpoints write through save_pretrained: a tiny run_train run's folder, and its
    checkpoint, hold no file the umask would not give."""
    import run_train

    corpus = tmp_path / "corpus.txt"
    corpus.write_text(corpus_text[:20000])
    out = tmp_path / "out"
    with umask(mask):
        run_train.main(["--preset", "cpu", "--n_layer", "1", "--n_head", "2", "--n_embd", "16", "--block_size", "16",
                        "--per_device_train_batch_size", "4", "--eval_blocks", "2", "--eval_reading_chars", "200",
                        "--max_steps", "2",
                        "--save_steps", "1", "--keep_checkpoints", "true", "--report_to", "none",
                        "--disable_tqdm", "true", "--dataloader_num_workers", "0", "--data_path", str(corpus),
                        "--output_dir", str(out)])
    modes = file_modes(out)
    assert "model.safetensors" in modes and any("checkpoint-" in name and name.endswith("model.safetensors")
                                                for name in modes)
    assert set(modes.values()) == {mode}, modes
