"""Batched generation equals unbatched generation: left padding with the tokenizer's dedicated pad token, through
`model.generate` and `pipeline("text-generation")`, past block_size, thinking on and off, learned and rotary
positions, with and without the KV cache (real tiny models trained a few steps on the corpus; no mocks)."""

import logging

import pytest
import torch
import transformers
from transformers import AutoTokenizer, pipeline

from conftest import make_model, train_briefly
from tokenization_char import PAD_TOKEN, CharTokenizer

BLOCK = 32  # tiny_config's block_size
NEW = 60  # new tokens: every prompt + NEW runs well past BLOCK, so the decode window slides or restarts
# 3..20 characters, all different lengths, some with spaces (were the pad token a space, decoding would drop them)
PROMPTS = ["ROM", "Be it so", "First Citizen:\n", "Speak, speak.\n\nAll:\n"]
POSITIONS = ("learned", "rope")


@pytest.fixture(scope="module")
def tok(corpus_text):
    return CharTokenizer.from_corpus(corpus_text)


@pytest.fixture(scope="module")
def models(corpus_text, tok):
    """A mixture model per position embedding with an open correction gate, so thinking changes the decode, trained
    just enough (~2 s each) for greedy decoding to write words rather than repeat one character."""
    ids = torch.tensor(tok(corpus_text[:100_000])["input_ids"])
    return {
        pe: train_briefly(
            make_model(position_embedding=pe, landscape="mixture", think_lr=1.0, correction_scale=0.5), ids,
            steps=200, lr=1e-2,
        )
        for pe in POSITIONS
    }


@pytest.fixture
def transformers_warnings(caplog):
    """Warnings of the transformers loggers (which do not propagate to the root logger) in caplog, each fresh."""
    level = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_warning()
    logging.Logger.warning_once.cache_clear()  # a warning_once emitted by an earlier test must show here again
    library = logging.getLogger("transformers")
    library.addHandler(caplog.handler)
    try:
        yield caplog
    finally:
        library.removeHandler(caplog.handler)
        transformers.logging.set_verbosity(level)


def test_prompts_cover_the_cases(tok):
    lengths = [len(p) for p in PROMPTS]
    assert min(lengths) == 3 and max(lengths) == 20 and len(set(lengths)) == len(lengths)
    assert min(lengths) + NEW > BLOCK + BLOCK // 2  # every row passes block_size and a learned window restart
    enc = tok(PROMPTS, padding=True, return_tensors="pt")
    pad = tok.pad_token_id
    assert pad == tok.vocab_size == 65 and tok.padding_side == "left"
    for row, prompt in enumerate(PROMPTS):
        width = enc["input_ids"].shape[1] - len(prompt)
        assert enc["input_ids"][row, :width].eq(pad).all() and enc["attention_mask"][row, :width].eq(0).all()
        assert tok.decode(enc["input_ids"][row], skip_special_tokens=True) == prompt


@pytest.mark.parametrize("use_cache", [True, False], ids=["cache", "no_cache"])
@pytest.mark.parametrize("use_thinking", [True, False], ids=["thinking", "system1"])
@pytest.mark.parametrize("position_embedding", POSITIONS)
def test_padded_generate_equals_one_by_one(models, tok, position_embedding, use_thinking, use_cache):
    model = models[position_embedding]
    assert model.config.vocab_size == tok.vocab_size == len(tok) - 1
    kw = dict(max_new_tokens=NEW, do_sample=False)  # thinking and the cache are on by default
    kw.update({} if use_thinking else dict(use_thinking=False), **({} if use_cache else dict(use_cache=False)))
    enc = tok(PROMPTS, return_tensors="pt", padding=True)
    width = enc["input_ids"].shape[1]
    batched = model.generate(**enc, **kw)
    assert batched.shape == (len(PROMPTS), width + NEW)
    assert torch.equal(batched[:, :width], enc["input_ids"])  # the padded prompts come back untouched
    for row, prompt in enumerate(PROMPTS):
        single = model.generate(**tok(prompt, return_tensors="pt"), **kw)
        assert single.shape == (1, len(prompt) + NEW)
        assert batched[row, width:].tolist() == single[0, len(prompt):].tolist(), (row, prompt)
    new_text = tok.batch_decode(batched[:, width:])
    assert PAD_TOKEN not in "".join(new_text)  # no pad id is ever generated
    # non-trivial text: rows continue differently, and most are more than one repeated character
    assert len(set(new_text)) >= 3 and sum(len(set(text)) >= 2 for text in new_text) >= 3, new_text


def test_thinking_changes_the_greedy_text(models, tok):
    """Guards the thinking-on cases above against silently testing System 1 twice."""
    enc = tok(PROMPTS, return_tensors="pt", padding=True)
    for model in models.values():
        thinking = model.generate(**enc, max_new_tokens=NEW, do_sample=False)
        system1 = model.generate(**enc, max_new_tokens=NEW, do_sample=False, use_thinking=False)
        assert not torch.equal(thinking, system1)


@pytest.mark.parametrize("position_embedding", POSITIONS)
def test_batched_pipeline_equals_unbatched(models, tok, position_embedding, transformers_warnings):
    model = models[position_embedding]
    assert getattr(model.config, "max_position_embeddings", None) is None  # nothing caps max_length at block_size
    pipe = pipeline("text-generation", model=model, tokenizer=tok, batch_size=3)
    kw = dict(max_new_tokens=NEW, do_sample=False)
    single = [pipe(prompt, **kw)[0]["generated_text"] for prompt in PROMPTS]
    rows = []  # how many rows each forward pass sees (an observer, not a mock)
    hook = model.register_forward_pre_hook(lambda module, args, kwargs: rows.append(len(kwargs["input_ids"])),
                                           with_kwargs=True)
    try:
        batched = [out[0]["generated_text"] for out in pipe(PROMPTS, **kw)]
    finally:
        hook.remove()
    assert sorted(set(rows)) == [1, 3]  # really batched: a batch of 3 (padded) and one of 1
    assert batched == single
    for prompt, text in zip(PROMPTS, single):
        assert text.startswith(prompt) and len(text) == len(prompt) + NEW  # spaces kept: every character is there
        assert PAD_TOKEN not in text
    assert " " in "".join(text[len(prompt):] for prompt, text in zip(PROMPTS, single))
    new_only = pipe(PROMPTS, return_full_text=False, **kw)
    assert [out[0]["generated_text"] for out in new_only] == [text[len(p):] for p, text in zip(PROMPTS, single)]
    logged = transformers_warnings.text
    assert "friendly reminder" not in logged and "maximum length" not in logged, logged
    assert "right-padding" not in logged and "pad_token_id" not in logged, logged


def test_saved_folder_pads_left_with_the_pad_id(models, tok, tmp_path):
    model = models["learned"]
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path, trust_remote_code=True)
    assert type(loaded).__name__ == "CharTokenizer"
    assert (loaded.pad_token, loaded.pad_token_id, loaded.padding_side) == (PAD_TOKEN, 65, "left")
    assert (loaded.vocab_size, len(loaded)) == (model.config.vocab_size, model.config.vocab_size + 1)
    enc = loaded(PROMPTS[:2], return_tensors="pt", padding=True)
    assert enc["input_ids"].tolist() == tok(PROMPTS[:2], return_tensors="pt", padding=True)["input_ids"].tolist()
    short = len(PROMPTS[1]) - len(PROMPTS[0])
    assert enc["input_ids"][0].tolist() == [65] * short + tok.encode(PROMPTS[0])
    assert enc["attention_mask"][0].tolist() == [0] * short + [1] * len(PROMPTS[0])
    # and the saved model generates from it as the in-memory one does
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, trust_remote_code=True).eval()
    kw = dict(max_new_tokens=NEW, do_sample=False)
    assert torch.equal(reloaded.generate(**enc, **kw), model.generate(**enc, **kw))


@pytest.mark.parametrize("position_embedding", POSITIONS)
def test_rows_that_stop_early_at_eos(models, tok, position_embedding):
    """With an eos token some rows stop before others; generate pads them with the pad id while the rest go on."""
    model = models[position_embedding]
    for eos in tok.convert_tokens_to_ids(list("\n .,:etaoTh")):  # the first that stops some rows but not all
        kw = dict(max_new_tokens=NEW, do_sample=False, eos_token_id=eos, pad_token_id=tok.pad_token_id)
        single = [model.generate(**tok(p, return_tensors="pt"), **kw)[0, len(p):].tolist() for p in PROMPTS]
        if min(map(len, single)) < max(map(len, single)):
            break
    assert min(map(len, single)) < max(map(len, single))  # the case at hand: some rows stop early
    enc = tok(PROMPTS, return_tensors="pt", padding=True)
    width = enc["input_ids"].shape[1]
    batched = model.generate(**enc, **kw)
    for row, alone in enumerate(single):
        assert batched[row, width:].tolist() == alone + [tok.pad_token_id] * (batched.shape[1] - width - len(alone))
    pipe = pipeline("text-generation", model=model, tokenizer=tok, batch_size=3)
    texts = [out[0]["generated_text"] for out in pipe(PROMPTS, max_new_tokens=NEW, do_sample=False, eos_token_id=eos)]
    assert texts == [p + tok.decode(alone) for p, alone in zip(PROMPTS, single)]
