"""The Energy-Based Transformer's energy (landscape="ebt"): a scalar the backbone computes for a candidate, descended
by autograd through the backbone; its recipes, self-verification, cached decoding and the saved folder."""

import json
import textwrap

import pytest
import torch

import run_train
from conftest import make_model, run_without_nanoebm, tiny_config, train_briefly
from modeling_nanoebm import CACHE_NAME, lowest_energy_sample
from nanoebm.cli import UsageError
from nanoebm.recipes import RECIPES

EBT = dict(landscape="ebt", think_max_move=0.0, entropy_weight=0.0)
# the two starts: the paper's random logits, and nanoebm's hybrid that starts from the System 1 head
PAPER = dict(EBT, think_init="random", think_init_noise_std=1.0, think_samples_noise_std=0.0, think_lr=5.0)
HYBRID = dict(EBT, think_init="base_energy", think_lr=5.0)


@pytest.fixture(scope="module")
def trained(corpus_ids):
    return {name: train_briefly(make_model(think_steps=2, **recipe), corpus_ids, steps=30)
            for name, recipe in (("paper", PAPER), ("hybrid", HYBRID))}


def test_config():
    cfg = tiny_config(**HYBRID)
    assert cfg.reads_candidate and not cfg.use_soft_tokens
    for field, value, needle in (("think_gradient", "natural", "only 'plain'"), ("think_samples", 0, ">= 1"),
                                 ("think_lr_random_scale", 0.5, ">= 1"), ("think_samples_noise_std", -1.0, ">= 0")):
        with pytest.raises(ValueError) as err:
            tiny_config(**{**HYBRID, field: value})
        assert field in str(err.value) and needle in str(err.value)


def test_energy_is_a_scalar_per_candidate_that_reads_the_context():
    model = make_model(**HYBRID).eval()
    ids = torch.randint(0, 65, (2, 12))
    with torch.no_grad():
        out = model(ids, return_landscape=True, think_steps=1)
        landscape = out.landscape
        p = torch.softmax(torch.randn(2, 12, 65), -1)
        energy = landscape.scalar(p, **landscape.inputs)
        assert energy.shape == (2, 12)
        # the candidate at t reads the real tokens 0..t: changing token t changes E at t, never at t' < t
        changed = ids.clone()
        changed[:, 6] = (changed[:, 6] + 1) % 65
        other = model(changed, return_landscape=True, think_steps=1).landscape
        moved = (other.scalar(p, **other.inputs) - energy).abs()
    assert moved[:, :6].max() < 1e-5 and moved[:, 6:].min() > 0
    # the verifier's score of a token is the energy of its one-hot belief
    tokens = torch.randint(0, 65, (2, 12))
    one_hot = torch.nn.functional.one_hot(tokens, 65).float()
    assert torch.allclose(landscape.token_energy(tokens), landscape.scalar(one_hot, **landscape.inputs))


@pytest.mark.parametrize("recipe", ["paper", "hybrid"])
def test_gradients_reach_every_parameter_through_the_unrolled_descent(recipe):
    """The Trainer's loss: (1 - aux) CE(refined) + aux CE(System 1). From a random start (the paper's recipes, aux 0)
    the refined logits depend on the model only through the descent: the backbone learns through second-order
    gradients alone, and the per-token System 1 head is idle (what aux_ce_weight > 0 trains)."""
    model = make_model(think_steps=2, **(PAPER if recipe == "paper" else HYBRID)).train()
    ids = torch.randint(0, 65, (2, 32))
    out = model(ids, shift_labels=ids)
    aux = 0.0 if recipe == "paper" else 0.1
    loss = (1 - aux) * out.loss + aux * model.next_token_loss(out.system1_logits, shift_labels=ids)
    loss.backward()
    silent = {n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0}
    if recipe == "hybrid":
        assert silent == set()
    else:  # E = w . LN(h'): LN's shift moves E by a constant, never its gradient
        assert silent == {"energy_head.context_proj.weight", "energy_head.token_proj.weight",
                          "energy_head.token_bias", "transformer.ln_f.bias"}
    # second order: the scalar head's weight w gets its gradient only through dE/dv
    assert model.energy_head.scalar.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("recipe", ["paper", "hybrid"])
@pytest.mark.parametrize("steps", [2, 6])
def test_descent_lowers_the_energy_step_by_step(trained, corpus_ids, recipe, steps):
    """The model's own descent (its trained step size), for the trained number of steps and for longer."""
    model = trained[recipe]
    ids = corpus_ids[2000:2032][None].repeat(4, 1)
    torch.manual_seed(0)
    with torch.no_grad():
        trace = model(ids, think_steps=steps).energy_trace  # (4, 32, steps + 1)
    assert trace.shape == (4, 32, steps + 1)
    assert (trace[..., -1] < trace[..., 0]).float().mean() > 0.95
    assert (trace[..., 1:] <= trace[..., :-1] + 1e-5).float().mean() > 0.95


def test_thinking_improves_the_prediction_from_a_random_start(trained, corpus_ids):
    model = trained["paper"]
    ids = corpus_ids[3000:3000 + 33 * 24].view(24, 33)
    start = torch.randn(24, 32, 65, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        mask = torch.ones(24, 32, dtype=torch.bool)
        out = model(ids[:, :-1], think_steps=2, think_start=start, think_start_mask=mask)
    ce = [float(model.next_token_loss(v, shift_labels=ids[:, 1:])) for v in (start, *out.step_logits)]
    assert ce[2] < ce[1] < ce[0] - 0.03, ce  # after 30 training steps: the descent has learned a direction


def test_alpha_is_scaled_per_row_and_position_in_training():
    model = make_model(**{**HYBRID, "think_lr_random_scale": 2.0}).train()
    ids = torch.randint(0, 65, (2, 16))
    landscape = model(ids, use_thinking=False, return_landscape=True).landscape
    start, mask = torch.randn(2, 16, 65), torch.ones(2, 16, dtype=torch.bool)
    with torch.no_grad():
        moved = start - start.mean(-1, keepdim=True) - model.think(
            landscape, 1, think_lr=1.0, create_graph=False, start=start, start_mask=mask)[0]
        model.eval()  # no random factor: the plain step
        plain = start - start.mean(-1, keepdim=True) - model.think(
            landscape, 1, think_lr=1.0, start=start, start_mask=mask)[0]
    factor = (moved / plain).median(-1).values  # (2, 16): one factor per row and position
    assert factor.min() >= 0.5 - 1e-4 and factor.max() <= 2.0 + 1e-4
    assert factor.std() > 0.1
    assert torch.allclose(moved, plain * factor[..., None], atol=1e-5)


def test_self_verification_keeps_the_lowest_final_energy(trained, corpus_ids):
    model = trained["hybrid"]
    ids = corpus_ids[500:520][None]
    think = model.think
    seen = {}

    def recording(*args, **kwargs):  # the real descent, with every sample's result kept for the check
        seen["result"] = think(*args, **kwargs)
        return seen["result"]

    model.think = recording
    model.config.think_samples_noise_std = 1.0  # starts apart (the default 0 makes them one System 1 start)
    try:
        with torch.no_grad():
            single = model(ids, think_steps=3)
            torch.manual_seed(0)
            verified = model(ids, think_steps=3, think_samples=4)
    finally:
        del model.think
        model.config.think_samples_noise_std = 0.0
    logits, _, trace = seen["result"]  # (1, 4 * 20, V) and (1, 4 * 20, 4): sample-major
    finals = trace[..., -1].unflatten(1, (4, 20))
    assert torch.allclose(verified.energy_trace[..., -1], finals.min(1).values)
    best = finals.argmin(1)
    # think descends centred logits; forward returns them with System 1's mean
    assert torch.equal(verified.logits, lowest_energy_sample(logits, best) + verified.system1_logits.mean(-1, True))
    assert verified.energies.shape == verified.logits.shape == single.logits.shape
    # the first sample starts where G = 1 starts: self-verification never ends higher than a single descent
    assert torch.allclose(finals[:, 0], single.energy_trace[..., -1], atol=1e-5)
    assert (verified.energy_trace[..., -1] <= single.energy_trace[..., -1] + 1e-6).all()
    assert (verified.energy_trace[..., -1] < single.energy_trace[..., -1] - 1e-4).any()


def test_self_verification_from_a_system1_start_is_one_descent_by_default(trained, corpus_ids):
    """The default start noise is 0 (BENCHMARKS.md: no noise made the lowest-energy sample better), so G samples
    from a System 1 start are G copies of one descent: the same logits, never worse."""
    model, ids = trained["hybrid"], corpus_ids[500:520][None]
    assert model.config.think_samples_noise_std == 0.0
    with torch.no_grad():
        single, verified = model(ids, think_steps=2), model(ids, think_steps=2, think_samples=3)
    assert torch.allclose(verified.logits, single.logits, atol=1e-5)


@pytest.mark.parametrize("recipe", ["paper", "hybrid"])
@pytest.mark.parametrize("position_embedding", ["learned", "rope"])
def test_cached_and_uncached_decoding_agree(recipe, position_embedding, corpus_ids):
    """Greedy, with self-verification. Within block_size the cached and uncached paths give the same tokens; past it
    the cached path is what the other landscapes' cached path is (tests/test_model.py): for learned positions a
    re-read window that grows from block/2 to block, for rope a block_size attention band. The descent reads the
    cached keys and values and writes nothing to the cache."""
    block = 16
    model = make_model(seed=1, block_size=block, position_embedding=position_embedding,
                       **(PAPER if recipe == "paper" else HYBRID)).eval()
    prompt = corpus_ids[:6][None]
    kw = dict(do_sample=False, think_steps=3, think_samples=2)

    def generate(new, use_cache):
        torch.manual_seed(0)  # the random starts draw the same numbers on every path
        return model.generate(prompt, max_new_tokens=new, use_cache=use_cache, return_dict_in_generate=True, **kw)

    cached, uncached = generate(block - 6, True), generate(block - 6, False)
    assert torch.equal(cached.sequences, uncached.sequences)
    assert cached[CACHE_NAME].get_seq_length() == block - 1  # real tokens only: no provisional token was cached

    generated = generate(30, True).sequences
    torch.manual_seed(0)
    reference, context = prompt, prompt.shape[1]
    with torch.no_grad():
        for step in range(30):
            if position_embedding == "learned":
                if step:
                    context = context + 1 if context < block else block // 2
                window = reference[:, -context:]
            else:
                window = reference
            logits = model(window, use_cache=False, logits_to_keep=1, think_steps=3, think_samples=2).logits[:, -1]
            reference = torch.cat((reference, logits.argmax(-1, keepdim=True)), dim=1)
    assert torch.equal(generated, reference)


def test_thinking_works_under_inference_mode(trained, corpus_ids):
    """Pipelines decode under torch.inference_mode; the descent still needs autograd through the backbone."""
    model = trained["hybrid"]
    ids = corpus_ids[100:110][None]
    with torch.no_grad():
        expected = model(ids, think_steps=2).logits
    with torch.inference_mode():
        got = model(ids, think_steps=2).logits
    assert torch.allclose(got, expected, atol=1e-5)


def test_nan_during_thinking_names_the_knob():
    model = make_model(**{**HYBRID, "think_lr": 1e38}).eval()
    with torch.no_grad():
        model.energy_head.scalar.weight.mul_(1e30)
    with pytest.raises(FloatingPointError, match="think_lr"):
        model(torch.randint(0, 65, (1, 8)), think_steps=3)


# -- recipes ----------------------------------------------------------------------------------------------------

def test_recipes_set_their_flags_and_the_command_line_wins(tmp_path):
    parsed = run_train.parse_args(["--recipe", "ebt_system2", "--output_dir", str(tmp_path)])
    m, loss = parsed.model, parsed.loss
    assert (m.landscape, m.think_init, m.think_lr, m.think_lr_learnable, m.think_lr_random_scale, m.langevin_noise) \
        == ("ebt", "random", 5.0, False, 2.0, 3.0)
    assert loss.think_steps_range == (2, 3) and loss.truncate_refine and loss.think_replay_prob == 0.5
    assert loss.think_replay_size == 192 and not loss.use_contrastive and loss.aux_ce_weight == 0
    s1 = run_train.parse_args(["--recipe=ebt_system1", "--think_lr", "100", "--output_dir", str(tmp_path)])
    assert s1.model.think_lr == 100 and s1.loss.detach_refine and s1.loss.think_lr_lr_multiplier == 1500
    hybrid = run_train.parse_args(["--recipe", "ebt_hybrid", "--contrastive_type", "pcd",
                                   "--output_dir", str(tmp_path)])
    assert hybrid.model.think_init == "base_energy" and hybrid.loss.contrastive_type == "pcd"
    paper_pcd = run_train.parse_args(["--recipe", "ebt_system2", "--contrastive_type", "pcd",
                                      "--output_dir", str(tmp_path)])
    assert paper_pcd.loss.use_contrastive  # naming a sampler turns the term on over the recipe's "off"
    hybrid_off = run_train.parse_args(["--recipe", "ebt_hybrid", "--use_contrastive", "false",
                                       "--output_dir", str(tmp_path)])
    assert not hybrid_off.loss.use_contrastive and hybrid_off.model.think_init == "base_energy"
    with pytest.raises(UsageError, match="ebt_system1"):
        run_train.parse_args(["--recipe", "ebt_s3", "--output_dir", str(tmp_path)])
    assert set(RECIPES) == {"ebt_system2", "ebt_system1", "ebt_hybrid"}


@pytest.mark.parametrize("recipe", ["ebt_system2", "ebt_hybrid"])
def test_a_short_run_of_each_recipe(tmp_path, corpus_text, recipe, capsys):
    """A real Trainer run: random step counts, the replay buffer, Langevin noise and random alpha (system2), or
    the System 1 start with auxiliary CE and contrastive divergence (hybrid)."""
    data = tmp_path / "small.txt"
    data.write_text(corpus_text[:20000])
    out = tmp_path / "out"
    metrics = run_train.main(["--recipe", recipe, "--preset", "cpu", "--n_layer", "1", "--n_head", "2", "--n_embd",
                              "32", "--block_size", "16", "--per_device_train_batch_size", "4", "--max_steps", "6",
                              "--eval_blocks", "4", "--eval_reading_chars", "200", "--logging_steps", "2",
                              "--report_to", "none", "--disable_tqdm", "true", "--data_path", str(data),
                              "--output_dir", str(out)])
    assert all(torch.isfinite(torch.tensor(v)) for k, v in metrics.items() if k.endswith("_bpc"))
    config = json.loads((out / "config.json").read_text())
    assert config["landscape"] == "ebt"
    record = json.loads((out / "nanoebm_run.json").read_text())
    assert "--recipe" in record["runs"][-1]["argv"]
    # the paper's recipe does not start thinking from the per-token head: the card and summary say so
    idle_head = "System 1 (per-token head; thinking starts from random logits)"
    assert (idle_head in (out / "README.md").read_text()) == (recipe == "ebt_system2")
    assert (idle_head in capsys.readouterr().out) == (recipe == "ebt_system2")


# -- the saved folder -------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_round_trip_through_trust_remote_code_and_pipeline(trained, corpus_text, tmp_path):
    from tokenization_char import CharTokenizer

    model = trained["hybrid"]
    folder = tmp_path / "ebt"
    model.save_pretrained(folder)
    CharTokenizer.from_corpus(corpus_text).save_pretrained(folder)
    torch.manual_seed(0)
    with torch.no_grad():
        expected = model.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=12, do_sample=False, think_steps=2,
                                  think_samples=2).tolist()
    script = textwrap.dedent(f"""
        import json, torch
        from transformers import AutoModelForCausalLM, pipeline
        model = AutoModelForCausalLM.from_pretrained({str(folder)!r}, trust_remote_code=True).eval()
        torch.manual_seed(0)
        with torch.no_grad():
            ids = model.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=12, do_sample=False, think_steps=2,
                                 think_samples=2).tolist()
        generator = pipeline("text-generation", model={str(folder)!r}, trust_remote_code=True)
        text = generator("ROMEO:", max_new_tokens=8, do_sample=False, think_steps=2, think_samples=3,
                         return_full_text=False)[0]["generated_text"]
        print(json.dumps(dict(landscape=model.config.landscape, ids=ids, text=text)))
    """)
    done = run_without_nanoebm(script, cwd=tmp_path, modules_cache=tmp_path / "modules")
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["landscape"] == "ebt" and result["ids"] == expected and len(result["text"]) == 8


@pytest.mark.parametrize("think_init", ["base_energy", "random"])
def test_energy_bowl_starts_where_the_descent_started(think_init, corpus_ids):
    """run_generate --plot's bowl runs from the start the descent really drew (a random one replayed from its seed),
    so J at t = 0 is the first energy of the model's own trace; the caller's random state is left as it was."""
    from nanoebm.analysis import energy_bowl

    overrides = dict(think_init_noise_std=1.0) if think_init == "random" else {}
    model = make_model(landscape="ebt", think_init=think_init, think_samples=2, **overrides).eval()
    ids = corpus_ids[:40][None]
    state = torch.get_rng_state()
    bowl = energy_bowl(model, ids, target=30, window_start=5, think_steps=2, think_lr=1.0)
    assert torch.equal(torch.get_rng_state(), state)
    assert abs(bowl["J0"] - bowl["J_k"][0]) < 1e-5 and abs(bowl["t_k"][0]) < 1e-6 and len(bowl["J_k"]) == 3
    if think_init == "base_energy":  # v0 is System 1: the move to t = 1 is the refined logits' distance from it
        with torch.no_grad():
            out = model(ids[:, 5:30], use_cache=False, think_steps=2, think_lr=1.0, think_samples=1)
        refined, system1 = out.logits[0, -1], out.system1_logits[0, -1]
        move = (refined - refined.mean()) - (system1 - system1.mean())  # a constant per position is no move
        assert bowl["max_move"] == pytest.approx(float(move.abs().max()), rel=1e-3)
