"""A landscape is one class: a toy registered here, as docs/DESIGN.md's "Adding a landscape" says (one row of facts in
configuration_nanoebm.LANDSCAPES, one EnergyLandscape subclass), is accepted by the config, thought on, trained,
decoded and saved like the four that ship, with nothing else edited."""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import modeling_nanoebm
from conftest import make_model, tiny_config
from configuration_nanoebm import LANDSCAPES, OPTION, LandscapeFacts
from modeling_nanoebm import EnergyLandscape, Landscape, LinearLandscape, NanoEBMForCausalLM, landscape_class

TOY = LandscapeFacts("toy_quadratic", "E_base plus c p(y): a belief that repels itself (a test's toy)")


@pytest.fixture
def toy(monkeypatch):
    """The toy landscape, registered for one test: its facts row and its class (both gone afterwards)."""
    monkeypatch.setitem(LANDSCAPES, TOY.name, TOY)
    monkeypatch.setattr(modeling_nanoebm, "LANDSCAPE_CLASSES", dict(modeling_nanoebm.LANDSCAPE_CLASSES))

    class ToyQuadraticLandscape(EnergyLandscape):
        """E(h, y | p) = E_base(h, y) + c p(y), c = softplus(w) learned: J = <E_base>_p + c sum_y p(y)^2 - lambda H,
        so thinking flattens the belief a little, by an amount training sets."""

        name = TOY.name

        def build(self, head):
            head.toy_weight = nn.Parameter(torch.tensor(10.0))  # c near 10: a move worth seeing

        def energy(self, model, base, hidden, vocabulary, candidate):
            return Landscape(base, correction=lambda p: p, scale=-F.softplus(model.energy_head.toy_weight))

    return ToyQuadraticLandscape


def test_the_config_takes_its_choices_and_checks_from_the_registry(toy):
    config = tiny_config(landscape=TOY.name)
    assert TOY.name in OPTION["landscape"].choices and not config.reads_candidate and not config.use_soft_tokens
    assert landscape_class(TOY.name) is toy
    with pytest.raises(ValueError, match="correction_scale_init.*only landscape='mixture' has"):
        tiny_config(landscape=TOY.name, correction_scale_init=0.5)  # its facts say its gate cannot start open
    tiny_config(landscape=TOY.name, think_gradient="natural")  # it has a closed form


def test_an_unregistered_landscape_is_refused_by_name():
    with pytest.raises(ValueError, match=r"landscape='toy_quadratic' is invalid: allowed: \('linear', 'mixture'"):
        tiny_config(landscape=TOY.name)


def test_it_thinks_trains_decodes_and_saves(toy, tmp_path):
    model = make_model(landscape=TOY.name, think_steps=2, think_lr=1.0)
    assert isinstance(model.energy_landscape, toy)
    ids = torch.randint(0, 65, (2, 12), generator=torch.Generator().manual_seed(0))
    loss = model.train()(ids, shift_labels=ids).loss
    loss.backward()
    assert model.energy_head.toy_weight.grad.abs() > 0  # its own parameter learns through the unrolled descent
    model.eval()
    with torch.no_grad():
        out = model(ids)
    moved = (out.logits.log_softmax(-1) - out.system1_logits.log_softmax(-1)).abs().amax(-1)
    assert moved.min() > 1e-4 and len(out.step_logits) == 2  # the belief-dependent term moved every position
    flat = lambda logits: -(logits.softmax(-1) * logits.log_softmax(-1)).sum(-1)  # noqa: E731
    assert (flat(out.logits) > flat(out.system1_logits)).all()  # c sum p^2 pushes towards flatter beliefs
    generated = model.generate(ids[:1, :5], max_new_tokens=4, do_sample=False)
    assert generated.shape == (1, 9) and generated[0, 5] == out_last_argmax(model, ids[:1, :5])
    model.save_pretrained(tmp_path)
    loaded = NanoEBMForCausalLM.from_pretrained(tmp_path).eval()
    assert loaded.config.landscape == TOY.name and loaded.energy_head.toy_weight.item() == 10.0
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, out.logits)


def out_last_argmax(model, ids):
    with torch.no_grad():
        return model(ids).logits[0, -1].argmax()


def test_the_descent_differentiates_through_its_belief_dependence_when_asked(toy):
    """The base class's gradient choice: the closed form with p held fixed, autograd with mixture_stopgrad=false."""
    ids = torch.randint(0, 65, (1, 8), generator=torch.Generator().manual_seed(1))
    fixed, coupled = (make_model(landscape=TOY.name, mixture_stopgrad=stop).eval() for stop in (True, False))
    assert not fixed.energy_landscape.autograd() and coupled.energy_landscape.autograd()
    with torch.no_grad():
        assert not torch.allclose(fixed(ids).logits, coupled(ids).logits)


def test_a_class_needs_its_facts_row_and_its_own_name():
    with pytest.raises(TypeError, match="no row in configuration_nanoebm.LANDSCAPES"):
        type("Unlisted", (EnergyLandscape,), {"name": "unlisted"})
    with pytest.raises(TypeError, match="must set its own `name`"):
        type("LinearVariant", (LinearLandscape,), {})
    with pytest.raises(TypeError, match="is LinearLandscape already"):
        type("SecondLinear", (EnergyLandscape,), {"name": "linear"})


def test_every_shipped_row_has_its_class_and_its_help():
    assert list(LANDSCAPES) == ["linear", "mixture", "soft_tokens", "ebt"]
    assert set(modeling_nanoebm.LANDSCAPE_CLASSES) == set(LANDSCAPES)
    for name, facts in LANDSCAPES.items():
        assert f"{name!r} ({facts.help})" in OPTION["landscape"].help
        assert tiny_config(landscape=name).reads_candidate == facts.reads_candidate
