"""Folders saved on an earlier day keep working with the installed transformers.

tests/fixtures/frozen/ holds tiny folders saved by `save_pretrained` (each carries the nanoebm code of its day) and
what they generated then (tests/fixtures/freeze_folder.py made them; they are never regenerated). CI runs this with
the floor, the locked and the newest transformers: a rename upstream that breaks saved folders fails here.
"""

import json
import shutil
import textwrap

import pytest

from conftest import ROOT, run_without_nanoebm

FROZEN = ROOT / "tests" / "fixtures" / "frozen"


@pytest.mark.slow
def test_frozen_folders_load_and_generate_what_they_did_when_saved(tmp_path):
    expected = json.loads((FROZEN / "expected.json").read_text())
    assert set(expected) == {folder.name for folder in FROZEN.iterdir() if folder.is_dir()} and len(expected) >= 2
    for name in expected:
        shutil.copytree(FROZEN / name, tmp_path / name)
    script = textwrap.dedent(f"""
        import json
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer, pipeline

        results = {{}}
        for name, want in json.loads({json.dumps(json.dumps(expected))}).items():
            model = AutoModelForCausalLM.from_pretrained(name, trust_remote_code=True)
            tokenizer = AutoTokenizer.from_pretrained(name, trust_remote_code=True)
            prompt = tokenizer(want["prompt"], return_tensors="pt")["input_ids"]

            def greedy(**kw):
                out = model.generate(prompt, max_new_tokens=want["max_new_tokens"], do_sample=False,
                                     output_scores=True, return_dict_in_generate=True, **kw)
                chosen = out.sequences[0, prompt.shape[1]:]
                logprob = sum(torch.log_softmax(score[0].float(), -1)[token].item()
                              for score, token in zip(out.scores, chosen))
                return tokenizer.decode(chosen), logprob

            scored = tokenizer(want["scored"], return_tensors="pt")["input_ids"]
            with torch.no_grad():
                out = model(scored, think_steps=want["think_steps"])
            nll = lambda logits: torch.nn.functional.cross_entropy(logits[0, :-1], scored[0, 1:]).item()
            generator = pipeline("text-generation", model=model, tokenizer=tokenizer)
            piped = generator(want["prompt"], think_steps=want["think_steps"], max_new_tokens=want["max_new_tokens"],
                              do_sample=False, return_full_text=False)[0]["generated_text"]
            (system1, logprob1) = greedy(use_thinking=False)
            (system2, logprob2) = greedy(think_steps=want["think_steps"])
            results[name] = dict(
                system1=system1, system2=system2, logprob_system1=logprob1, logprob_system2=logprob2,
                system2_uncached=greedy(think_steps=want["think_steps"], use_cache=False)[0], pipeline=piped,
                nll_system1=nll(out.system1_logits), nll_system2=nll(out.logits))
        print(json.dumps(results))
    """)
    done = run_without_nanoebm(script, cwd=tmp_path, modules_cache=tmp_path / "modules")
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads(done.stdout.strip().splitlines()[-1])
    for name, want in expected.items():
        got = results[name]
        assert got["system1"] == want["system1"], name
        assert got["system2"] == got["system2_uncached"] == got["pipeline"] == want["system2"], name
        # the probabilities too: thinking reaches generate's scores and the forward's logits (System 2's numbers
        # differ from System 1's in every folder, see freeze_folder.py)
        for kind in ("logprob_system1", "logprob_system2", "nll_system1", "nll_system2"):
            assert abs(got[kind] - want[kind]) < 1e-3, (name, kind, got[kind], want[kind])
