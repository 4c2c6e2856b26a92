"""Training: the loss terms, short real runs of every contrastive type, exact resume, 2 processes, the saved
folder, the research-code syntax and bad input."""

import json
import math
import shlex
import subprocess
import sys
import textwrap
from dataclasses import asdict

import pytest
import torch
from safetensors.torch import load_file
from transformers import TrainerCallback, default_data_collator

import run_train
from nanoebm import contrastive, continuing, data
from nanoebm.cli import UsageError
from nanoebm.corpus import resolve_data_path
from nanoebm.scoring import TEMPERATURES, score_blocks
from nanoebm.settings import machine_preset
from nanoebm.trainer import EBMTrainer, gather_uneven
from conftest import ROOT, free_port, make_model, run_without_nanoebm
from modeling_nanoebm import ThinkingDivergedError

TINY = ["--preset", "cpu", "--n_layer", "1", "--n_head", "2", "--n_embd", "32", "--block_size", "32",
        "--per_device_train_batch_size", "8", "--eval_blocks", "8", "--learning_rate", "3e-3", "--warmup_steps", "2",
        "--logging_steps", "5", "--save_steps", "1000", "--report_to", "none", "--disable_tqdm", "true",
        "--dataloader_num_workers", "0", "--eval_reading_chars", "200"]


@pytest.fixture(scope="module")
def small_corpus(tmp_path_factory, corpus_text):
    path = tmp_path_factory.mktemp("data") / "small.txt"
    path.write_text(corpus_text[:60000])
    return path


def train(tmp_path, corpus, *extra, callbacks=None):
    out = tmp_path / "out"
    metrics = run_train.main([*TINY, "--data_path", str(corpus), "--output_dir", str(out), *extra],
                             callbacks=callbacks)
    return out, metrics


def make_trainer(tmp_path, corpus, *extra, landscape="mixture"):
    """A real EBMTrainer on a tiny model, for looking at compute_loss directly (contrastive only when named)."""
    if "--contrastive_type" not in extra:
        extra = (*extra, "--use_contrastive", "false")
    parsed = run_train.parse_args([*TINY, "--data_path", str(corpus), "--output_dir", str(tmp_path / "t"), *extra])
    train_data, blocks, tokenizer = data.build_data(parsed.data, None, 32, 0)
    model = make_model(landscape=landscape, n_layer=1, correction_scale=0.5, think_lr=1.0)
    trainer = EBMTrainer(model=model, args=parsed.training, train_dataset=train_data, eval_dataset=blocks,
                                  processing_class=tokenizer, data_collator=default_data_collator,
                                  ebm_args=parsed.loss)
    batch = default_data_collator([train_data[i] for i in range(0, 800, 100)])
    return trainer, model, batch


# -- loss terms -----------------------------------------------------------------------------------------------

def test_aux_weight_one_is_plain_system1_ce(tmp_path, small_corpus):
    trainer, model, batch = make_trainer(tmp_path, small_corpus, "--aux_ce_weight", "1.0")
    loss = trainer.compute_loss(model, batch)
    out = model(batch["input_ids"], use_thinking=False)
    assert torch.allclose(loss, model.next_token_loss(out.logits, shift_labels=batch["shift_labels"]))


def test_main_loss_mean_over_steps_or_last(tmp_path, small_corpus):
    trainer, model, batch = make_trainer(tmp_path, small_corpus, "--aux_ce_weight", "0.0")
    torch.manual_seed(0)
    out = model(batch["input_ids"], think_steps=2)
    ce = [model.next_token_loss(v, shift_labels=batch["shift_labels"]) for v in out.step_logits]
    assert torch.allclose(trainer.compute_loss(model, batch), (ce[0] + ce[1]) / 2, atol=1e-6)
    trainer.ebm.truncate_refine = True
    assert torch.allclose(trainer.compute_loss(model, batch), ce[1], atol=1e-6)


def test_warmup_without_refinement_and_random_steps(tmp_path, small_corpus):
    trainer, model, _ = make_trainer(tmp_path, small_corpus, "--warmup_steps_no_refine", "3",
                                     "--random_think_steps", "2-3")
    assert trainer.think_steps_now(model.config) == 0  # step 0 < 3
    draws = set()
    for step in range(3, 40):
        trainer.state.global_step = step
        draws.add(trainer.think_steps_now(model.config))
    assert draws == {2, 3}
    trainer.state.global_step = 7
    assert trainer.think_steps_now(model.config) == trainer.think_steps_now(model.config)  # same on every rank


def test_detach_refine_changes_the_gradient(tmp_path, small_corpus):
    grads = []
    for detach in ("false", "true"):
        trainer, model, batch = make_trainer(tmp_path, small_corpus, "--aux_ce_weight", "0", "--detach_refine", detach)
        trainer.compute_loss(model, batch).backward()
        grads.append(model.transformer.wte.weight.grad.clone())
    assert torch.isfinite(grads[1]).all() and not torch.allclose(grads[0], grads[1])


def test_detach_system1_keeps_the_thinking_loss_off_system1(tmp_path, small_corpus):
    """--detach_system1: the Trainer's whole loss (refined CE, System 1 CE, contrastive) gives the backbone exactly the
    gradient of the System 1 CE share alone, and still trains the mixture's own weights."""
    trainer, model, batch = make_trainer(tmp_path, small_corpus, "--detach_system1", "true", "--aux_ce_weight", "0.5",
                                         "--contrastive_type", "cd")
    assert trainer.ebm.detach_system1 and trainer.contrastive is not None
    trainer.compute_loss(model, batch).backward()
    whole = model.transformer.wte.weight.grad.clone()
    assert model.energy_head.mixture[0].weight.grad.abs().sum() > 0
    model.zero_grad()
    out = model(batch["input_ids"], use_thinking=False)
    (0.5 * model.next_token_loss(out.system1_logits, shift_labels=batch["shift_labels"])).backward()
    assert torch.allclose(whole, model.transformer.wte.weight.grad, atol=1e-6)


@pytest.mark.parametrize("flags,needle", [
    (["--landscape", "ebt"], "--landscape ebt"),
    (["--recipe", "ebt_hybrid"], "--landscape ebt"),
    (["--use_soft_tokens", "true"], "--landscape soft_tokens"),
    (["--aux_ce_weight", "0"], "--aux_ce_weight 0"),
])
def test_detach_system1_refuses_what_it_cannot_keep_apart(tmp_path, flags, needle):
    with pytest.raises(UsageError, match=needle):
        run_train.parse_args([*TINY, "--output_dir", str(tmp_path / "o"), "--detach_system1", "true", *flags])


@pytest.mark.parametrize("kind", ["cd", "pcd", "fast_pcd"])
def test_contrastive_term_lowers_true_energy_against_negatives(tmp_path, small_corpus, kind):
    trainer, model, batch = make_trainer(tmp_path, small_corpus, "--contrastive_type", kind, "--contrastive_k", "3",
                                         "--n_persistent", "64", "--n_chains", "16", "--restart_prob", "0.2")
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)

    def margin():
        with torch.no_grad():
            out = model(batch["input_ids"], use_thinking=False, return_landscape=True)
            _, e_pos, e_neg = trainer.contrastive.loss(out.landscape, out.system1_logits, batch["shift_labels"])
        return float(e_pos - e_neg)

    before = margin()
    for _ in range(8):
        out = model(batch["input_ids"], use_thinking=False, return_landscape=True)
        cd_loss, _, _ = trainer.contrastive.loss(out.landscape, out.system1_logits, batch["shift_labels"])
        optimizer.zero_grad()
        cd_loss.backward()
        optimizer.step()
    assert margin() < before - 1e-3  # the true next token's energy fell relative to the negatives'


def test_positive_energy_is_the_true_next_token(tmp_path, small_corpus):
    trainer, model, batch = make_trainer(tmp_path, small_corpus, "--contrastive_type", "cd", landscape="linear")
    with torch.no_grad():
        out = model(batch["input_ids"], use_thinking=False, return_landscape=True)
        _, e_pos, _ = trainer.contrastive.loss(out.landscape, out.system1_logits, batch["shift_labels"])
        expected = out.energies.gather(-1, batch["shift_labels"][..., None]).mean()
    assert torch.allclose(e_pos, expected, atol=1e-6)


# -- real runs ------------------------------------------------------------------------------------------------

class History(TrainerCallback):
    def __init__(self):
        self.losses = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs:
            self.losses.append(logs["loss"])


@pytest.mark.parametrize("kind", [None, "cd", "pcd", "fast_pcd"])
def test_twenty_steps_lower_the_loss(tmp_path, small_corpus, kind):
    history = History()
    extra = ["--max_steps", "20", "--do_train", "true"] + (["--contrastive_type", kind] if kind else
                                                             ["--use_contrastive", "false"])
    out, _ = train(tmp_path, small_corpus, *extra, callbacks=[history])
    assert len(history.losses) == 4 and history.losses[-1] < history.losses[0] - 0.05, history.losses
    assert (out / "model.safetensors").is_file()


class Logs(TrainerCallback):
    def __init__(self):
        self.rows = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs:
            self.rows.append(dict(logs))


def test_logged_bits_per_char_and_perplexity_are_the_predictions(tmp_path, small_corpus):
    """bits_per_char_pred and perplexity_pred are of loss_pred, the CE of the last refined logits (what decoding
    uses), not of the total loss, which adds the auxiliary CE and the contrastive term, nor of loss_main, the mean over
    the thinking steps."""
    logs = Logs()
    train(tmp_path, small_corpus, "--max_steps", "10", "--do_train", "true", "--contrastive_type", "cd",
          "--contrastive_weight", "5.0", "--entropy_weight", "0.5", callbacks=[logs])  # lambda < tau: the steps move
    assert len(logs.rows) == 2
    for row in logs.rows:
        assert abs(row["loss"] - row["loss_pred"]) > 2e-3, row  # far enough apart for the check to tell them apart
        assert abs(row["loss_main"] - row["loss_pred"]) > 1e-5, row
        assert row["bits_per_char_pred"] == pytest.approx(row["loss_pred"] / math.log(2), abs=2e-5)
        assert row["perplexity_pred"] == pytest.approx(math.exp(row["loss_pred"]), rel=1e-4)
        assert "bits_per_char" not in row and "perplexity" not in row


def test_early_stopped_thinking_trains_and_evaluates(tmp_path, small_corpus):
    """A threshold every position meets after one step: all K steps are still there for evaluation to read, each
    position repeating its first step, so thinking twice as long changes nothing."""
    _, metrics = train(tmp_path, small_corpus, "--max_steps", "4", "--energy_convergence_threshold", "10")
    assert all(math.isfinite(v) for k, v in metrics.items() if k.startswith("eval_")), metrics
    assert metrics["eval_system2_bpc"] == metrics["eval_system2_2x_bpc"]
    assert metrics["eval_energy_gap"] == metrics["eval_energy_gap_2x"]


def test_evaluation_keeps_a_diverged_models_nan(tmp_path, small_corpus):
    trainer, model, _ = make_trainer(tmp_path, small_corpus)
    # each process pads its values to one width for the gather; the padding is told apart by a mask, not a value,
    # so a NaN the model produced survives (counts differ when the blocks do not split evenly)
    gathered = gather_uneven(trainer.accelerator, torch.tensor([1.5, float("nan"), 2.5]), 5)
    assert gathered.shape == (3,) and gathered[0] == 1.5 and gathered[1].isnan() and gathered[2] == 2.5
    with torch.no_grad():
        model.energy_head.token_bias[3] = float("nan")
    model.config.use_thinking = False
    metrics = trainer.evaluate()
    assert math.isnan(metrics["eval_system1_bpc"]) and math.isnan(metrics["eval_loss"]), metrics
    assert math.isnan(metrics["eval_system1_temperature"]) and math.isnan(metrics["eval_system1_calibrated_loss"])
    model.config.use_thinking = True  # thinking from a NaN start stops with the error that names the knobs
    with pytest.raises(ThinkingDivergedError, match="think_lr"):
        trainer.evaluate()


def test_evaluation_calibrates_system1_on_the_even_blocks_and_scores_the_odd(tmp_path, small_corpus):
    """Even blocks drawn from System 1 at T = 1, odd ones at T = 0.5: the logged temperature is the even blocks'
    (about 1), and System 1 calibrated with it, System 1 and System 2 are all scored on the odd blocks only."""
    from test_scoring import sample_blocks, sharpened

    trainer, model, _ = make_trainer(tmp_path, small_corpus)
    sharpened(model.eval(), 40.0)
    blocks = torch.stack([sample_blocks(model, 32, 1.0, seed=0), sample_blocks(model, 32, 0.5, seed=1)], 1)
    metrics = trainer.evaluate(eval_dataset=blocks.flatten(0, 1))
    assert metrics["eval_system1_temperature"] == pytest.approx(1.0, rel=0.1), metrics
    odd = blocks[:, 1]
    steps = model.config.think_steps
    scores = score_blocks(model, odd, 8, think_steps=steps, tempered=True)
    assert metrics["eval_system1_heldout_loss"] == pytest.approx(float(scores["nll1"].mean()), abs=2e-5)
    assert metrics["eval_system2_heldout_loss"] == pytest.approx(float(scores["nll2"].mean()), abs=2e-5)
    k = min(range(len(TEMPERATURES)), key=lambda j: abs(TEMPERATURES[j] - metrics["eval_system1_temperature"]))
    calibrated = float(scores["nll1_tempered"][..., k].mean())
    assert metrics["eval_system1_calibrated_loss"] == pytest.approx(calibrated, abs=2e-5)
    assert metrics["eval_system1_calibrated_bpc"] == pytest.approx(calibrated / math.log(2), abs=2e-5)
    # fitted on the odd blocks themselves the temperature would be about 0.5, and their number lower
    assert float(scores["nll1_tempered"].mean((0, 1)).min()) < calibrated - 0.02


def test_evaluation_reads_the_validation_text_in_order_with_and_without_learning(tmp_path, small_corpus):
    """eval_system{1,2}_reading_* (the trained weights) and eval_system{1,2}_adapted_* (learning while reading at the
    model's adapt_* settings) on the validation text's first --eval_reading_chars characters, as score_reading gives
    them for the saved model."""
    from modeling_nanoebm import NanoEBMForCausalLM
    from nanoebm.scoring import score_reading

    out, metrics = train(tmp_path, small_corpus, "--max_steps", "6", "--eval_reading_chars", "150", "--adapt_rule",
                         "sgd", "--adapt_lr", "0.01", "--adapt_window", "16")
    model = NanoEBMForCausalLM.from_pretrained(out).eval()
    assert model.config.adapt_lr == 0.01 and model.config.adapt_window == 16 and not model.config.use_adaptation
    parsed = run_train.parse_args([*TINY, "--data_path", str(small_corpus), "--output_dir", str(tmp_path / "x"),
                                   "--eval_reading_chars", "150"])
    _, _, tokenizer = data.build_data(parsed.data, None, 32, 0)
    ids = data.reading_ids(parsed.data, tokenizer, 32)
    assert ids.shape == (150,)
    scores = score_reading(model, ids, think_steps=model.config.think_steps)
    for name, key in (("system1_reading", "nll1_static"), ("system1_adapted", "nll1_adapted"),
                      ("system2_reading", "nll2_static"), ("system2_adapted", "nll2_adapted")):
        assert metrics[f"eval_{name}_loss"] == pytest.approx(float(scores[key].mean()), abs=2e-5), name
        assert metrics[f"eval_{name}_bpc"] == pytest.approx(float(scores[key].mean()) / math.log(2), abs=2e-5)
    assert metrics["eval_system1_adapted_loss"] != metrics["eval_system1_reading_loss"]


class StopAt(TrainerCallback):
    def __init__(self, step):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            control.should_training_stop = True


@pytest.mark.parametrize("kind", ["pcd", "fast_pcd"])
def test_exact_resume_including_the_persistent_chains_and_replay_buffers(tmp_path, small_corpus, kind):
    """Interrupted at step 4 and resumed: the same weights, particles, generators and replay buffer, bit for bit.
    fast_pcd restarts half its chains per step here, so restarts happen on both sides of the interruption."""
    common = ["--max_steps", "8", "--save_steps", "4", "--contrastive_type", kind, "--do_train", "true",
              "--keep_checkpoints", "true", "--n_chains", "6", "--restart_prob", "0.5",
              "--langevin_noise", "0.01", "--random_think_steps", "1-3", "--think_replay_prob", "0.5",
              "--think_replay_size", "16"]
    straight, _ = train(tmp_path / "a", small_corpus, *common)
    stopped, _ = train(tmp_path / "b", small_corpus, *common, callbacks=[StopAt(4)])
    for name in ("model.safetensors", "config.json", "nanoebm_run.json", "README.md", "all_results.json"):  # a crash
        (stopped / name).unlink()
    # the checkpoint's run record repeats the interrupted command: no flag but the checkpoint is needed
    resumed, _ = train(tmp_path / "b", small_corpus, "--resume_from_checkpoint",
                       str(stopped / "checkpoints" / "checkpoint-4"))
    assert resumed == stopped
    # the resumed run records every flag it ran with, so a resume of it repeats them too
    record = json.loads((resumed / "nanoebm_run.json").read_text())["runs"]
    settings = record[-1]["settings"]
    assert settings["contrastive_type"]["value"] == kind and "resume_from_checkpoint" not in settings
    assert settings["contrastive_type"]["from"] == f"resumed {stopped / 'checkpoints' / 'checkpoint-4'}"
    assert record[-1]["started_from"] == {"checkpoint": str(stopped / "checkpoints" / "checkpoint-4")}
    a, b = load_file(straight / "model.safetensors"), load_file(resumed / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    for name in ("contrastive_state_0.safetensors", "replay_state_0.safetensors"):
        states = [load_file(folder / "checkpoints" / "checkpoint-8" / name) for folder in (straight, resumed)]
        assert states[0].keys() == states[1].keys() and all(torch.equal(states[0][k], states[1][k]) for k in states[0])
    particles = load_file(straight / "checkpoints" / "checkpoint-8" / "contrastive_state_0.safetensors")["particles"]
    assert particles.shape[0] == (6 if kind == "fast_pcd" else 100)


def test_the_trainer_uses_no_private_trainer_method():
    """A private transformers method can be renamed or removed in any release, silently (an override is then never
    called: the contrastive state would stop being saved). EBMTrainer overrides and calls public hooks only;
    docs/DESIGN.md, "Private APIs: the Trainer", says what replaced each."""
    import inspect
    import re

    import transformers
    from transformers import Trainer

    from nanoebm import trainer as module

    overridden = [name for name in vars(EBMTrainer) if name.startswith("_") and not name.startswith("__")
                  and hasattr(Trainer, name)]
    called = sorted({name for name in re.findall(r"(?:self|super\(\))\.(_[a-z]\w*)", inspect.getsource(module))
                     if hasattr(Trainer, name)})
    assert overridden == [] and called == [], (
        f"nanoebm/trainer.py overrides {overridden} and calls {called}, private methods of transformers "
        f"{transformers.__version__}'s Trainer: use a public hook (docs/DESIGN.md, 'Private APIs: the Trainer')")


def evil_pickle(marker):
    """What an attacker would put in a checkpoint: a pickle whose loading runs a shell command (touching `marker`)."""
    import os
    import pickle

    class Payload:
        def __reduce__(self):
            return os.system, (f"touch {marker}",)

    return pickle.dumps({"particles": Payload()})


@pytest.mark.parametrize("planted", ["contrastive_state_0.pt", "contrastive_state_0.safetensors"])
def test_resuming_a_checkpoint_with_a_planted_pickle_runs_nothing(tmp_path, small_corpus, planted, capfd,
                                                                   monkeypatch):
    """A checkpoint whose state file was replaced by a malicious pickle (under the older .pt name, or under the
    current name): the resume refuses it with one line and exit status 2, and the pickle's command never runs (the
    command line in this process: a pickle that ran would touch `marker` all the same)."""
    out, _ = train(tmp_path, small_corpus, "--max_steps", "4", "--save_steps", "2", "--contrastive_type", "pcd",
                   "--do_train", "true", "--keep_checkpoints", "true", callbacks=[StopAt(2)])
    for name in ("model.safetensors", "config.json", "nanoebm_run.json", "README.md", "all_results.json"):
        (out / name).unlink()
    checkpoint = out / "checkpoints" / "checkpoint-2"
    (checkpoint / "contrastive_state_0.safetensors").unlink(missing_ok=True)  # (an older nanoebm wrote .pt)
    marker = tmp_path / "payload-ran"
    (checkpoint / planted).write_bytes(evil_pickle(marker))
    before = sorted(p.relative_to(out) for p in out.rglob("*"))
    monkeypatch.chdir(tmp_path)
    capfd.readouterr()  # the training run's own output
    code = run_train.cli(["--resume_from_checkpoint", str(checkpoint)])
    err = capfd.readouterr().err  # file-descriptor level: transformers' own logging too
    assert not marker.exists(), "the planted pickle ran"
    assert code == 2 and "Traceback" not in err, err[-3000:]
    assert len(err.strip().splitlines()) == 1 and str(checkpoint / planted) in err, err
    assert sorted(p.relative_to(out) for p in out.rglob("*")) == before  # nothing written


def test_training_state_files_hold_tensors_and_integers_checked_before_use(tmp_path):
    """Each way a state file can be wrong is one StateFileError naming the file; a good one round-trips exactly."""
    from types import SimpleNamespace

    from safetensors.torch import save_file

    from nanoebm.state import StateFileError, save_state

    args = SimpleNamespace(contrastive_type="pcd", n_persistent=4, buffer_init_std=1.0)
    sampler = contrastive.ContrastiveSampler(args, vocab_size=7, temperature=1.0, seed=0)
    sampler.randn((3,), "cpu")  # the generator has moved on from its seed
    path = tmp_path / "contrastive_state_0.safetensors"
    sampler.save(path)
    fresh = contrastive.ContrastiveSampler(args, vocab_size=7, temperature=1.0, seed=1)
    fresh.load_state_dict(fresh.read(path, block_size=5, vocab_size=7))
    assert torch.equal(fresh.particles, sampler.particles)
    assert torch.equal(fresh.generator.get_state(), sampler.generator.get_state())
    replay = contrastive.ThinkingReplay(size=4, prob=0.5, seed=0)
    replay_path = tmp_path / "replay_state_0.safetensors"
    replay.save(replay_path)  # empty: no blocks stored yet
    assert replay.read(replay_path, block_size=5, vocab_size=7)["ids"] is None
    replay.push(torch.arange(15).view(3, 5), torch.arange(15).view(3, 5), torch.randn(3, 5, 7))
    replay.save(replay_path)
    state = replay.read(replay_path, block_size=5, vocab_size=7)
    assert (state["count"], state["cursor"]) == (3, 3) and torch.equal(state["logits"], replay.logits)

    generator = torch.Generator().get_state()
    bad = {
        "random bytes": lambda p: p.write_bytes(bytes(range(256)) * 4),
        "empty": lambda p: p.write_bytes(b""),
        "foreign safetensors": lambda p: save_file({"particles": torch.zeros(4, 7)}, str(p)),
        "wrong particle count": lambda p: save_state(p, "contrastive", {"particles": torch.zeros(5, 7),
                                                                        "generator": generator}, {}),
        "wrong vocabulary": lambda p: save_state(p, "contrastive", {"particles": torch.zeros(4, 9),
                                                                    "generator": generator}, {}),
        "wrong dtype": lambda p: save_state(p, "contrastive", {"particles": torch.zeros(4, 7, dtype=torch.float64),
                                                               "generator": generator}, {}),
        "a broken generator": lambda p: save_state(p, "contrastive", {"particles": torch.zeros(4, 7),
                                                                       "generator": torch.zeros_like(generator)}, {}),
        "no generator": lambda p: save_state(p, "contrastive", {"particles": torch.zeros(4, 7)}, {}),
        "an extra tensor": lambda p: save_state(p, "contrastive", {"particles": torch.zeros(4, 7),
                                                                   "generator": generator, "x": torch.zeros(1)}, {}),
        "replay state": lambda p: save_state(p, "replay", {"generator": generator}, {"count": 0, "cursor": 0}),
    }
    for what, write in bad.items():
        write(path)
        with pytest.raises(StateFileError) as caught:
            fresh.read(path, block_size=5, vocab_size=7)
        message = str(caught.value)
        assert str(path) in message and "\n" not in message and "--resume_from_checkpoint" in message, what
    save_state(replay_path, "replay", {"generator": generator}, {"count": 2, "cursor": 0})  # count without blocks
    with pytest.raises(StateFileError, match="count=2"):
        replay.read(replay_path, block_size=5, vocab_size=7)
    checkpoint = tmp_path / "checkpoint-2"
    checkpoint.mkdir()
    with pytest.raises(StateFileError, match="contrastive_state_0.safetensors is missing"):
        contrastive.read_buffers(checkpoint, [fresh], rank=0, block_size=5, vocab_size=7)
    (checkpoint / "contrastive_state_0.pt").write_bytes(b"not read")
    with pytest.raises(StateFileError, match="contrastive_state_0.pt is an older nanoebm's pickled"):
        contrastive.read_buffers(checkpoint, [fresh], rank=0, block_size=5, vocab_size=7)
    header = {"format": "nanoebm-training-state", "version": 1, "kind": "replay", "ints": {"count": "0", "cursor": 0}}
    save_file({"generator": generator}, str(replay_path), metadata={"nanoebm": json.dumps(header)})
    with pytest.raises(StateFileError, match="integers"):
        replay.read(replay_path, block_size=5, vocab_size=7)


def test_replay_resumes_the_descent_from_stored_logits():
    """A replayed row is a stored block whose descent starts from its stored refined logits; the rest are fresh."""
    replay = contrastive.ThinkingReplay(size=4, prob=0.5, seed=0)
    ids, labels = torch.arange(12).view(3, 4), torch.arange(12).view(3, 4) + 1
    assert replay.mix(ids, labels)[2] is None  # nothing stored yet
    replay.push(ids, labels, torch.randn(3, 4, 7))
    mixed, mixed_labels, start, mask = replay.mix(torch.full((64, 4), -1), torch.full((64, 4), -1))
    replayed = mask[:, 0]
    assert 0 < replayed.sum() < 64 and (mixed[~replayed] == -1).all() and (mixed[replayed] >= 0).all()
    for row in replayed.nonzero().squeeze(1):
        source = (ids == mixed[row]).all(-1).nonzero().item()  # which stored block came back
        assert torch.equal(mixed_labels[row], labels[source])
        assert torch.allclose(start[row], replay.logits[source])
    assert replay.count == 3 and replay.cursor == 3


@pytest.mark.slow
def test_two_process_accelerate_launch_on_cpu(tmp_path, small_corpus):
    out = tmp_path / "ddp"
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
               "--num_machines", "1", "--main_process_port", free_port(), "--mixed_precision", "no",
               "--dynamo_backend", "no",
               str(ROOT / "tests" / "ddp_probe.py"), *TINY, "--data_path", str(small_corpus), "--output_dir", str(out),
               "--max_steps", "6", "--use_cpu", "--contrastive_type", "pcd", "--do_train", "true",
               "--keep_checkpoints", "true"]
    done = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    assert "find_unused_parameters=True" not in done.stderr  # every parameter is used: no extra graph traversal
    ranks = [json.loads((out / "checkpoints" / f"probe_rank{r}.json").read_text()) for r in (0, 1)]
    for r in (0, 1):  # each rank released its DDP wrapper, then closed its process group (no hang at exit)
        assert json.loads((out / f"closed_rank{r}.json").read_text()) == {"process_group_closed": True}
    assert [r["world"] for r in ranks] == [2, 2] and [r["steps"] for r in ranks] == [6, 6]
    assert ranks[0]["first_batch"] != ranks[1]["first_batch"]  # each process sees its own data
    assert ranks[0]["weights"] == ranks[1]["weights"]  # and they end with the same model
    checkpoint = out / "checkpoints" / "checkpoint-6"
    assert {f"contrastive_state_{r}.safetensors" for r in (0, 1)} <= {p.name for p in checkpoint.iterdir()}
    run = json.loads((out / "nanoebm_run.json").read_text())["runs"][-1]  # the card knows how it was launched
    assert (run["processes"], run["global_batch"]) == (2, 16) and run["command"].startswith("accelerate launch")
    assert "--num_processes 2" in (out / "README.md").read_text()


@pytest.mark.slow
def test_saved_folder_is_a_complete_model_that_a_pipeline_loads(tmp_path, small_corpus):
    out, metrics = train(tmp_path, small_corpus, "--max_steps", "10")
    assert {"eval_system1_bpc", "eval_system2_bpc", "eval_system2_2x_bpc", "eval_energy_gap"} <= metrics.keys()
    card = (out / "README.md").read_text()
    assert "--max_steps 10" in card and f"{metrics['eval_system2_bpc']:.4f}" in card
    script = textwrap.dedent(f"""
        from transformers import pipeline
        generator = pipeline("text-generation", model={str(out)!r}, trust_remote_code=True)
        text = generator("ROMEO:", think_steps=3, max_new_tokens=12, do_sample=True, top_k=20,
                         return_full_text=False)[0]["generated_text"]
        assert len(text) == 12, text
        padded = generator(["ROMEO:", "A"], batch_size=2, max_new_tokens=5, do_sample=False)  # left padding
        assert [len(rows[0]["generated_text"]) for rows in padded] == [11, 6], padded
        print("ok")
    """)
    # the pad id lies outside the vocabulary: the generation config holds it, config.json does not (transformers
    # would warn on every load)
    config = json.loads((out / "config.json").read_text())
    assert config.get("pad_token_id") is None
    assert json.loads((out / "generation_config.json").read_text())["pad_token_id"] == config["vocab_size"]
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    done = run_without_nanoebm(script, cwd=elsewhere, modules_cache=tmp_path / "modules")
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stderr[-3000:]


def test_continue_from_a_saved_folder(tmp_path, small_corpus, monkeypatch):
    first, _ = train(tmp_path / "first", small_corpus, "--max_steps", "4", "--do_train", "true")
    out = tmp_path / "second"
    monkeypatch.setenv("HOME", str(tmp_path))  # a path as the shell leaves it in --flag=~/...
    metrics = run_train.main(["--model_name_or_path=~/first/out", "--data_path", str(small_corpus), "--output_dir",
                              str(out), "--max_steps", "3", "--eval_blocks", "4", "--think_steps", "3",
                              "--report_to", "none", "--disable_tqdm", "true", "--eval_reading_chars", "200"])
    config = json.loads((out / "config.json").read_text())
    assert (config["n_layer"], config["n_embd"], config["block_size"], config["think_steps"]) == (1, 32, 32, 3)
    assert metrics["eval_system2_bpc"] > 0
    with pytest.raises(UsageError, match="block_size"):
        run_train.main(["--model_name_or_path", str(first), "--data_path", str(small_corpus), "--block_size", "64",
                        "--output_dir", str(tmp_path / "third")])


# -- arguments and bad input ------------------------------------------------------------------------------------

def test_research_syntax_maps_onto_the_flags():
    research = run_train.parse_args(["model.use_contrastive=true", "model.contrastive_type=pcd", "train.max_steps=100",
                                     "data.batch_size=64", "model.refine_steps=6", "train.compile=false"])
    flags = run_train.parse_args(["--use_contrastive", "true", "--contrastive_type", "pcd", "--max_steps", "100",
                                  "--per_device_train_batch_size", "64", "--think_steps", "6",
                                  "--torch_compile", "false"])
    for part in ("model", "data", "loss"):
        assert asdict(getattr(research, part)) == asdict(getattr(flags, part))
    ta, tb = research.training, flags.training
    for name in ("max_steps", "per_device_train_batch_size", "torch_compile"):
        assert getattr(ta, name) == getattr(tb, name)
    assert (research.loss.contrastive_type, ta.max_steps, research.model.think_steps) == ("pcd", 100, 6)


@pytest.mark.skipif(torch.cuda.is_available(), reason="pinning is turned off only without an accelerator")
@pytest.mark.parametrize("spelling", [["--dataloader_pin_memory", "true"], ["--dataloader_pin_memory=true"]])
def test_an_explicit_pin_memory_is_kept_in_both_spellings(spelling):
    assert run_train.parse_args(["--preset", "cpu", *spelling]).training.dataloader_pin_memory is True
    assert run_train.parse_args(["--preset", "cpu"]).training.dataloader_pin_memory is False  # no accelerator


def test_a_flag_value_with_an_equals_sign_stays_a_value():
    args = run_train.parse_args(["--run_name", "lr=3e-4", "train.max_steps=7"]).training
    assert (args.run_name, args.max_steps) == ("lr=3e-4", 7)


def test_naming_a_contrastive_type_turns_contrastive_on():
    args = run_train.parse_args(["--contrastive_type", "pcd"]).loss
    assert args.use_contrastive and args.contrastive_type == "pcd"
    assert run_train.parse_args(["--use_contrastive", "true"]).loss.contrastive_type == "cd"
    default = run_train.parse_args([]).loss  # on by default: the measured best recipe trains with cd
    assert default.use_contrastive and default.contrastive_type == "cd"
    off = run_train.parse_args(["--use_contrastive", "false"]).loss
    assert not off.use_contrastive and off.contrastive_type is None


def test_presets():
    gpu = run_train.parse_args(["--preset", "gpu"])
    cpu = run_train.parse_args(["--preset", "cpu", "--max_steps", "7"])
    assert (gpu.model.n_layer, gpu.model.n_embd, gpu.training.per_device_train_batch_size, gpu.training.max_steps) \
        == (6, 384, 64, 5000)
    assert (cpu.model.n_layer, cpu.model.n_embd, cpu.training.learning_rate, cpu.training.max_steps) \
        == (4, 128, 1e-3, 7)
    # the residual init measured best at each size: 0.25 at 6x384 (the config's default), the plain 0.02 at 4x128
    # (the cpu preset's); a flag still wins over the preset
    from nanoebm.continuing import build_model
    from tokenization_char import CharTokenizer

    tokenizer = CharTokenizer(vocab={c: i for i, c in enumerate("abc")})
    flagged = run_train.parse_args(["--preset", "cpu", "--residual_init_power", "0.5"])
    assert [build_model(None, parsed.model, tokenizer).config.residual_init_power
            for parsed in (gpu, cpu, flagged)] == [0.25, 0.0, 0.5]


def test_preset_follows_the_machine_and_says_why(monkeypatch):
    """No --preset: gpu where a GPU is present (named), cpu otherwise or with --use_cpu; each says why."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    args = run_train.parse_args([])
    assert (args.preset, args.preset_reason) == ("cpu", "no GPU here; --preset gpu for the research config")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda index=0: "Test GPU 80GB")
    assert machine_preset(False) == ("gpu", "a GPU is present (Test GPU 80GB)")
    assert machine_preset(True) == ("cpu", "--use_cpu")
    assert run_train.parse_args(["--use_cpu"]).preset_reason == "--use_cpu"


@pytest.mark.parametrize("argv,needle", [
    (["model.contrastve_type=pcd"], "contrastive_type"),
    (["--contrastive_type", "nce"], "allowed"),
    (["--random_think_steps", "3-1"], "LO <= HI"),
])
def test_bad_arguments(argv, needle):
    with pytest.raises((UsageError, ValueError)) as err:
        run_train.parse_args(argv)
    assert needle in str(err.value)


def test_bad_data_and_checkpoints(tmp_path, monkeypatch):
    monkeypatch.setenv("NANOEBM_DATA", str(tmp_path / "nowhere.txt"))
    with pytest.raises(FileNotFoundError) as err:
        resolve_data_path()
    assert "nowhere.txt" in str(err.value) and "NANOEBM_DATA" in str(err.value)
    short = tmp_path / "short.txt"
    short.write_text("to be or not to be")
    with pytest.raises(ValueError, match="fewer than one block"):
        run_train.main([*TINY, "--data_path", str(short), "--output_dir", str(tmp_path / "o")])
    not_a_model = tmp_path / "other"
    not_a_model.mkdir()
    (not_a_model / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(UsageError, match="not a nanoebm"):
        run_train.main([*TINY, "--model_name_or_path", str(not_a_model), "--output_dir", str(tmp_path / "o")])
    assert not (tmp_path / "o" / "model.safetensors").exists()


@pytest.mark.slow
def test_cli_reports_errors_without_a_traceback(tmp_path):
    done = subprocess.run([sys.executable, str(ROOT / "run_train.py"), "--data_path", str(tmp_path / "missing.txt")],
                          capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert done.returncode == 2 and "missing.txt" in done.stderr and "Traceback" not in done.stderr


def test_diverging_training_is_one_message_naming_the_knobs(tmp_path, small_corpus, capfd, monkeypatch):
    """NaN/Inf in a training step: exit status 1, one message naming what to lower, no traceback."""
    monkeypatch.chdir(tmp_path)
    code = run_train.cli([*TINY, "--learning_rate", "1e8", "--max_steps", "30", "--data_path", str(small_corpus),
                          "--output_dir", str(tmp_path / "o")])
    err = capfd.readouterr().err
    assert code == 1 and "Traceback" not in err, err[-2000:]
    assert "At training step" in err and "think_lr" in err, err[-2000:]
    assert "--learning_rate (now 100000000.0)" in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "o" / "model.safetensors").exists()  # no half-made model


@pytest.mark.parametrize("damage", ["truncated", "random"])
def test_continuing_from_damaged_weights_is_one_message(tmp_path, small_corpus, damage, capfd, monkeypatch):
    first, _ = train(tmp_path / "first", small_corpus, "--max_steps", "2", "--do_train", "true")
    weights = first / "model.safetensors"
    raw = weights.read_bytes()
    weights.write_bytes(raw[: len(raw) // 2] if damage == "truncated" else bytes(range(256)) * 8)
    monkeypatch.chdir(tmp_path)
    capfd.readouterr()  # the training run's own output
    code = run_train.cli(["--model_name_or_path", str(first), "--data_path", str(small_corpus), "--output_dir",
                          str(tmp_path / "next")])
    err = capfd.readouterr().err
    assert code == 2 and "Traceback" not in err, err[-2000:]
    assert str(weights) in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "next").exists()  # nothing written


class FailInFirstStep(TrainerCallback):
    def on_step_end(self, args, state, control, **kwargs):
        raise RuntimeError("the run failed in its first step")


def test_output_dir_with_a_finished_model_stops_the_run(tmp_path, small_corpus):
    out, _ = train(tmp_path, small_corpus, "--max_steps", "2", "--do_train", "true")
    (out / "notes.txt").write_text("the user's own")
    before = {path.relative_to(out): path.read_bytes() for path in out.rglob("*") if path.is_file()}
    with pytest.raises(UsageError, match="--overwrite_output_dir"):
        train(tmp_path, small_corpus, "--max_steps", "3", "--do_train", "true")
    # replacing it: the finished model stays until the new one is complete, so a run that fails leaves it whole
    with pytest.raises(RuntimeError, match="first step"):
        train(tmp_path, small_corpus, "--max_steps", "3", "--do_train", "true", "--overwrite_output_dir", "true",
              callbacks=[FailInFirstStep()])
    assert {path.relative_to(out): path.read_bytes() for path in out.rglob("*") if path.is_file()} == before
    train(tmp_path, small_corpus, "--max_steps", "3", "--do_train", "true", "--overwrite_output_dir", "true")
    assert json.loads((out / "nanoebm_run.json").read_text())["runs"][-1]["steps_done"] == 3
    assert (out / "model.safetensors").read_bytes() != before[run_train.Path("model.safetensors")]
    assert (out / "notes.txt").read_text() == "the user's own" and not (out / "checkpoints").exists()
    assert sorted(path.name for path in tmp_path.iterdir()) == ["out"]  # nothing left beside it


# -- continuing and resuming: every flag takes effect or is refused; what a run says afterwards ------------------

@pytest.fixture(scope="module")
def saved(tmp_path_factory, small_corpus):
    """A tiny trained folder whose learned step size has left its initial 0.5."""
    out, _ = train(tmp_path_factory.mktemp("saved"), small_corpus, "--max_steps", "6", "--do_train", "true",
                   "--think_lr_lr_multiplier", "100")
    return out


def continue_model(folder, corpus, *flags):
    """parse_args + build_model as run_train.main does them, for looking at the continued model."""
    parsed = run_train.parse_args(["--model_name_or_path", str(folder), "--data_path", str(corpus), *flags])
    tokenizer = continuing.saved_tokenizer(parsed)
    return continuing.build_model(parsed.start.model_name_or_path, parsed.model, tokenizer)


# a value unlike the saved model's for every model flag a continued run takes
NEW_THINKING = {"use_thinking": "false", "think_steps": "3", "think_lr": "2.0", "think_lr_learnable": "false",
                "think_lr_random_scale": "2.0", "think_samples": "2", "think_samples_noise_std": "0.1",
                "softmax_temperature": "0.5", "entropy_weight": "0.5", "think_max_move": "0.5",
                "absolute_clamp": "30.0", "langevin_noise": "0.1", "mixture_stopgrad": "false", "think_init": "zeros",
                "think_init_noise_std": "0.2", "think_gradient": "natural", "energy_convergence_threshold": "0.001",
                "use_adaptation": "true", "adapt_lr": "0.001", "adapt_params": "head", "adapt_rule": "sgd",
                "adapt_decay": "0.01", "adapt_window": "16", "adapt_rank": "8", "adapt_on_output": "true"}
# and for every flag it keeps
NEW_KEPT = {"n_layer": "2", "n_head": "4", "n_embd": "64", "dropout": "0.2", "bias": "false",
            "position_embedding": "rope", "d_energy": "16", "use_token_bias": "false", "landscape": "linear",
            "use_soft_tokens": "true", "correction_scale_init": "0.5", "block_size": "64",
            "rope_theta": "500.0", "initializer_range": "0.05",
            "residual_init_power": "0.25"}


def test_every_model_flag_is_either_kept_or_taken_on_continue():
    model_flags = {f.name for f in run_train.fields(run_train.ModelArguments)}
    assert model_flags == set(continuing.KEPT_ON_CONTINUE) | set(continuing.THINKING_FIELDS)
    assert not set(continuing.KEPT_ON_CONTINUE) & set(continuing.THINKING_FIELDS)
    assert set(NEW_KEPT) == set(continuing.KEPT_ON_CONTINUE) and set(NEW_THINKING) == set(continuing.THINKING_FIELDS)


@pytest.mark.parametrize("name", sorted(NEW_KEPT))
def test_continuing_refuses_a_flag_the_saved_model_keeps(saved, small_corpus, name):
    with pytest.raises(UsageError) as err:
        continue_model(saved, small_corpus, f"--{name}", NEW_KEPT[name])
    assert f"--{name} " in str(err.value) and "saved model's" in str(err.value)
    continue_model(saved, small_corpus, "--use_soft_tokens", "false")  # the saved value itself is no change


@pytest.mark.parametrize("name", sorted(NEW_THINKING))
def test_continuing_takes_every_thinking_flag_into_the_saved_config(tmp_path, saved, small_corpus, name):
    model = continue_model(saved, small_corpus, f"--{name}", NEW_THINKING[name])
    model.save_pretrained(tmp_path)
    value = json.loads((tmp_path / "config.json").read_text())[name]
    expected = json.loads((saved / "config.json").read_text())[name]
    assert str(value).lower() == NEW_THINKING[name] or value == float(NEW_THINKING[name]), (name, value)
    assert value != expected


def test_continuing_with_think_lr_steps_with_it(saved, small_corpus):
    base = continuing.load_weights(saved)
    learned = float(base.think_lr.detach())
    assert abs(learned - 0.5) > 1e-3  # the saved step size was trained away from its start
    model = continue_model(saved, small_corpus, "--think_lr", "2.0")
    assert model.think_lr.item() == pytest.approx(2.0, abs=1e-6) and model.think_lr_raw.requires_grad
    ids = torch.arange(20)[None] % base.config.vocab_size
    with torch.no_grad():
        expected = base.eval()(ids, think_lr=2.0).logits
        assert torch.allclose(model.eval()(ids).logits, expected, atol=1e-5)
    # without --think_lr the learned step size stays; --think_lr_learnable false fixes it (a saved buffer)
    fixed = continue_model(saved, small_corpus, "--think_lr_learnable", "false")
    assert "think_lr_raw" not in dict(fixed.named_parameters()) and "think_lr_raw" in dict(fixed.named_buffers())
    assert float(fixed.think_lr.detach()) == pytest.approx(learned)


def test_continue_run_saves_and_uses_a_new_fixed_step_size(tmp_path, saved, small_corpus, capsys):
    """The real command: --think_lr 2.0 --think_lr_learnable false, then back to learnable from the fixed folder."""
    common = ["--data_path", str(small_corpus), "--max_steps", "3", "--eval_blocks", "4", "--eval_reading_chars", "200",
              "--report_to", "none",
              "--disable_tqdm", "true", "--do_train", "true", "--think_lr_lr_multiplier", "100",
              "--entropy_weight", "0.5"]  # lambda < tau: System 1 is no longer the descent's fixed point, so every
    # step moves and the step size gets a gradient whatever the (barely trained) correction gate of `saved` says
    fixed = tmp_path / "fixed"
    run_train.main(["--model_name_or_path", str(saved), "--output_dir", str(fixed), "--think_lr", "2.0",
                    "--think_lr_learnable", "false", "--use_soft_tokens", "false", *common])
    said = capsys.readouterr().out
    assert "trained 3 steps in" in said and "the model has 9 in all, with the runs it continues" in said, said
    config = json.loads((fixed / "config.json").read_text())
    assert (config["think_lr"], config["think_lr_learnable"], config["use_soft_tokens"]) == (2.0, False, False)
    raw = load_file(fixed / "model.safetensors")["think_lr_raw"]
    assert torch.nn.functional.softplus(raw).item() == pytest.approx(2.0, abs=1e-6)  # fixed: not trained
    learnable = tmp_path / "learnable"
    run_train.main(["--model_name_or_path", str(fixed), "--output_dir", str(learnable), "--think_lr_learnable", "true",
                    *common])
    raw = load_file(learnable / "model.safetensors")["think_lr_raw"]
    assert json.loads((learnable / "config.json").read_text())["think_lr_learnable"] is True
    assert abs(torch.nn.functional.softplus(raw).item() - 2.0) > 1e-4  # trained from where the fixed one stood


def test_continuing_refuses_vocab_scan_chars(saved, small_corpus):
    with pytest.raises(UsageError, match="vocab_scan_chars"):
        run_train.parse_args(["--model_name_or_path", str(saved), "--vocab_scan_chars", "100"])


@pytest.fixture(scope="module")
def interrupted(tmp_path_factory, small_corpus):
    """A run of 6 steps stopped after its checkpoint at step 3 (a crash: no model files)."""
    folder = tmp_path_factory.mktemp("interrupted")
    out, _ = train(folder, small_corpus, "--max_steps", "6", "--save_steps", "3", "--do_train", "true",
                   "--keep_checkpoints", "true", "--think_steps", "1", callbacks=[StopAt(3)])
    for name in ("model.safetensors", "config.json", "nanoebm_run.json", "README.md", "all_results.json"):
        (out / name).unlink()
    return out / "checkpoints" / "checkpoint-3"


@pytest.mark.parametrize("flag,value", [("--think_steps", "2"), ("--max_steps", "9"), ("--learning_rate", "1e-2"),
                                        ("--think_lr", "2.0"), ("--contrastive_type", "pcd"), ("--preset", "gpu")])
def test_resuming_refuses_a_flag_that_changes_what_the_run_computes(interrupted, flag, value):
    with pytest.raises(UsageError) as err:
        run_train.parse_args(["--resume_from_checkpoint", str(interrupted), flag, value])
    assert f"{flag} " in str(err.value) and "--model_name_or_path CHECKPOINT" in str(err.value)


def test_resuming_accepts_flags_that_only_change_where_results_go(interrupted, tmp_path):
    parsed = run_train.parse_args(["--resume_from_checkpoint", str(interrupted), "--think_steps", "1",
                                   "--logging_steps", "2", "--output_dir", str(tmp_path / "elsewhere"),
                                   "--keep_checkpoints", "false"])
    assert (parsed.model.think_steps, parsed.training.logging_steps) == (1, 2)


def test_resuming_a_checkpoint_without_a_run_record_keeps_its_step_size(interrupted, tmp_path):
    """Without the record the flags cannot be compared, but the step size would silently come back from the weights."""
    import shutil

    bare = tmp_path / "checkpoint-3"
    shutil.copytree(interrupted, bare)
    (bare / "nanoebm_run.json").unlink()
    parsed = run_train.parse_args(["--resume_from_checkpoint", str(bare), "--think_lr", "2.0"])
    with pytest.raises(UsageError, match="--think_lr 2.0 differs from the checkpoint's"):
        continuing.build_model(parsed.start.model_name_or_path, parsed.model, continuing.saved_tokenizer(parsed),
                             resuming=True)


def test_a_resumed_model_trains_in_memory_of_its_own(interrupted):
    """Loaded weights are views into the safetensors file's mapping, at addresses 64-byte alignment does not hold
    for; the CPU's matrix products (MKL) round differently there than on a fresh model's memory, so a resumed
    fast_pcd run of 2x64 ended up to 2.5e-5 away from the run it repeats. Every tensor it trains is its own,
    aligned like a fresh model's."""
    parsed = run_train.parse_args(["--resume_from_checkpoint", str(interrupted)])
    model = continuing.build_model(parsed.start.model_name_or_path, parsed.model, continuing.saved_tokenizer(parsed),
                                   resuming=True)
    misaligned = [name for name, tensor in [*model.named_parameters(), *model.named_buffers()]
                  if tensor.data_ptr() % 64]
    assert not misaligned, misaligned


def test_a_resumed_run_says_how_many_steps_it_did_and_in_all(interrupted, small_corpus, capsys):
    out = interrupted.parent.parent
    capsys.readouterr()
    train(out.parent, small_corpus, "--resume_from_checkpoint", str(interrupted))
    said = capsys.readouterr().out
    assert "trained 3 steps in" in said and "the model has 6 in all" in said, said
    runs = json.loads((out / "nanoebm_run.json").read_text())["runs"]
    assert [run["steps_done"] for run in runs] == [3, 6] and runs[-1]["started_at_step"] == 3
    card = (out / "README.md").read_text()
    assert "6 optimizer steps in all" in card and card.count(" | 3 | ") == 2  # each run's own steps


def test_tensorboard_logs_outlive_the_checkpoints(tmp_path, small_corpus):
    """The Trainer writes TensorBoard's events under its output_dir, <output_dir>/checkpoints here, which a finished
    run removes: they go to <output_dir>/runs/ (transformers' own layout) and stay."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out, _ = train(tmp_path, small_corpus, "--max_steps", "4", "--logging_steps", "2", "--report_to", "tensorboard",
                   "--do_train", "true")
    events = sorted(out.rglob("events.out.tfevents*"))
    assert [path.relative_to(out).parts[0] for path in events] == ["runs"], events
    logged = EventAccumulator(str(events[0].parent)).Reload()
    assert [event.step for event in logged.Scalars("train/loss_pred")] == [2, 4]


def test_a_missing_logger_is_one_line_before_anything_is_written(tmp_path, small_corpus, capfd, monkeypatch):
    import importlib.util

    if importlib.util.find_spec("dvclive"):  # not tensorboard: the dev extra installs it
        pytest.skip("dvclive is installed here")
    out = tmp_path / "o"
    monkeypatch.chdir(tmp_path)
    code = run_train.cli([*TINY, "--data_path", str(small_corpus), "--output_dir", str(out), "--max_steps", "2",
                          "--report_to", "dvclive"])
    assert code == 2 and capfd.readouterr().err.strip().splitlines() == [
        "run_train.py: error: --report_to dvclive: that logger is not available here: pip install dvclive"]
    assert not out.exists()


def test_an_error_while_training_starts_is_one_line_and_leaves_nothing(tmp_path, small_corpus, capsys):
    """An optimizer whose package is missing fails inside Trainer.train, before the first step."""
    import importlib.util

    if importlib.util.find_spec("bitsandbytes"):
        pytest.skip("bitsandbytes is installed here")
    out = tmp_path / "o"
    code = run_train.cli([*TINY, "--data_path", str(small_corpus), "--output_dir", str(out), "--max_steps", "2",
                          "--optim", "adamw_bnb_8bit"])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1 and "pip install -U bitsandbytes" in err, err
    assert "Traceback" not in err and not out.exists()


def test_the_suggested_prompt_is_one_the_model_can_encode(tmp_path, corpus_text):
    """A corpus without H, A, M, L, E or T: the summary and the card suggest its own first line."""
    corpus = tmp_path / "lower.txt"
    corpus.write_text(corpus_text[:30000].lower())
    out = tmp_path / "out"
    import contextlib
    import io

    said = io.StringIO()
    with contextlib.redirect_stdout(said):
        run_train.main([*TINY, "--data_path", str(corpus), "--output_dir", str(out), "--max_steps", "2",
                        "--do_train", "true", "--eval_blocks", "2"])
    line = next(x for x in said.getvalue().splitlines() if "generate:" in x)
    command = shlex.split(line.split("generate:", 1)[1])
    assert command[command.index("--prompt") + 1] == "first citizen:"
    assert line.split("generate:", 1)[1].strip() in (out / "README.md").read_text()
    import run_generate

    assert run_generate.main([*command[2:], "--max_new_tokens", "3", "--no_stream"]) == 0


def test_continuing_on_new_characters_names_them_and_unk_token(tmp_path, saved, small_corpus, capsys):
    text = tmp_path / "new.txt"
    text.write_text(small_corpus.read_text().replace("e", "é").replace("a", "~"))
    argv = ["--model_name_or_path", str(saved), "--data_path", str(text), "--max_steps", "2", "--eval_blocks", "4",
            "--eval_reading_chars", "200", "--report_to", "none", "--disable_tqdm", "true", "--do_train", "true"]
    assert run_train.cli([*argv, "--output_dir", str(tmp_path / "a")]) == 2
    err = capsys.readouterr().err
    assert "'~', 'é'" in err and "--unk_token ' '" in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "a").exists()
    run_train.main([*argv, "--output_dir", str(tmp_path / "b"), "--unk_token", " "])
    assert (tmp_path / "b" / "model.safetensors").is_file()
    # the saved tokenizer still refuses unknown characters: --unk_token was this run's choice
    assert "unk_token" not in json.loads((tmp_path / "b" / "tokenizer_config.json").read_text()) or \
        json.loads((tmp_path / "b" / "tokenizer_config.json").read_text())["unk_token"] is None
    for bad, needle in (("xy", "one character"), ("é", "not a character")):
        assert run_train.cli([*argv, "--output_dir", str(tmp_path / "c"), "--unk_token", bad]) == 2
        assert needle in capsys.readouterr().err
    with pytest.raises(UsageError, match="new model"):
        train(tmp_path / "d", small_corpus, "--unk_token", " ")


@pytest.mark.parametrize("streaming", ["false", "true"])
def test_a_data_set_without_the_text_column_lists_its_columns(tmp_path, small_corpus, streaming, capsys):
    folder = tmp_path / "jsonl"
    folder.mkdir()
    text = small_corpus.read_text()
    with open(folder / "part.jsonl", "w") as handle:
        for i in range(0, len(text), 1000):
            handle.write(json.dumps({"id": i, "content": text[i: i + 1000]}) + "\n")
    argv = [*TINY, "--dataset_name", str(folder), "--streaming", streaming, "--max_steps", "2"]
    assert run_train.cli([*argv, "--output_dir", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "no column 'text'" in err and "'id', 'content'" in err and "--text_column" in err, err
    lines = [line for line in err.strip().splitlines() if "examples/s]" not in line]  # datasets' progress bars
    assert len(lines) == 1 and lines[0].startswith("run_train.py: error:") and not (tmp_path / "o").exists()
    parsed = run_train.parse_args([*argv, "--text_column", "content"])
    train_data, blocks, tokenizer = data.build_data(parsed.data, None, 32, 0)
    assert blocks.shape[1] == 33 and tokenizer.vocab_size > 30
