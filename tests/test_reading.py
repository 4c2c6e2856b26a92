"""Learning while reading (dynamic evaluation): descent on the weights over the text already read, tested on a tiny
model trained for a few steps: strictly causal, the loaded model never changed, rows independent, bad values named."""

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import make_model, train_briefly

from configuration_nanoebm import NanoEBMConfig
from modeling_nanoebm import AdaptationDivergedError
from nanoebm.scoring import score_reading

W = 16  # the window: half the tiny block, so a window never fills the model's context
LR = 0.01  # a rate at which the tiny model learns from a repeat without overshooting


@pytest.fixture(scope="module")
def reader_model(corpus_ids):
    model = make_model(correction_scale=0.5)
    train_briefly(model, corpus_ids, steps=30)
    model.zero_grad(set_to_none=True)
    return model.eval()


def snapshot(model):
    return {name: tensor.clone() for name, tensor in model.state_dict().items()}


def assert_unchanged(model, before):
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, before[name]), f"{name} changed"
    assert all(p.grad is None for p in model.parameters()), "a call left gradients on the loaded model"


def nll(logits, ids):
    return F.cross_entropy(logits[0, :-1].float(), ids[1:]).item()


def test_first_window_scores_as_the_static_model_and_a_repeat_scores_better(reader_model, corpus_ids):
    """A text that repeats a block: its first occurrence is scored before anything is learned (exactly the static
    model's numbers), its repeat by weights that have read it."""
    a, b = corpus_ids[5000:5000 + W], corpus_ids[9000:9000 + W]
    text = torch.cat([a, b, a])[None]
    before = snapshot(reader_model)
    with torch.no_grad():
        adapted = reader_model(text, use_adaptation=True, adapt_lr=LR, adapt_rule="sgd", adapt_window=W)
        static = reader_model(a[None], use_cache=False)
    assert torch.equal(adapted.logits[:, :W], static.logits)
    assert torch.equal(adapted.system1_logits[:, :W], static.system1_logits)
    assert nll(adapted.system1_logits[:, 2 * W:], a) < nll(adapted.system1_logits[:, :W], a) - 0.01
    assert_unchanged(reader_model, before)


def test_a_character_is_predicted_before_it_is_learned_from(reader_model, corpus_ids):
    """Changing a character changes no prediction of it or of any character before it."""
    text = corpus_ids[:3 * W + 5].clone()
    changed = text.clone()
    changed[2 * W + 3] = (changed[2 * W + 3] + 1) % 65
    with torch.no_grad():
        one = reader_model(text[None], use_adaptation=True, adapt_lr=LR, adapt_rule="sgd", adapt_window=W).logits
        two = reader_model(changed[None], use_adaptation=True, adapt_lr=LR, adapt_rule="sgd", adapt_window=W).logits
    # position t predicts character t + 1: every prediction up to the changed character's own is unchanged
    assert torch.equal(one[:, :2 * W + 3], two[:, :2 * W + 3])
    assert not torch.equal(one[:, 3 * W:], two[:, 3 * W:])  # the next window reads weights that learned from it


def test_thinking_runs_on_the_adapted_landscape(reader_model, corpus_ids):
    text = corpus_ids[:3 * W][None]
    with torch.no_grad():
        adapted = reader_model(text, use_adaptation=True, adapt_lr=LR, adapt_rule="sgd", adapt_window=W, think_steps=2)
        static = reader_model(text[:, 2 * W:], use_cache=False, think_steps=2)
    assert len(adapted.step_logits) == 2 and adapted.energy_trace.shape[-1] == 3
    assert not torch.allclose(adapted.logits[:, 2 * W:], static.logits)
    # the descent moved from the adapted System 1
    assert not torch.allclose(adapted.logits[:, 2 * W:], adapted.system1_logits[:, 2 * W:])


def test_batched_rows_read_as_they_would_alone(reader_model, corpus_ids):
    """Left padding and batch mates change nothing: no row learns from another's text."""
    long, short = corpus_ids[100:100 + 3 * W], corpus_ids[7000:7000 + 2 * W + 3]
    pad = 3 * W - short.numel()
    batch = torch.stack([long, torch.cat([torch.zeros(pad, dtype=torch.long), short])])
    mask = torch.ones_like(batch)
    mask[1, :pad] = 0
    settings = dict(use_adaptation=True, adapt_lr=LR, adapt_rule="sgd", adapt_window=W)
    with torch.no_grad():
        together = reader_model(batch, attention_mask=mask, **settings)
        alone = [reader_model(row[None], **settings) for row in (long, short)]
    assert torch.equal(together.logits[0], alone[0].logits[0])
    assert torch.equal(together.logits[1, pad:], alone[1].logits[0])
    prompt = dict(max_new_tokens=12, do_sample=False, **settings)
    batched = reader_model.generate(batch, attention_mask=mask, **prompt)
    single = [reader_model.generate(row[None], **prompt) for row in (long, short)]
    assert torch.equal(batched[0], single[0][0])
    assert torch.equal(batched[1, pad:], single[1][0])


@pytest.mark.parametrize("params", ["all", "head", "norms", "lora"])
@pytest.mark.parametrize("rule", ["sgd", "rms"])
def test_every_rule_and_group_learns_and_leaves_the_model_as_loaded(reader_model, corpus_ids, rule, params):
    a = corpus_ids[2000:2000 + W]
    text = torch.cat([a, a, a])[None]
    before = snapshot(reader_model)
    lr = LR if rule == "sgd" else 1e-3
    with torch.no_grad():
        out = reader_model(text, use_adaptation=True, adapt_lr=lr, adapt_window=W, adapt_rule=rule,
                           adapt_params=params, adapt_decay=0.01)
    assert nll(out.system1_logits[:, 2 * W:], a) < nll(out.system1_logits[:, :W], a)
    assert_unchanged(reader_model, before)


def test_generation_reads_the_prompt_with_learning(reader_model, corpus_ids):
    """A prompt longer than the block is read whole; the continuation comes from the adapted weights, and the
    loaded model is the same afterwards (also when learning from its own output)."""
    prompt = corpus_ids[:5 * W][None]
    before = snapshot(reader_model)
    static = reader_model.generate(prompt, max_new_tokens=3 * W, do_sample=False)
    adapted = reader_model.generate(prompt, max_new_tokens=3 * W, do_sample=False, use_adaptation=True,
                                    adapt_lr=0.03, adapt_rule="sgd", adapt_window=W)
    on_output = reader_model.generate(prompt, max_new_tokens=3 * W, do_sample=False, use_adaptation=True,
                                      adapt_lr=0.03, adapt_rule="sgd", adapt_window=W, adapt_on_output=True)
    assert adapted.shape == static.shape == on_output.shape == (1, 8 * W)
    assert torch.equal(adapted[:, :5 * W], prompt)
    assert not torch.equal(adapted, static)
    assert not torch.equal(on_output, adapted)  # the first chunk agrees, later ones read what it learned
    assert torch.equal(on_output[:, :6 * W], adapted[:, :6 * W])
    assert_unchanged(reader_model, before)


@pytest.mark.parametrize("name, value", [("adapt_lr", -1.0), ("adapt_lr", math.nan), ("adapt_params", "attention"),
                                         ("adapt_rule", "adam"), ("adapt_window", 1), ("adapt_window", 33),
                                         ("adapt_decay", 1.0), ("adapt_rank", 0)])
def test_bad_values_name_the_argument(reader_model, corpus_ids, name, value):
    with pytest.raises(ValueError, match=f"^{name}=.* is invalid"):
        reader_model(corpus_ids[:W][None], use_adaptation=True, **{name: value})
    with pytest.raises(ValueError, match=f"^{name}=.* is invalid"):
        reader_model.generate(corpus_ids[:W][None], max_new_tokens=2, use_adaptation=True, **{name: value})
    with pytest.raises(ValueError, match=f"NanoEBMConfig.{name}=.* is invalid"):
        NanoEBMConfig(block_size=32, **{name: value})


def test_a_diverging_update_restores_the_weights_and_names_the_knob(reader_model, corpus_ids):
    before = snapshot(reader_model)
    with pytest.raises(AdaptationDivergedError, match="lower adapt_lr"):
        reader_model(corpus_ids[:4 * W][None], use_adaptation=True, adapt_lr=1e30, adapt_rule="sgd", adapt_window=W)
    assert_unchanged(reader_model, before)


def test_score_reading_reports_static_and_adapted_on_the_same_windows(reader_model, corpus_ids):
    text = corpus_ids[:4 * W + 7]
    scores = score_reading(reader_model, text, adapt_window=W, adapt_lr=LR, adapt_rule="sgd", use_thinking=False)
    assert all(v.shape == (4 * W + 6,) for v in scores.values())
    # nothing learned yet (the static windows are scored as a batch: equal up to float rounding)
    assert torch.allclose(scores["nll1_static"][:W], scores["nll1_adapted"][:W], atol=1e-5, rtol=0)
    with torch.no_grad():
        second = reader_model(text[W:2 * W + 1][None], use_cache=False, use_thinking=False)
    assert torch.allclose(scores["nll1_static"][W:2 * W], F.cross_entropy(
        second.system1_logits[0, :-1], text[W + 1:2 * W + 1], reduction="none"))
    assert (scores["nll1_static"][W:] - scores["nll1_adapted"][W:]).abs().max() > 1e-3
