"""The HF surface: save_pretrained -> Auto classes with trust_remote_code from a folder alone, and pipeline."""

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


def test_round_trip_through_trust_remote_code_in_a_clean_process(saved, tmp_path):
    """Load in a subprocess whose cwd and sys.path know nothing of this checkout: same weights, same text."""
    folder, model, tokenizer = saved
    prompt = "ROMEO:"
    ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
    expected = tokenizer.decode(model.generate(ids, max_new_tokens=20, do_sample=False, think_steps=3)[0])
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
        hidden = base(ids).last_hidden_state
        same_hidden = torch.allclose(hidden, lm.transformer(ids).last_hidden_state)
        print(json.dumps(dict(text=text, cls=type(lm).__name__, base=type(base).__name__, same_hidden=same_hidden,
                              weights={{k: v.sum().item() for k, v in lm.state_dict().items()}})))
    """)
    done = run_without_nanoebm(script, cwd=tmp_path, modules_cache=tmp_path / "modules")
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["cls"] == "NanoEBMForCausalLM" and result["base"] == "NanoEBMModel" and result["same_hidden"]
    assert result["text"] == expected
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
