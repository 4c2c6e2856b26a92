"""The one teacher-forced scoring loop (nanoebm.scoring) and System 1's temperature calibration, on real tiny models."""

import math

import pytest
import torch
import torch.nn.functional as F

from conftest import make_model
from nanoebm.scoring import TEMPERATURES, UNCALIBRATED, calibrated_system1, score_blocks


def sharpened(model, factor):
    """The model with its System 1 logits (-E_base) multiplied by `factor`: E_base = -(W_c h) . f + b is linear in
    W_c and b."""
    with torch.no_grad():
        model.energy_head.context_proj.weight.mul_(factor)
        model.energy_head.token_bias.mul_(factor)
    return model


def teacher(seed=0):
    """A linear-landscape model whose System 1 is far from uniform (about 2 nats per character), so a temperature
    is well determined by a few thousand characters."""
    return sharpened(make_model(seed=seed, landscape="linear", n_layer=1), 40.0).eval()


def sample_blocks(model, n, temperature, seed):
    """n blocks of block_size + 1 characters drawn from System 1 at `temperature`: text the model at that
    temperature fits exactly."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(model.config.vocab_size, (n, 1), generator=generator)
    with torch.no_grad():
        for _ in range(model.config.block_size):
            logits = model(ids, use_thinking=False, use_cache=False).system1_logits[:, -1].float()
            drawn = torch.multinomial(torch.softmax(logits / temperature, -1), 1, generator=generator)
            ids = torch.cat([ids, drawn], 1)
    return ids


def test_score_blocks_is_each_blocks_own_forward():
    model = make_model(landscape="mixture", correction_scale=0.5, think_lr=1.0).eval()
    blocks = sample_blocks(sharpened(make_model(seed=1, landscape="linear", n_layer=1), 10.0).eval(), 5, 1.0, 0)
    scores = score_blocks(model, blocks, 2, think_steps=3, tempered=True)
    with torch.no_grad():
        out = model(blocks[:, :-1], think_steps=3)
    nll = lambda logits: F.cross_entropy(logits.transpose(1, 2), blocks[:, 1:], reduction="none")  # noqa: E731
    assert torch.allclose(scores["nll1"], nll(out.system1_logits), atol=1e-5)
    assert torch.allclose(scores["nll2"], nll(out.logits), atol=1e-5)
    assert scores["nll_steps"].shape == (5, 32, 3) and torch.equal(scores["nll_steps"][..., -1], scores["nll2"])
    assert torch.allclose(scores["trace"], out.energy_trace, atol=1e-5)
    assert not torch.allclose(scores["nll1"], scores["nll2"])  # thinking moved the logits: the test can tell them apart
    assert torch.equal(scores["nll1_tempered"][..., UNCALIBRATED], scores["nll1"])
    whole = score_blocks(model, blocks, 5, think_steps=3)  # a block's numbers do not depend on its batch
    assert torch.allclose(whole["nll2"], scores["nll2"], atol=1e-6)
    plain = score_blocks(model, blocks, 5, use_thinking=False)
    assert plain["trace"] is None and plain["nll_steps"].shape == (5, 32, 0)
    assert torch.allclose(plain["nll2"], scores["nll1"], atol=1e-6)


@pytest.mark.parametrize("factor", [0.5, 2.0])
def test_a_model_whose_logits_are_scaled_gets_that_temperature_back(factor):
    blocks = sample_blocks(teacher(), 96, 1.0, seed=1)
    scaled = sharpened(teacher(), factor)
    tempered = score_blocks(scaled, blocks, 32, use_thinking=False, tempered=True)["nll1_tempered"].mean(1)
    result = calibrated_system1(tempered, None, torch.arange(96) % 2 == 0)
    assert result["temperature"] == pytest.approx(factor, rel=0.08)
    assert result["system1_calibrated"] < result["system1"] - 0.05 and result["system2"] is None
    # the teacher itself needs no temperature
    plain = score_blocks(teacher(), blocks, 32, use_thinking=False, tempered=True)["nll1_tempered"].mean(1)
    assert calibrated_system1(plain, None, torch.arange(96) % 2 == 0)["temperature"] == pytest.approx(1.0, rel=0.08)


def test_the_temperature_is_fitted_on_one_part_and_scored_on_the_other():
    """Fit blocks drawn at T = 1 and scored blocks drawn at T = 0.5: the temperature is the fit part's, and scoring
    the other part with it is worse than with a temperature fitted on that part itself (which calibration never
    does)."""
    model = teacher()
    fitted_on, scored_on = sample_blocks(model, 48, 1.0, seed=2), sample_blocks(model, 48, 0.5, seed=3)
    blocks = torch.stack([fitted_on, scored_on], 1).flatten(0, 1)  # even: T = 1, odd: T = 0.5
    tempered = score_blocks(model, blocks, 32, use_thinking=False, tempered=True)["nll1_tempered"].mean(1)
    system2 = tempered[:, 0]  # any per-block numbers: System 2's are averaged over the scored blocks only
    fit = torch.arange(96) % 2 == 0
    result = calibrated_system1(tempered, system2, fit)
    assert result["temperature"] == pytest.approx(1.0, rel=0.08)
    assert result["system1"] == pytest.approx(float(tempered[~fit, UNCALIBRATED].mean()), rel=1e-6)
    assert result["system2"] == pytest.approx(float(system2[~fit].mean()), rel=1e-6)
    on_itself = calibrated_system1(tempered, system2, ~fit)  # fitted on the odd blocks, scored on the even
    assert on_itself["temperature"] == pytest.approx(0.5, rel=0.08)
    cheating = float(tempered[~fit].mean(0).min())  # the odd blocks' best temperature, read off the odd blocks
    assert result["system1_calibrated"] > cheating + 0.02
    assert TEMPERATURES[0] == 0.25 and TEMPERATURES[-1] == 4.0


def test_calibration_needs_both_parts_and_keeps_nan():
    tempered = torch.rand(4, len(TEMPERATURES))
    assert calibrated_system1(tempered, None, torch.ones(4, dtype=torch.bool)) is None
    tempered[0, 3] = float("nan")
    result = calibrated_system1(tempered, None, torch.arange(4) % 2 == 0)
    assert math.isnan(result["temperature"]) and math.isnan(result["system1_calibrated"])


def test_an_out_of_distribution_text_is_scored_at_the_temperature_fitted_in_distribution():
    """against_calibrated (the benchmarks' comparison): the other text's calibrated System 1 is read at the in-text
    temperature, even where that text would prefer another one."""
    from nanoebm.scoring import against_calibrated

    model = sharpened(teacher(), 2.0)  # fitted in distribution: T about 2
    blocks, other = sample_blocks(teacher(), 64, 1.0, seed=4), sample_blocks(teacher(), 32, 0.5, seed=5)
    result = against_calibrated(model, blocks, other, batch_size=32)
    assert result["in"]["temperature"] == pytest.approx(2.0, rel=0.08)
    assert result["other"]["temperature"] == result["in"]["temperature"]
    tempered = score_blocks(model, other, 32, use_thinking=False, tempered=True)["nll1_tempered"].mean(1)
    k = TEMPERATURES.index(result["in"]["temperature"])
    assert result["other"]["system1_calibrated"] == pytest.approx(float(tempered[:, k].mean()), rel=1e-5)
    assert result["other"]["system1_calibrated"] > float(tempered.mean(0).min()) + 0.01  # not the other text's own T
    assert result["other"]["system2"] == pytest.approx(result["other"]["system1"], rel=1e-5)  # a linear model
