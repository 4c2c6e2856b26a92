"""Configuration of nanoebm, the energy-based character transformer that thinks at decode time.

Every field keeps the name the research code gave it (see nanoebm's docs/DESIGN.md); the thinking fields live
here, on the model config, and not on the generation config, so that `generate(..., think_steps=4)` reaches `forward`.
"""

import math
import os
import stat
import textwrap
from contextlib import contextmanager
from typing import NamedTuple

from transformers import PreTrainedConfig

THINK_INITS = ("base_energy", "zeros", "random")
THINK_GRADIENTS = ("plain", "natural")
POSITION_EMBEDDINGS = ("learned", "rope")
ADAPT_PARAMS = ("all", "head", "norms", "lora")
ADAPT_RULES = ("sgd", "rms")


class Option(NamedTuple):
    """One model setting: its name, default and meaning, defined here once. The config's fields, its docstring,
    run_train.py's and run_generate.py's flags and the run record are made from this table."""

    name: str
    default: object
    help: str
    type: type
    choices: tuple = ()  # the allowed values (landscape's: the LANDSCAPES registry itself, so each row counts)
    kept: str = ""  # why continuing a saved model refuses another value ("": the flag takes effect)
    aliases: tuple = ()  # the research code's names for it


class LandscapeFacts(NamedTuple):
    """What a config must know of one energy landscape without building it: its meaning for the option's help, and
    the facts its validation and the backbone's size depend on. The landscape itself (its parameters, its energy,
    its descent's gradient) is the `EnergyLandscape` subclass of the same name in modeling_nanoebm.py. The facts live
    here, as data, because a config is read without torch (run_train.py's flags, AutoConfig) and must not import the
    modeling code; the class checks at its definition that its row is here (docs/DESIGN.md, "Adding a landscape")."""

    name: str
    help: str  # how the energy depends on the belief p, for the `landscape` option's help
    reads_candidate: bool = False  # the backbone reads a candidate token at t + 1 (one spare position; the energy
    # then runs through the backbone System 1 uses, so detach_system1 cannot separate them)
    closed_form: bool = True  # False: no closed-form gradient (the descent is autograd's), so think_gradient 'plain'
    opens_gate: bool = False  # its correction's output layer can start at zero: correction_scale_init > 0 allowed


# The registry of landscapes, by the config's `landscape` name: a new landscape adds one row here and its class
LANDSCAPES = {facts.name: facts for facts in (
    LandscapeFacts("linear", "not at all"),
    LandscapeFacts("mixture", "an MLP of the hidden state and the expected embedding", opens_gate=True),
    LandscapeFacts("soft_tokens", "the backbone reads a provisional token whose embedding is the expected embedding",
                   reads_candidate=True),
    LandscapeFacts("ebt", "the Energy-Based Transformer's scalar energy: the backbone reads the candidate at position "
                   "t + 1 and a Linear(n_embd, 1) head scores it; System 1 stays the per-token head's -E_base",
                   reads_candidate=True, closed_form=False),
)}


def landscape_names(**facts) -> tuple:
    """The registered landscapes whose facts have the values given, e.g. `landscape_names(reads_candidate=False)`."""
    return tuple(name for name, row in LANDSCAPES.items()
                 if all(getattr(row, fact) == value for fact, value in facts.items()))


def landscape_help() -> str:
    """The `landscape` option's help, from the registry."""
    meanings = [f"{name!r} ({row.help})" for name, row in LANDSCAPES.items()]
    return f"how the energy depends on the current belief p: {', '.join(meanings[:-1])} or {meanings[-1]}"


_SHAPED = "the saved weights are shaped and trained for it"
_LANDSCAPE = "the energy landscape is part of the architecture the saved weights were trained with"

OPTIONS = (
    # the backbone
    Option("vocab_size", 65, "ids the model embeds and scores: the tokenizer's characters, `tokenizer.vocab_size` "
           "(run_train.py sets it from the tokenizer). Sized `len(tokenizer)` (characters plus the pad), set "
           "`pad_token_id` too: generate then never chooses the pad and the loss ignores it as a label; "
           "`resize_token_embeddings` resizes the embeddings and the energy head's bias together", int, kept=_SHAPED),
    Option("block_size", 256, "longest context in characters; prompts beyond it are cropped from the left (decoding "
           "continues past it: the window slides)", int, kept=_SHAPED, aliases=("max_position_embeddings",)),
    Option("n_layer", 6, "transformer blocks (pre-LN, GELU MLP of 4 * n_embd)", int, kept=_SHAPED),
    Option("n_head", 6, "attention heads", int, kept=_SHAPED),
    Option("n_embd", 384, "model width", int, kept=_SHAPED),
    Option("dropout", 0.1, "dropout probability", float, kept="the saved model's layers are built with it"),
    Option("bias", True, "biases in linear layers and LayerNorms", bool, kept=_SHAPED),
    Option("position_embedding", "learned", "'learned' (absolute, as nanoGPT) or 'rope' (rotary: the KV-cached window "
           "slides past block_size without recomputation)", str, POSITION_EMBEDDINGS, kept=_SHAPED),
    Option("rope_theta", 10000.0, "base of the rotary frequencies (position_embedding='rope')", float,
           kept="the saved weights are trained with these frequencies"),
    Option("initializer_range", 0.02, "std of the normal initialisation of the weights (the residual projections "
           "get it divided by (2 * n_layer) ** residual_init_power)", float,
           kept="it initialises weights the saved model has already trained"),
    Option("residual_init_power", 0.25, "the residual projections (attention and MLP outputs) start at std "
           "initializer_range / (2 * n_layer) ** residual_init_power: 0.5 nanoGPT's (GPT-2's) scaled init, 0 the "
           "plain initializer_range. Chosen by measurement per size (docs/DESIGN.md): 0.25 at this default 6x384, "
           "0 in the cpu preset's 4x128", float,
           kept="it initialises weights the saved model has already trained"),
    # the energy
    Option("d_energy", None, "width of the space where context and token projections meet (default: n_embd)", int,
           kept=_SHAPED),
    Option("use_token_bias", True, "add the per-token bias b_y to the energy", bool, kept=_SHAPED),
    Option("landscape", "mixture", landscape_help(), str, LANDSCAPES, kept=_LANDSCAPE),  # choices: the registry
    Option("use_soft_tokens", None, "the research code's switch for landscape='soft_tokens' (true sets it; false "
           "turns soft_tokens back into mixture)", bool, kept=_LANDSCAPE),
    Option("correction_scale_init", 0.0, "tanh(s) of the correction's gate at initialisation, in [0, 1): 0 shuts the "
           "gate (the correction gets no gradient until s moves); above 0 (mixture only) the gate starts open and the "
           "mixture MLP's output layer at zero, so a fresh model still thinks on the base landscape", float,
           kept="it initialises a gate the saved model has already trained"),
    # thinking: every one of these may change on a saved model
    Option("use_thinking", True, "whether forward and generate think by default (false = System 1)", bool),
    Option("think_steps", 2, "gradient steps K on the logits before a token is chosen", int,
           aliases=("refine_steps",)),
    Option("think_lr", 0.5, "step size alpha of the descent (a saved model keeps its learned alpha unless this is "
           "given)", float, aliases=("alpha_value",)),
    Option("think_lr_learnable", True, "make alpha a trained parameter", bool),
    Option("think_lr_random_scale", 1.0, "s >= 1: while training, alpha is multiplied per row and position by a "
           "factor drawn uniformly from [1/s, s], so the energy learns to be descended with any step near alpha; "
           "1 disables", float),
    Option("think_samples", 1, "self-verification: G starting points per position, each descended, the one with the "
           "lowest final energy J_K kept; 1 = a single descent", int),
    Option("think_samples_noise_std", 0.0, "std of the Gaussian noise on the start of every sample after the first "
           "(the first starts where think_init says); with think_init='random' every sample draws its own start",
           float),
    Option("softmax_temperature", 1.0, "tau in p = softmax(v / tau) and v0 = -E_base / tau", float),
    Option("entropy_weight", 1.0, "lambda of the entropy bonus in J = E_p[E] - lambda * H(p); lambda = tau makes "
           "J = tau * KL(p || softmax(-E / tau)) + const, so System 1 is the minimum of a fixed landscape and "
           "thinking moves only where the belief-dependent correction says so", float),
    Option("think_max_move", 0.25, "trust region: |v - v0| <= think_max_move per logit; 0 disables", float),
    Option("absolute_clamp", 0.0, "|v| <= absolute_clamp; 0 disables", float),
    Option("langevin_noise", 0.0, "std of the Gaussian noise added to v before each step while training (the step "
           "then corrects it); 0 disables", float),
    Option("mixture_stopgrad", True, "hold p fixed inside E(h, y | p) when differentiating J (closed-form gradient); "
           "false differentiates through the landscape's dependence on p with autograd", bool),
    Option("think_init", "base_energy", "start of the descent: 'base_energy' (System 1 logits), 'zeros' or 'random'",
           str, THINK_INITS),
    Option("think_gradient", "plain", "'plain' descends dJ/dv; 'natural' preconditions it by the inverse Fisher of "
           "the softmax (mirror descent on the simplex: with a fixed landscape v <- (1 - alpha) v - alpha E); needs "
           "mixture_stopgrad", str, THINK_GRADIENTS),
    Option("think_init_noise_std", 0.0, "std of the Gaussian noise added to the start (and of the 'random' start)",
           float),
    Option("energy_convergence_threshold", 0.0, "each position stops moving once its own |J_k - J_(k-1)| falls "
           "below it (its logits and J then repeat, so a row's result never depends on its batch mates); 0 never "
           "stops early", float),
    # learning while reading (the second System 2): every one of these may change on a saved model
    Option("use_adaptation", False, "whether forward and generate learn while reading by default: text is read in "
           "windows, each predicted by the weights learned from the windows before it, then learned from (descent "
           "on the weights; the loaded weights are put back after every call)", bool),
    Option("adapt_lr", 1e-4, "learning rate of the update after each window read (chosen with adapt_rule='rms'; "
           "'sgd' needs about 3e-3)", float),
    Option("adapt_params", "all", "which weights learn: 'all', 'head' (the energy head), 'norms' (every bias and "
           "LayerNorm) or 'lora' (low-rank factors added to every matrix)", str, ADAPT_PARAMS),
    Option("adapt_rule", "rms", "'rms' (each gradient divided by the root of its running mean square over the "
           "windows read, floored at a tenth of its mean) or 'sgd' (theta -= adapt_lr * g)", str, ADAPT_RULES),
    Option("adapt_decay", 0.0, "after every update the weights move this fraction back toward the trained ones; "
           "0 disables", float),
    Option("adapt_window", None, "tokens per window: each window is scored, then learned from (at most "
           "block_size; default: block_size)", int),
    Option("adapt_rank", 4, "rank of the low-rank factors of adapt_params='lora'", int),
    Option("adapt_on_output", False, "in generation, also learn from the generated text, every adapt_window tokens "
           "(the prompt is always read with learning)", bool),
)
OPTION = {option.name: option for option in OPTIONS}
# What a model saved before an option existed was most likely made with, where today's default differs: its
# config.json lacks the key, and it loads as this. Before residual_init_power, nanoGPT's scaled init (0.5) was the
# only one asked for, but transformers 5.24 silently skipped it until 2026-11-25 (64ceb46): a folder made on 5.24
# before then started at 0. So the value is assumed, not known: the run record says so, and a continue may state
# the true one (`assumed`).
BEFORE_OPTION = {"residual_init_power": 0.5}


def assumed_options(config_dict: dict) -> dict:
    """The BEFORE_OPTION values a saved config.json lacks: assumed, since it does not say."""
    return {name: value for name, value in BEFORE_OPTION.items() if name not in config_dict}


def as_saved(config_dict: dict) -> dict:
    """A saved config.json's values, with the assumed ones (`assumed_options`) where a key is missing."""
    return {**assumed_options(config_dict), **config_dict}


class NanoEBMConfig(PreTrainedConfig):
    """The configuration of a nanoebm model: one attribute per entry of `OPTIONS` (listed with their meanings under
    Args below, made from that table). The research code's names are accepted as well: `refine_steps`,
    `alpha_value`, `use_soft_tokens`, and `max_position_embeddings` for block_size (not kept as an attribute:
    generate would then cap max_length at it, although decoding past block_size is supported)."""

    model_type = "nanoebm"
    attribute_map = {
        "hidden_size": "n_embd",
        "num_hidden_layers": "n_layer",
        "num_attention_heads": "n_head",
    }

    def __init__(self, **kwargs):
        for option in OPTIONS:
            for alias in option.aliases:
                if alias in kwargs:
                    kwargs[option.name] = kwargs.pop(alias)
        values = {option.name: kwargs.pop(option.name, option.default) for option in OPTIONS}
        values["landscape"] = landscape_of(values.pop("use_soft_tokens"), values["landscape"])
        if values["d_energy"] is None:
            values["d_energy"] = values["n_embd"]
        if kwargs.pop("tie_word_embeddings", False):
            raise ValueError("NanoEBMConfig.tie_word_embeddings=True is invalid: nanoebm has no output embedding to "
                             "tie (its energy head scores the tokens with its own projection)")
        for name, value in values.items():
            setattr(self, name, value)
        super().__init__(tie_word_embeddings=False, **kwargs)
        self.validate_nanoebm()

    @classmethod
    def from_dict(cls, config_dict, **kwargs):
        """A saved config: an option its file lacks is what the model was made with then (`as_saved`), not today's
        default."""
        loaded = super().from_dict(as_saved(config_dict), **kwargs)
        config = loaded[0] if isinstance(loaded, tuple) else loaded
        config.assumed = tuple(assumed_options(config_dict))  # not saved (to_dict): a re-saved folder states them
        return loaded

    @property
    def use_soft_tokens(self) -> bool:
        return self.landscape == "soft_tokens"

    @property
    def reads_candidate(self) -> bool:
        """Thinking runs the backbone on a provisional token (soft tokens, ebt): one spare position is needed."""
        return LANDSCAPES[self.landscape].reads_candidate

    def validate_nanoebm(self):
        """Raise ValueError naming the field, its value and what is allowed."""

        def need(ok, field, allowed):
            if not ok:
                raise ValueError(f"NanoEBMConfig.{field}={getattr(self, field)!r} is invalid: {allowed}")

        for field in ("vocab_size", "block_size", "n_layer", "n_head", "n_embd", "d_energy"):
            value = getattr(self, field)
            need(isinstance(value, int) and value > 0, field, "must be a positive integer")
        need(self.n_embd % self.n_head == 0, "n_embd", f"must be divisible by n_head={self.n_head}")
        if self.position_embedding == "rope":
            need((self.n_embd // self.n_head) % 2 == 0, "n_head", "rope needs an even head size n_embd // n_head")
        need(0.0 <= self.dropout < 1.0, "dropout", "must be in [0, 1)")
        need(self.position_embedding in POSITION_EMBEDDINGS, "position_embedding", f"allowed: {POSITION_EMBEDDINGS}")
        need(self.landscape in LANDSCAPES, "landscape", f"allowed: {tuple(LANDSCAPES)}")
        landscape = LANDSCAPES[self.landscape]
        need(0.0 <= self.correction_scale_init < 1.0, "correction_scale_init", "must be in [0, 1) (it is tanh(s))")
        if self.correction_scale_init > 0:
            need(landscape.opens_gate, "correction_scale_init",
                 f"an open gate needs a zero-initialised output layer, which only landscape="
                 f"{' or '.join(map(repr, landscape_names(opens_gate=True)))} has (landscape={self.landscape!r}); "
                 f"use 0")
        if not landscape.closed_form:
            need(self.think_gradient == "plain", "think_gradient",
                 f"landscape={self.landscape!r} has no closed-form gradient (its energy is descended by autograd): "
                 f"only 'plain' is allowed")
        need(self.think_init in THINK_INITS, "think_init", f"allowed: {THINK_INITS}")
        need(self.think_gradient in THINK_GRADIENTS, "think_gradient", f"allowed: {THINK_GRADIENTS}")
        if self.think_gradient == "natural":
            need(self.mixture_stopgrad, "mixture_stopgrad", "must be true with think_gradient='natural'")
        need(isinstance(self.think_steps, int) and self.think_steps >= 0, "think_steps", "must be an integer >= 0")
        need(self.think_lr > 0, "think_lr", "must be > 0")
        need(self.think_lr_random_scale >= 1, "think_lr_random_scale", "must be >= 1 (1 disables it)")
        need(isinstance(self.think_samples, int) and self.think_samples >= 1, "think_samples",
             "must be an integer >= 1")
        need(self.softmax_temperature > 0, "softmax_temperature", "must be > 0")
        for field in ("think_lr", "think_lr_random_scale", "softmax_temperature", "rope_theta", "initializer_range"):
            need(isinstance(getattr(self, field), (int, float)) and math.isfinite(getattr(self, field)), field,
                 "must be a finite number")
        need(isinstance(self.residual_init_power, (int, float)) and math.isfinite(self.residual_init_power)
             and self.residual_init_power >= 0, "residual_init_power",
             "must be a finite number >= 0 (0.5 is nanoGPT's scaled init, 0 the plain initializer_range)")
        for field in ("entropy_weight", "think_max_move", "absolute_clamp", "langevin_noise",
                      "think_init_noise_std", "energy_convergence_threshold", "think_samples_noise_std"):
            value = getattr(self, field)
            need(isinstance(value, (int, float)) and math.isfinite(value) and value >= 0, field,
                 "must be a finite number >= 0 (0 disables it)")
        if self.think_init == "random":
            need(self.think_init_noise_std > 0, "think_init_noise_std",
                 "must be > 0 when think_init='random' (it is the std of the random start)")

        problem = adaptation_problem({name: getattr(self, name) for name in ADAPT_FIELDS}, self.block_size)
        if problem is not None:
            need(False, *problem)

    def to_dict(self):
        out = super().to_dict()
        out["use_soft_tokens"] = self.use_soft_tokens  # the research code's flag, kept in sync for readers
        out.pop("assumed", None)
        return out


ADAPT_FIELDS = ("use_adaptation", "adapt_lr", "adapt_params", "adapt_rule", "adapt_decay", "adapt_window",
                "adapt_rank", "adapt_on_output")


def adaptation_problem(values: dict, block_size: int):
    """(field, what is allowed) of the first invalid learning-while-reading setting in `values`, or None. The config
    and every call that overrides these (forward, generate) check them here."""

    def number(value):
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)

    def integer(value):
        return isinstance(value, int) and not isinstance(value, bool)

    checks = (
        ("use_adaptation", isinstance(values["use_adaptation"], bool), "must be true or false"),
        ("adapt_lr", number(values["adapt_lr"]) and values["adapt_lr"] > 0, "must be a finite number > 0"),
        ("adapt_params", values["adapt_params"] in ADAPT_PARAMS, f"allowed: {ADAPT_PARAMS}"),
        ("adapt_rule", values["adapt_rule"] in ADAPT_RULES, f"allowed: {ADAPT_RULES}"),
        ("adapt_decay", number(values["adapt_decay"]) and 0 <= values["adapt_decay"] < 1, "must be in [0, 1)"),
        ("adapt_window", values["adapt_window"] is None or integer(values["adapt_window"])
         and 2 <= values["adapt_window"] <= block_size,
         f"must be an integer in [2, block_size={block_size}]"),
        ("adapt_rank", integer(values["adapt_rank"]) and values["adapt_rank"] >= 1, "must be an integer >= 1"),
        ("adapt_on_output", isinstance(values["adapt_on_output"], bool), "must be true or false"),
    )
    return next(((name, allowed) for name, ok, allowed in checks if not ok), None)


def landscape_of(use_soft_tokens, landscape):
    """The landscape the research code's `use_soft_tokens` switch means beside `landscape` (None: not given)."""
    if use_soft_tokens is None:
        return landscape
    if use_soft_tokens and landscape not in ("mixture", "soft_tokens"):
        raise ValueError(f"use_soft_tokens=True contradicts landscape={landscape!r}; set one of them "
                         f"(landscape='soft_tokens' is the same as use_soft_tokens=True)")
    if use_soft_tokens:
        return "soft_tokens"
    return "mixture" if landscape == "soft_tokens" else landscape


def options_docstring() -> str:
    """The config's Args section, from OPTIONS."""
    lines = ["", "    Args:"]
    for option in OPTIONS:
        default = "n_embd" if option.name == "d_energy" else repr(option.default)
        text = f"{option.name} ({option.type.__name__}, default {default}): {option.help}."
        lines.append(textwrap.fill(text, 116, initial_indent=" " * 8, subsequent_indent=" " * 12))
    return "\n".join(lines)


NanoEBMConfig.__doc__ += options_docstring()
NanoEBMConfig.register_for_auto_class()


# ----------------------------------------------------------------------------------------------------------------
# Saving: the model's and the tokenizer's save_pretrained both write through this (it lives here because this is the
# module both import without torch)


@contextmanager
def ordinary_file_modes(folder):
    """Give the files written into `folder` inside this block the modes a plain `open()` would: a new file
    0o666 minus the umask, a replaced one its old mode. safetensors (from 0.8) writes the weights to a temporary
    file, created 0600, and renames it into place, so a model folder whose other files the umask made readable to
    all (a cluster's shared disk, a web server) had weights only their owner could read; and transformers 5.5
    copies the code files with their source's mode, whatever the umask."""
    folder = str(folder)
    before = {} if not os.path.isdir(folder) else {e.name: e.stat() for e in os.scandir(folder) if e.is_file()}
    yield
    fresh = 0o666 & ~current_umask()
    for entry in os.scandir(folder):
        if not entry.is_file(follow_symlinks=False):
            continue
        now, old = entry.stat(), before.get(entry.name)
        if old is not None and (old.st_ino, old.st_mode) == (now.st_ino, now.st_mode):
            continue  # untouched, or rewritten in place (which keeps the mode)
        mode = stat.S_IMODE(old.st_mode) if old is not None else fresh
        if stat.S_IMODE(now.st_mode) != mode:
            os.chmod(entry.path, mode)


def current_umask() -> int:
    """The process umask, read without changing it where Linux tells it (/proc), else by the usual set-and-restore
    (briefly 0o077: a file another thread creates meanwhile is too private, never too open)."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o077)
    os.umask(mask)
    return mask
