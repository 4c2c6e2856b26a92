"""The model: config validation, forward/backward, the thinking maths, KV cache, padding, sliding window."""

import pytest
import torch
from transformers.cache_utils import DynamicCache

from conftest import make_model, tiny_config, train_briefly
from configuration_nanoebm import NanoEBMConfig
from modeling_nanoebm import CACHE_NAME, ThinkingDivergedError

LANDSCAPES = ["linear", "mixture", "soft_tokens"]


@pytest.fixture(scope="module")
def trained(corpus_ids):
    return {land: train_briefly(make_model(landscape=land, think_lr=1.0), corpus_ids) for land in LANDSCAPES}


# -- config ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("field,value,needle", [
    ("n_embd", 31, "divisible by n_head"),
    ("think_steps", -1, ">= 0"),
    ("softmax_temperature", 0.0, "> 0"),
    ("think_init", "noise", "allowed"),
    ("landscape", "quadratic", "allowed"),
    ("position_embedding", "alibi", "allowed"),
    ("think_max_move", -0.1, ">= 0"),
    ("dropout", 1.0, "[0, 1)"),
    ("residual_init_power", -0.5, ">= 0"),
    ("residual_init_power", float("nan"), ">= 0"),
])
def test_config_rejects_bad_values(field, value, needle):
    with pytest.raises(ValueError) as err:
        tiny_config(**{field: value})
    assert field in str(err.value) and repr(value) in str(err.value) and needle in str(err.value)


def test_config_aliases_and_soft_token_flag():
    cfg = NanoEBMConfig(refine_steps=6, alpha_value=0.3, use_soft_tokens=True)
    assert (cfg.think_steps, cfg.think_lr, cfg.landscape, cfg.use_soft_tokens) == (6, 0.3, "soft_tokens", True)
    assert cfg.hidden_size == cfg.n_embd and cfg.num_hidden_layers == cfg.n_layer
    # block_size is not exposed as max_position_embeddings: generate would cap max_length at it and warn past it,
    # although decoding past block_size is supported; the name is still accepted on the way in
    assert not hasattr(cfg, "max_position_embeddings")
    assert NanoEBMConfig(max_position_embeddings=128).block_size == 128
    with pytest.raises(ValueError, match="use_soft_tokens"):
        NanoEBMConfig(use_soft_tokens=True, landscape="linear")
    with pytest.raises(ValueError, match="think_init_noise_std"):
        NanoEBMConfig(think_init="random")
    reloaded = NanoEBMConfig.from_dict(cfg.to_dict())
    assert reloaded.landscape == "soft_tokens" and reloaded.think_steps == 6


# -- forward / backward ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("landscape", LANDSCAPES)
@pytest.mark.parametrize("stopgrad", [True, False])
def test_forward_shapes_and_every_parameter_learns(landscape, stopgrad):
    model = make_model(landscape=landscape, mixture_stopgrad=stopgrad, think_steps=3, correction_scale=0.5).train()
    ids = torch.randint(0, 65, (2, 32))
    out = model(ids, labels=ids)
    assert out.logits.shape == out.system1_logits.shape == out.energies.shape == (2, 32, 65)
    assert len(out.step_logits) == 3 and out.energy_trace.shape == (2, 32, 4)
    assert torch.allclose(out.system1_logits, -out.energies)
    out.loss.backward()
    silent = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert silent == []


def test_system1_when_thinking_is_off(corpus_ids):
    model = train_briefly(make_model(landscape="mixture", correction_scale=1.0), corpus_ids, steps=20)
    ids = corpus_ids[100:116][None]
    with torch.no_grad():
        out = model(ids, use_thinking=False)
        thought = model(ids, think_steps=2, think_lr=2.0)
        model.config.use_thinking = False
        off = model(ids, think_steps=2)
    assert torch.equal(out.logits, out.system1_logits) and out.step_logits == ()
    assert torch.equal(off.logits, out.system1_logits) and off.step_logits == ()
    # thinking on changes the distribution itself, not a constant per position (which no softmax sees)
    moved = (thought.logits.log_softmax(-1) - out.logits.log_softmax(-1)).abs().amax(-1)
    assert moved.min() > 1e-4, moved


def test_closed_form_gradient_equals_autograd_with_p_fixed():
    model = make_model(landscape="mixture", correction_scale=0.8, entropy_weight=0.3, softmax_temperature=0.7)
    ids = torch.randint(0, 65, (2, 12))
    with torch.no_grad():
        hidden = model.transformer(ids, use_cache=False).last_hidden_state
        landscape = model.build_landscape(hidden)
        v = torch.randn(2, 12, 65)
        v = v - v.mean(-1, keepdim=True)  # the loop keeps v centred, so v1 - v is the step alone
    tau, lam = 0.7, 0.3
    p_fixed = torch.softmax(v / tau, -1).detach()
    energy_fixed = landscape(p_fixed).detach()
    v_leaf = v.clone().requires_grad_(True)
    log_p = torch.log_softmax(v_leaf / tau, -1)
    J = (log_p.exp() * energy_fixed).sum(-1) + lam * (log_p.exp() * log_p).sum(-1)
    (autograd,) = torch.autograd.grad(J.sum(), v_leaf)
    # one closed-form step, read back from the model's own loop
    model.config.think_max_move = 0.0
    model.config.think_init_noise_std = 0.0
    model.eval()
    model.initial_logits = lambda base: v  # start the descent at v
    alpha = 0.37
    v1, _, _ = model.think(landscape, steps=1, think_lr=alpha, record_final=False)
    closed = -(v1 - v) / alpha  # v1 = v - alpha g, then centred: g sums to 0 so centring leaves it unchanged
    assert torch.allclose(closed, autograd, atol=1e-5), (closed - autograd).abs().max()


@pytest.mark.parametrize("landscape,entropy_weight", [("linear", 0.1), ("mixture", 0.1)])
def test_thinking_lowers_expected_energy(trained, corpus_ids, landscape, entropy_weight):
    model = trained[landscape]
    ids = corpus_ids[1000:1032][None]
    model.config.entropy_weight = entropy_weight
    try:
        with torch.no_grad():
            trace = model(ids, think_steps=4).energy_trace  # (1, T, 5)
    finally:
        model.config.entropy_weight = 1.0
    assert (trace[..., -1] < trace[..., 0]).float().mean() > 0.95
    assert (trace[..., 1:] <= trace[..., :-1] + 1e-6).float().mean() > 0.95  # step by step
    assert trace[..., 0].mean() - trace[..., -1].mean() > 1e-3  # it moves, unlike the research code's 1e-4


def test_system1_is_the_fixed_point_of_a_fixed_landscape_when_lambda_equals_tau(trained, corpus_ids):
    """J = tau KL(p || softmax(-E / tau)) + const: with no belief-dependent correction there is nothing to fix."""
    model = trained["linear"]
    with torch.no_grad():
        out = model(corpus_ids[:32][None], think_steps=4)
    assert torch.allclose(out.logits, out.system1_logits, atol=1e-4)
    assert torch.allclose(out.energy_trace[..., -1], out.energy_trace[..., 0], atol=1e-5)


def test_coupled_path_descends_too(trained, corpus_ids):
    model = trained["mixture"]
    model.config.mixture_stopgrad, model.config.entropy_weight = False, 0.1
    try:
        with torch.no_grad():
            trace = model(corpus_ids[:32][None], think_steps=3).energy_trace
    finally:
        model.config.mixture_stopgrad, model.config.entropy_weight = True, 1.0
    assert trace[..., -1].mean() < trace[..., 0].mean()


def test_nan_during_thinking_names_the_knob():
    model = make_model(think_max_move=0.0).eval()
    with pytest.raises(ThinkingDivergedError, match="think_lr"):
        model(torch.randint(0, 65, (1, 8)), think_lr=1e39, think_steps=3)  # overflows float32


def test_early_stop_is_per_position_and_keeps_every_step(corpus_ids):
    """energy_convergence_threshold: each position stops once its own |J_k - J_(k-1)| is below it and then repeats
    its logits and J, so a row's result never depends on the rows it is batched with and there are always K steps.
    Here the first row's positions all settle within 3 steps, some of the second row's take 4."""
    model = train_briefly(make_model(landscape="mixture", correction_scale=1.0), corpus_ids, steps=20)
    rows = torch.stack([corpus_ids[100:116], corpus_ids[5000:5016]])
    kw = dict(think_steps=6, think_lr=2.0)
    with torch.no_grad():
        full = model(rows, **kw)
        model.config.energy_convergence_threshold = 3e-4
        batch = model(rows, **kw)
        alone = [model(row[None], **kw) for row in rows]
    assert len(batch.step_logits) == 6 and batch.energy_trace.shape == (2, 16, 7)
    for r in range(2):
        assert torch.allclose(batch.logits[r], alone[r].logits[0], atol=1e-5)
        assert torch.allclose(batch.energy_trace[r], alone[r].energy_trace[0], atol=1e-6)
    # how many steps each position moves: up to the first k where its own J changed by less than the threshold
    settled = full.energy_trace.diff(dim=-1).abs() < 3e-4
    expected = torch.where(settled.any(-1), settled.float().argmax(-1) + 1, 6)
    assert expected[0].max() == 3 and expected[1].max() == 4 and expected.min() == 1
    steps = torch.stack(batch.step_logits, -1)
    moved = torch.cat([torch.ones(2, 16, 1, dtype=torch.bool), (steps.diff(dim=-1) != 0).any(-2)], -1)
    assert torch.equal(moved, torch.arange(6) < expected[..., None])  # moves until settled, never after
    trace = batch.energy_trace
    assert torch.equal(trace[..., 1:] == trace[..., :-1], torch.arange(1, 7) > expected[..., None])


def test_detach_refine_and_early_stop_keep_the_gradient_of_the_last_move():
    """detach_refine cuts the graph between steps, never after the last one: forward's loss on v_K trains. A position
    that stopped early repeats its v_k with the graph of the step that made it, so a loss on v_K trains as one on
    v_k."""
    model = make_model(landscape="mixture", correction_scale=1.0).train()
    ids = torch.randint(0, 65, (2, 12))
    scale = model.energy_head.correction_scale
    out = model(ids, shift_labels=ids, think_steps=3, detach_refine=True)
    assert torch.autograd.grad(out.loss, scale)[0] != 0
    model.config.energy_convergence_threshold = 1e9  # every position stops after its first step
    out = model(ids, shift_labels=ids, think_steps=3, detach_refine=True)
    assert len(out.step_logits) == 3 and torch.equal(out.step_logits[-1], out.step_logits[0])
    (last,) = torch.autograd.grad(out.loss, scale, retain_graph=True)
    (first,) = torch.autograd.grad(model.next_token_loss(out.step_logits[0], shift_labels=ids), scale)
    assert last != 0 and torch.allclose(last, first, rtol=1e-4)


def test_detach_system1_trains_only_the_energy_from_the_thinking_loss():
    """detach_system1: the refined CE's gradient reaches the mixture MLP, its gate and alpha, never the backbone or the
    base head (System 1 learns from its own CE, which still reaches them); the logits are the same numbers."""
    torch.manual_seed(0)
    model = make_model(landscape="mixture", correction_scale=0.5).train()
    ids = torch.randint(0, 65, (2, 12))
    torch.manual_seed(1)
    plain = model(ids, shift_labels=ids, think_steps=2)
    torch.manual_seed(1)
    out = model(ids, shift_labels=ids, think_steps=2, detach_system1=True)
    assert torch.allclose(out.logits, plain.logits) and torch.allclose(out.system1_logits, plain.system1_logits)
    named = dict(model.named_parameters())
    grads = torch.autograd.grad(out.loss, list(named.values()), allow_unused=True, retain_graph=True)
    moved = {name for name, g in zip(named, grads) if g is not None and g.abs().sum() > 0}
    energy_own = {name for name in named if name.startswith("energy_head.mixture") or name in (
        "energy_head.correction_scale", "think_lr_raw")}
    assert moved and moved <= energy_own and "think_lr_raw" in moved and "energy_head.correction_scale" in moved
    system1_loss = model.next_token_loss(out.system1_logits, shift_labels=ids)
    grads = torch.autograd.grad(system1_loss, list(named.values()), allow_unused=True)
    reached = {name for name, g in zip(named, grads) if g is not None and g.abs().sum() > 0}
    assert "transformer.wte.weight" in reached and "energy_head.context_proj.weight" in reached
    assert not reached & energy_own


def test_detach_system1_refuses_an_energy_computed_by_the_backbone():
    model = make_model(landscape="soft_tokens").train()
    with pytest.raises(ValueError, match="detach_system1=True .*'soft_tokens'"):
        model(torch.randint(0, 65, (1, 8)), think_steps=1, detach_system1=True)


def test_bad_forward_inputs():
    model = make_model().eval()
    with pytest.raises(ValueError, match="empty"):
        model(torch.zeros(1, 0, dtype=torch.long))
    with pytest.raises(ValueError, match="block_size=32"):
        model(torch.zeros(1, 33, dtype=torch.long))
    with pytest.raises(ValueError, match="think_steps"):
        model(torch.zeros(1, 3, dtype=torch.long), think_steps=-2)


# -- generation -----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("landscape", LANDSCAPES)
@pytest.mark.parametrize("thinking", [True, False])
def test_cached_and_uncached_decoding_agree(trained, corpus_ids, landscape, thinking):
    model = trained[landscape]
    prompt = corpus_ids[:8][None]
    kw = dict(max_new_tokens=20, do_sample=False, use_thinking=thinking, think_steps=3)
    cached = model.generate(prompt, **kw)
    uncached = model.generate(prompt, use_cache=False, **kw)
    assert torch.equal(cached, uncached)


def test_thinking_changes_what_is_decoded(corpus_ids):
    model = train_briefly(make_model(landscape="mixture", correction_scale=1.0), corpus_ids, steps=20)
    prompt = corpus_ids[:8][None]
    kw = dict(max_new_tokens=40, do_sample=False, output_scores=True, return_dict_in_generate=True)
    s1 = model.generate(prompt, use_thinking=False, **kw)
    s2 = model.generate(prompt, think_steps=4, think_lr=3.0, **kw)
    first = s1.scores[0].log_softmax(-1)  # the same prompt: the first distributions differ by thinking alone
    assert (s2.scores[0].log_softmax(-1) - first).abs().max() > 1e-2
    assert not torch.equal(s1.sequences, s2.sequences)


def test_refined_logits_are_on_system1s_scale(trained, corpus_ids):
    """System 2's logits carry System 1's mean over the vocabulary, so processors that read raw values treat the two
    alike. At the fixed point (linear landscape, lambda = tau = 1, System 1 start) thinking changes nothing: its
    logits are System 1's, and repetition_penalty, which divides positive and multiplies negative scores, acts on
    them identically."""
    from transformers import RepetitionPenaltyLogitsProcessor

    model = trained["linear"]
    prompt = corpus_ids[:12][None]
    with torch.no_grad():
        out = model(prompt, think_steps=4)
    assert out.system1_logits.mean(-1).abs().min() > 0.5  # a shift the centred descent would have lost
    assert torch.allclose(out.logits, out.system1_logits, atol=1e-5)
    penalty = RepetitionPenaltyLogitsProcessor(1.5)
    s1, s2 = out.system1_logits[:, -1], out.logits[:, -1]
    assert torch.allclose(penalty(prompt, s2.clone()), penalty(prompt, s1.clone()), atol=1e-5)
    kw = dict(max_new_tokens=6, do_sample=False, output_scores=True, return_dict_in_generate=True,
              repetition_penalty=1.5)
    system1, system2 = model.generate(prompt, use_thinking=False, **kw), model.generate(prompt, think_steps=4, **kw)
    assert torch.equal(system1.sequences, system2.sequences)
    for a, b in zip(system1.scores, system2.scores):
        assert torch.allclose(a, b, atol=1e-5)
    # a fresh model, and a landscape where thinking moves: the scores' scale (logsumexp) stays System 1's
    for model in (make_model(), train_briefly(make_model(correction_scale=1.0), corpus_ids, steps=20)):
        kw = dict(max_new_tokens=1, do_sample=False, output_scores=True, return_dict_in_generate=True)
        a = model.generate(prompt, use_thinking=False, **kw).scores[0]
        b = model.generate(prompt, think_steps=4, think_lr=2.0, **kw).scores[0]
        assert torch.allclose(b.mean(-1), a.mean(-1), atol=1e-5)
        assert (b.logsumexp(-1) - a.logsumexp(-1)).abs().max() < 0.05


@pytest.mark.parametrize("landscape", LANDSCAPES)
def test_left_padded_batch_equals_one_by_one(trained, corpus_ids, landscape):
    model = trained[landscape]
    prompts = [corpus_ids[100:110], corpus_ids[300:304], corpus_ids[500:507]]
    width = max(len(p) for p in prompts)
    ids = torch.zeros(len(prompts), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, p in enumerate(prompts):
        ids[row, width - len(p):], mask[row, width - len(p):] = p, 1
    batched = model.generate(ids, attention_mask=mask, max_new_tokens=12, do_sample=False, pad_token_id=0)
    for row, p in enumerate(prompts):
        single = model.generate(p[None], max_new_tokens=12, do_sample=False)
        assert torch.equal(batched[row, width:], single[0, len(p):])


@pytest.mark.parametrize("landscape", LANDSCAPES)
def test_learned_positions_past_block_size_reread_half_windows(trained, corpus_ids, landscape):
    """Past block_size the cached path equals re-reading a window that grows from block/2 to block, then resets."""
    model, block = trained[landscape], 32
    prompt = corpus_ids[:10][None]
    generated = model.generate(prompt, max_new_tokens=60, do_sample=False)
    reference, context = prompt, prompt.shape[1]
    with torch.no_grad():
        for step in range(60):
            if step:
                context = context + 1 if context < block else block // 2
            logits = model(reference[:, -context:], use_cache=False).logits[:, -1]
            reference = torch.cat((reference, logits.argmax(-1, keepdim=True)), dim=1)
    assert torch.equal(generated, reference)


@pytest.mark.parametrize("landscape", LANDSCAPES)
def test_rope_past_block_size_is_sliding_window_attention(corpus_ids, landscape):
    """With rotary positions the cached path equals one full-sequence pass with a block_size attention band."""
    model = make_model(landscape=landscape, position_embedding="rope", think_lr=1.0)
    model = train_briefly(model, corpus_ids, steps=15)
    prompt = corpus_ids[:10][None]
    generated = model.generate(prompt, max_new_tokens=50, do_sample=False, think_steps=2)
    reference = prompt
    with torch.no_grad():
        for _ in range(50):
            logits = model(reference, use_cache=False, think_steps=2).logits[:, -1]
            reference = torch.cat((reference, logits.argmax(-1, keepdim=True)), dim=1)
    assert torch.equal(generated, reference)


def test_long_prompt_is_cropped_from_the_left(trained, corpus_ids):
    model = trained["linear"]
    long_prompt = corpus_ids[:50][None]
    out = model.generate(long_prompt, max_new_tokens=5, do_sample=False)
    assert torch.equal(out[:, :50], long_prompt)
    cropped = model.generate(long_prompt[:, -32:], max_new_tokens=5, do_sample=False)
    assert torch.equal(out[:, 50:], cropped[:, 32:])


@pytest.mark.parametrize("position_embedding", ["learned", "rope"])
def test_a_reused_cache_decodes_as_a_fresh_one(corpus_ids, position_embedding):
    """A cache passed to a second generate call (continuing the first one's text) brings nothing of the first call
    with it: the second call decodes exactly as a call on the same text with a fresh cache. The first call's text
    outgrows block_size, so its windows, and what its cache holds, differ from those of a call that starts there."""
    model = make_model(landscape="mixture", correction_scale=0.5, position_embedding=position_embedding).eval()
    kw = dict(do_sample=False, output_scores=True, return_dict_in_generate=True)
    cache = DynamicCache(config=model.config)
    first = model.generate(corpus_ids[:20][None], max_new_tokens=20, **{CACHE_NAME: cache}, **kw)
    assert first[CACHE_NAME] is cache and cache.get_seq_length() > 0
    again = model.generate(first.sequences, max_new_tokens=12, **{CACHE_NAME: cache}, **kw)
    fresh = model.generate(first.sequences, max_new_tokens=12, **kw)
    assert torch.equal(again.sequences, fresh.sequences)
    for a, b in zip(again.scores, fresh.scores):
        assert torch.equal(a, b)


def test_every_decoding_strategy_runs_on_refined_scores(trained, corpus_ids):
    model = trained["mixture"]
    prompt = corpus_ids[:8][None]
    torch.manual_seed(0)
    sampled = model.generate(prompt, max_new_tokens=10, do_sample=True, top_k=20, top_p=0.9, temperature=1.2,
                             think_steps=4, repetition_penalty=1.1)
    beams = model.generate(prompt, max_new_tokens=10, num_beams=3, do_sample=False, think_steps=2)
    assert sampled.shape == beams.shape == (1, 18)


@pytest.mark.parametrize("landscape", ["mixture", "soft_tokens"])
def test_coupled_thinking_works_under_inference_mode(landscape):
    """Pipelines decode under torch.inference_mode; the coupled descent still needs autograd through E(h, y | p)."""
    model = make_model(landscape=landscape, mixture_stopgrad=False, correction_scale=0.7).eval()
    ids = torch.randint(0, 65, (2, 10))
    with torch.no_grad():
        expected = model(ids, think_steps=3).logits
    with torch.inference_mode():
        got = model(ids, think_steps=3).logits
    assert torch.allclose(got, expected, atol=1e-6)


def test_natural_gradient_is_a_damped_fixed_point_step():
    """With lambda = tau the natural step on a fixed landscape is v <- (1 - alpha) v - alpha E (up to a constant per
    position: the returned logits have System 1's mean)."""
    model = make_model(landscape="linear", think_gradient="natural", entropy_weight=1.0, think_max_move=0.0,
                       think_init="zeros").eval()
    ids = torch.randint(0, 65, (2, 9))
    with torch.no_grad():
        out = model(ids, think_steps=1, think_lr=0.5)
    target = -0.5 * out.energies
    expected = target - target.mean(-1, keepdim=True) + out.system1_logits.mean(-1, keepdim=True)
    assert torch.allclose(out.logits, expected, atol=1e-5)
    with pytest.raises(ValueError, match="mixture_stopgrad"):
        tiny_config(think_gradient="natural", mixture_stopgrad=False)


def test_open_gate_starts_on_the_base_landscape_and_learns_at_once():
    """correction_scale_init > 0: tanh(s) starts there and the mixture's output layer at zero, so a fresh model
    thinks on the base landscape (System 2 = System 1 when lambda = tau) yet the correction gets gradient at once,
    unlike behind the shut gate, where the correction's gradient is scaled by tanh(0) = 0."""
    ids = torch.randint(0, 65, (2, 16))
    model = make_model(landscape="mixture", correction_scale_init=0.5, entropy_weight=1.0).train()
    assert torch.tanh(model.energy_head.correction_scale).item() == pytest.approx(0.5)
    out = model(ids, labels=ids)
    assert torch.allclose(out.logits, out.system1_logits, atol=1e-5)
    out.loss.backward()
    assert model.energy_head.mixture[-1].weight.grad.abs().sum() > 0
    shut = make_model(landscape="mixture").train()
    shut(ids, labels=ids).loss.backward()
    assert shut.energy_head.mixture[-1].weight.grad.abs().sum() == 0
    with pytest.raises(ValueError, match="correction_scale_init.*mixture"):
        tiny_config(landscape="soft_tokens", correction_scale_init=0.5)
    with pytest.raises(ValueError, match="correction_scale_init"):
        tiny_config(correction_scale_init=1.0)


def test_think_start_replaces_the_initial_logits_where_masked():
    model = make_model(landscape="linear", think_max_move=0.0).eval()
    ids, start = torch.randint(0, 65, (2, 6)), 3 * torch.randn(2, 6, 65)
    mask = torch.zeros(2, 6, dtype=torch.bool)
    mask[1] = True
    with torch.no_grad():
        moved = model(ids, think_steps=1, think_lr=1e-6, think_start=start, think_start_mask=mask).logits
        plain = model(ids, think_steps=1, think_lr=1e-6).logits
    assert torch.allclose(moved[0], plain[0])
    # the descent starts from the given logits, centred; what it returns carries System 1's mean
    system1_mean = model(ids, use_thinking=False).logits.mean(-1, keepdim=True)
    assert torch.allclose(moved[1], start[1] - start[1].mean(-1, keepdim=True) + system1_mean[1], atol=1e-4)
    with pytest.raises(ValueError, match="think_start_mask"):
        model(ids, think_start=start)


def test_no_stale_state_between_optimizer_steps_and_evaluation():
    """Whatever decoding caches must not survive a weight update: evaluation after training sees the new weights."""
    model = make_model(landscape="mixture", correction_scale=0.5)
    ids = torch.randint(0, 65, (2, 16))
    model.generate(ids[:, :4], max_new_tokens=3, do_sample=False)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, fused=True)
    model.train()
    model(ids, labels=ids).loss.backward()
    optimizer.step()
    model.eval()
    with torch.no_grad():
        after = model(ids).energies
        fresh = model.energy_head.base_energy(model.transformer(ids).last_hidden_state,
                                              model.energy_head.token_proj(model.transformer.wte.weight))
    assert torch.allclose(after, fresh)


def test_initialisation_is_nanogpts_on_every_transformers_version():
    """transformers initialises children before parents and, from 5.24, never twice: the scaled stds must still land
    (residual projections 0.02 / sqrt(2 n_layer), energy projections 1 / sqrt(d_energy), an open gate's zero output)."""
    model = make_model(n_layer=4, n_embd=128, n_head=4, correction_scale_init=0.5,
                       residual_init_power=0.5).requires_grad_(False)
    for block in model.transformer.h:
        for proj in (block.attn.c_proj, block.mlp.c_proj):
            assert abs(float(proj.weight.std()) - 0.02 / (2 * 4) ** 0.5) < 1e-3
    head = model.energy_head
    for proj in (head.context_proj, head.token_proj):
        assert abs(float(proj.weight.std()) - 128 ** -0.5) < 5e-3
    assert float(head.mixture[0].weight.std()) == pytest.approx(0.02, abs=1e-3)
    assert not head.mixture[-1].weight.any() and abs(float(torch.tanh(head.correction_scale)) - 0.5) < 1e-6


@pytest.mark.parametrize("power", [0.0, 0.25, 0.5])
def test_residual_projections_start_at_the_chosen_power_of_2_n_layer(power):
    """residual_init_power p: every c_proj starts at std initializer_range / (2 n_layer) ** p (0.5 nanoGPT's)."""
    model = make_model(n_layer=4, n_embd=128, n_head=4, residual_init_power=power).requires_grad_(False)
    expected = 0.02 / (2 * 4) ** power
    for block in model.transformer.h:
        for proj in (block.attn.c_proj, block.mlp.c_proj):  # 16k and 65k weights: the std is within 2%
            assert float(proj.weight.std()) == pytest.approx(expected, rel=0.02)
        assert float(block.mlp.c_fc.weight.std()) == pytest.approx(0.02, rel=0.02)


# -- vocabulary sizing: len(tokenizer), resize_token_embeddings, padded labels ------------------------------------

@pytest.fixture(scope="module")
def char_tokenizer(corpus_text):
    from tokenization_char import CharTokenizer

    return CharTokenizer.from_corpus(corpus_text)


@pytest.mark.parametrize("side", ["left", "right"])
def test_padded_batch_is_its_own_labels(char_tokenizer, side):
    """A tokenizer's padded batch as labels scores every row as it would alone (positions and targets under
    attention_mask 0 are ignored); before, the pad id reached cross_entropy: IndexError: Target 65 is out of bounds."""
    model = make_model().eval()
    texts = ["ROMEO:\nWhat light", "JULIET:", "O"]
    char_tokenizer.padding_side = side
    try:
        batch = char_tokenizer(texts, padding=True, return_tensors="pt")
    finally:
        char_tokenizer.padding_side = "left"
    assert (batch["input_ids"] == char_tokenizer.pad_token_id).any()
    with torch.no_grad():
        loss = model(**batch, labels=batch["input_ids"]).loss
        total = count = 0
        for text in texts:
            ids = char_tokenizer(text, return_tensors="pt")["input_ids"]
            if ids.shape[1] > 1:
                total += float(model(ids, labels=ids).loss) * (ids.shape[1] - 1)
                count += ids.shape[1] - 1
    assert float(loss) == pytest.approx(total / count, rel=1e-5)


def test_labels_outside_the_vocabulary_are_one_value_error():
    model = make_model().eval()
    ids = torch.randint(0, 65, (2, 8))
    for bad in (65, 70, -5):
        labels = ids.clone()
        labels[0, 3] = bad
        for kwargs in (dict(labels=labels), dict(shift_labels=labels)):
            with pytest.raises(ValueError) as err:
                model(ids, **kwargs)
            assert "labels" in str(err.value) and f"[{bad}]" in str(err.value) and "vocab_size=65" in str(err.value)
    labels = ids.clone()
    labels[:, :2] = -100  # the usual ignore index is still ignored
    assert torch.isfinite(model(ids, labels=labels).loss)


def test_a_model_sized_len_tokenizer_never_chooses_the_pad(char_tokenizer):
    """vocab_size=len(tokenizer) makes the pad id an output; even with the pad the model's favourite, decoding never
    picks it once the model knows its pad id (config.pad_token_id, as transformers' Trainer sets it, or the
    generation config's, where nanoebm's Trainer keeps it), whatever the strategy, and the pad as a label is
    ignored. A pad_token_id passed to one call keeps transformers' meaning (a filler; here a character)."""
    pad = char_tokenizer.pad_token_id
    model = make_model(vocab_size=len(char_tokenizer)).eval()
    with torch.no_grad():  # the lowest energies everywhere: the pad, then the newline (id 0)
        model.energy_head.token_bias[pad], model.energy_head.token_bias[0] = -30.0, -20.0
    ids = char_tokenizer("ROMEO:", return_tensors="pt")["input_ids"]
    assert (model.generate(ids, max_new_tokens=8, do_sample=False)[0, 6:] == pad).all()  # nobody named it
    for where in ("config", "generation_config"):
        getattr(model, where).pad_token_id = pad
        for kwargs in (dict(), dict(use_thinking=False), dict(do_sample=True), dict(num_beams=3),
                       dict(pad_token_id=0)):
            torch.manual_seed(0)
            out = model.generate(ids, max_new_tokens=20, output_logits=True, return_dict_in_generate=True, **kwargs)
            assert (out.sequences[0, 6:] == 0).all(), (where, kwargs)  # the favourite after the pad
            assert all(float(step[:, pad].max()) == torch.finfo(step.dtype).min for step in out.logits)
        getattr(model, where).pad_token_id = None
    model.config.pad_token_id = pad
    assert model(ids).logits[0, -1].argmax() == pad  # forward itself is not masked: the pad is a real output
    labels = ids.clone()
    labels[0, 3] = pad
    kept = ids.clone()
    kept[0, 3] = -100
    with torch.no_grad():
        assert torch.equal(model(ids, labels=labels).loss, model(ids, labels=kept).loss)


def test_resize_token_embeddings_resizes_the_energy_head_too(corpus_ids):
    """The energy head's bias is sized by the vocabulary too: before, generate after a resize failed in base_energy
    (The size of tensor a (67) must match the size of tensor b (65)). A new id starts at the old vocabulary's mean
    base energy at every position."""
    model = train_briefly(make_model(think_lr=1.0), corpus_ids, steps=20)
    ids = corpus_ids[:20][None]
    with torch.no_grad():
        before = model(ids).energies
    model.resize_token_embeddings(67)
    head = model.energy_head
    assert model.config.vocab_size == 67 and model.transformer.wte.weight.shape[0] == 67
    assert head.token_bias.shape == (67,) and head.token_bias.requires_grad
    with torch.no_grad():
        after = model(ids).energies
    assert torch.allclose(after[..., :65], before, atol=1e-5)  # the old ids keep their energies
    mean = before.mean(-1, keepdim=True).expand(-1, -1, 2)
    # the new ones start as the average candidate (transformers draws their embeddings from N(mean, 1e-9 cov))
    assert torch.allclose(after[..., 65:], mean, atol=1e-3)
    assert after[..., 65:].min() > before.min(-1).values.max()  # above every position's favourite: never greedy's pick
    out = model.generate(ids, max_new_tokens=5, do_sample=False)
    assert out.shape == (1, 25) and (out[0, 20:] < 65).all()
    model(ids, labels=ids).loss.backward()  # and the new rows learn
    assert head.token_bias.grad.shape == (67,) and head.token_bias.grad[65:].abs().sum() > 0
    kept = head.token_bias.detach()[:60].clone()
    model.resize_token_embeddings(60, mean_resizing=False)
    assert head.token_bias.shape == (60,) and model.config.vocab_size == 60
    assert torch.equal(head.token_bias.detach(), kept)
    model.resize_token_embeddings(62, mean_resizing=False)
    assert (model.energy_head.token_bias[60:] == 0).all()  # as a fresh model's
    assert model.generate(ids[:, :5] % 60, max_new_tokens=3).shape == (1, 8)
