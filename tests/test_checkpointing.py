"""Activation checkpointing of the backbone: transformers' activation_checkpointing_enable and the Trainer's
--activation_checkpointing (gradient_checkpointing_* before transformers 5.23, still accepted). The thinking descent
differentiates through the backbone (soft tokens, ebt), twice in training: a checkpointed model must give the same
loss and the same gradients, and keep fewer activations."""

import dataclasses
import math
import warnings
import weakref

import pytest
import torch
from transformers import TrainerCallback, TrainingArguments

import run_train
from conftest import make_model
from modeling_nanoebm import CACHE_NAME

# the names transformers deprecated in 5.23 warn: nanoebm's own use of them would fail here
pytestmark = pytest.mark.filterwarnings("error:.*gradient_checkpointing.*deprecated:FutureWarning")

THINKING = dict(think_steps=2)
LANDSCAPES = {
    "linear": dict(landscape="linear"),
    "mixture": dict(landscape="mixture", correction_scale=0.5),
    "soft_tokens": dict(landscape="soft_tokens", correction_scale=0.5),  # closed-form steps, backbone in the loss
    # autograd through the backbone inside the descent, second order in training (create_graph)
    "soft_tokens_coupled": dict(landscape="soft_tokens", correction_scale=0.5, mixture_stopgrad=False),
    "ebt": dict(landscape="ebt", think_max_move=0.0, entropy_weight=0.0, think_lr=5.0),
    # the paper's System 2 recipe: random step sizes and Langevin noise (more RNG around the checkpointed blocks)
    "ebt_noisy": dict(landscape="ebt", think_max_move=0.0, entropy_weight=0.0, think_lr=5.0, langevin_noise=0.5,
                      think_lr_random_scale=2.0),
}


def saved_bytes():
    """Hooks that note every tensor autograd keeps for the backward pass, and a function that adds up the bytes of
    those still kept (each storage once; the descent's own inner backward passes free theirs)."""
    kept = []

    def pack(t):
        kept.append(weakref.ref(t))
        return t

    def total():
        alive = [t.untyped_storage() for t in (ref() for ref in kept) if t is not None]
        return sum({storage.data_ptr(): storage.nbytes() for storage in alive}.values())

    return torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), total


def loss_and_gradients(recipe, dropout, checkpointing, **call):
    model = make_model(dropout=dropout, **THINKING, **LANDSCAPES[recipe]).train()
    if checkpointing:
        model.activation_checkpointing_enable()
    torch.manual_seed(1)  # the same batch, dropout masks, Langevin noise and random step sizes in both runs
    ids = torch.randint(0, 65, (2, 24))
    hooks, total = saved_bytes()
    with hooks:
        out = model(ids, shift_labels=ids, **call)
    kept = total()
    out.loss.backward()
    grads = {name: p.grad for name, p in model.named_parameters() if p.grad is not None}
    return out, grads, kept


@pytest.mark.parametrize("dropout", [0.0, 0.2])
@pytest.mark.parametrize("recipe", list(LANDSCAPES))
def test_same_loss_and_gradients_with_fewer_saved_activations(recipe, dropout):
    plain, plain_grads, plain_bytes = loss_and_gradients(recipe, dropout, checkpointing=False)
    kept, kept_grads, kept_bytes = loss_and_gradients(recipe, dropout, checkpointing=True)
    torch.testing.assert_close(kept.loss, plain.loss, rtol=1e-6, atol=1e-7)
    assert set(kept_grads) == set(plain_grads)
    for name, grad in plain_grads.items():
        torch.testing.assert_close(kept_grads[name], grad, rtol=1e-5, atol=1e-7, msg=name)
    if recipe.startswith("ebt"):  # w of E = w . h' learns through dE/dv alone: the second-order gradient
        assert plain_grads["energy_head.scalar.weight"].abs().sum() > 0
    # tiny configs: the weights are a good part of what is kept; second order keeps the replayed blocks' activations
    assert kept_bytes < 0.9 * plain_bytes, (kept_bytes, plain_bytes)


def test_the_cache_is_never_written_in_a_checkpointed_training_step():
    """The backward pass replays each block: a cache it wrote would hold every token twice. As transformers does,
    use_cache is switched off there (with a warning), and the loss and gradients are those of an uncached step."""
    plain, plain_grads, _ = loss_and_gradients("soft_tokens", 0.0, checkpointing=False)
    kept, kept_grads, _ = loss_and_gradients("soft_tokens", 0.0, checkpointing=True, use_cache=True)
    assert getattr(kept, CACHE_NAME) is None
    torch.testing.assert_close(kept.loss, plain.loss, rtol=1e-6, atol=1e-7)
    for name, grad in plain_grads.items():
        torch.testing.assert_close(kept_grads[name], grad, rtol=1e-5, atol=1e-7, msg=name)


def test_decoding_ignores_checkpointing_and_disable_restores_the_plain_model():
    model = make_model(**THINKING, **LANDSCAPES["ebt"])
    model.activation_checkpointing_enable()
    assert model.transformer.gradient_checkpointing
    prompt = torch.randint(0, 65, (1, 5))
    model.eval()
    with_flag = model.generate(prompt, max_new_tokens=6, do_sample=False)
    model.activation_checkpointing_disable()
    assert not model.transformer.gradient_checkpointing
    assert torch.equal(model.generate(prompt, max_new_tokens=6, do_sample=False), with_flag)


def test_the_names_before_transformers_5_23_still_work():
    """gradient_checkpointing_enable / _disable and their kwargs: what users and transformers < 5.23 call (5.23 and
    later warn that they are deprecated)."""
    plain, plain_grads, _ = loss_and_gradients("soft_tokens", 0.0, checkpointing=False)
    model = make_model(**THINKING, **LANDSCAPES["soft_tokens"]).train()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        assert model.transformer.gradient_checkpointing
        torch.manual_seed(1)
        ids = torch.randint(0, 65, (2, 24))
        out = model(ids, shift_labels=ids)
        out.loss.backward()
        torch.testing.assert_close(out.loss, plain.loss, rtol=1e-6, atol=1e-7)
        model.gradient_checkpointing_disable()
        assert not model.transformer.gradient_checkpointing


@pytest.mark.parametrize("recipe", ["soft_tokens", "ebt"])
def test_reentrant_checkpointing_is_refused_where_thinking_reads_the_backbone(recipe):
    """The reentrant checkpoint drops gradients through the context's keys and values and cannot run
    torch.autograd.grad: one message, rather than silently wrong gradients."""
    model = make_model(**THINKING, **LANDSCAPES[recipe]).train()
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": True})
    ids = torch.randint(0, 65, (2, 16))
    with pytest.raises(ValueError, match="use_reentrant=True.*use_reentrant=False"):
        model(ids, shift_labels=ids)


def test_reentrant_checkpointing_still_works_for_the_per_token_landscapes():
    plain, plain_grads, _ = loss_and_gradients("mixture", 0.0, checkpointing=False)
    model = make_model(**THINKING, **LANDSCAPES["mixture"]).train()
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": True})
    torch.manual_seed(1)
    ids = torch.randint(0, 65, (2, 24))
    out = model(ids, shift_labels=ids)
    out.loss.backward()
    torch.testing.assert_close(out.loss, plain.loss, rtol=1e-6, atol=1e-7)
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, plain_grads[name], rtol=1e-5, atol=1e-7, msg=name)


class SeesCheckpointing(TrainerCallback):
    def __init__(self):
        self.seen = []

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        self.seen.append(model.transformer.gradient_checkpointing and model.training)


def test_the_trainer_flag_trains_with_checkpointing(tmp_path, corpus_text):
    """--activation_checkpointing where transformers has it (5.23), else --gradient_checkpointing."""
    fields = {f.name for f in dataclasses.fields(TrainingArguments)}
    flag = "--activation_checkpointing" if "activation_checkpointing" in fields else "--gradient_checkpointing"
    corpus = tmp_path / "small.txt"
    corpus.write_text(corpus_text[:60000])
    callback = SeesCheckpointing()
    metrics = run_train.main(
        ["--preset", "cpu", "--n_layer", "1", "--n_head", "2", "--n_embd", "32", "--block_size", "32",
         "--per_device_train_batch_size", "8", "--eval_blocks", "8", "--eval_reading_chars", "200", "--max_steps",
         "4", "--logging_steps", "2",
         "--report_to", "none", "--disable_tqdm", "true", "--dataloader_num_workers", "0", "--landscape", "ebt",
         flag, "true", "--data_path", str(corpus), "--output_dir", str(tmp_path / "out")],
        callbacks=[callback],
    )
    assert callback.seen == [True] * 4
    assert math.isfinite(metrics["train_loss"]) and math.isfinite(metrics["eval_system2_loss"])
    assert (tmp_path / "out" / "model.safetensors").is_file()


def test_the_replayed_blocks_run_the_attention_kernels_the_forward_chose():
    """The backward pass replays each block outside the forward's `sdpa_kernel` context: the replay restores the
    kernels the forward ran with (read from torch's public switches), so a math-only forward replays math-only."""
    model = make_model(**THINKING, **LANDSCAPES["soft_tokens"]).train()
    model.activation_checkpointing_enable()
    seen = []
    model.transformer.h[0].register_forward_hook(
        lambda *_: seen.append((torch.backends.cuda.flash_sdp_enabled(), torch.backends.cuda.math_sdp_enabled())))
    ids = torch.randint(0, 65, (2, 16))
    with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.MATH):
        out = model(ids, shift_labels=ids)
    assert torch.backends.cuda.flash_sdp_enabled()  # the context is left: the default switches again
    out.loss.backward()
    assert len(seen) > 1 and set(seen) == {(False, True)}, seen  # the forward and its replays alike
