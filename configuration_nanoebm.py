"""Configuration of nanoebm, the energy-based character transformer that thinks at decode time.

Every field keeps the name the research code gave it (see nanoebm's docs/DESIGN.md); the thinking fields live
here, on the model config, and not on the generation config, so that `generate(..., think_steps=4)` reaches `forward`.
"""

import math
import os
import stat
from contextlib import contextmanager

from transformers import PreTrainedConfig

LANDSCAPES = ("linear", "mixture", "soft_tokens", "ebt")
PROVISIONAL_LANDSCAPES = ("soft_tokens", "ebt")  # the backbone reads a candidate token at position t + 1
THINK_INITS = ("base_energy", "zeros", "random")
THINK_GRADIENTS = ("plain", "natural")
POSITION_EMBEDDINGS = ("learned", "rope")


class NanoEBMConfig(PreTrainedConfig):
    r"""
    Args:
        vocab_size: number of ids the model embeds and scores: the tokenizer's characters, `tokenizer.vocab_size`
            (65 for tiny Shakespeare; the CharTokenizer's pad id, 65, lies just outside). Sized `len(tokenizer)`
            (characters plus the pad) the pad id is one of the outputs: set `pad_token_id=tokenizer.pad_token_id`
            (transformers' Trainer does it from its tokenizer) and generate never chooses it and the loss ignores it
            as a label; run_generate.py also never generates an id its tokenizer cannot decode as a token.
            `resize_token_embeddings` resizes the embeddings and the energy head's bias together; a new id starts
            at the old vocabulary's mean energy (NanoEBMForCausalLM._resize_token_embeddings).
        block_size: longest context the model attends to; prompts beyond it are cropped from the left.
        n_layer, n_head, n_embd, dropout, bias: the GPT backbone (pre-LN blocks, GELU MLP of 4 * n_embd).
        position_embedding: "learned" (absolute, as nanoGPT) or "rope" (rotary; lets the KV-cached window slide
            past `block_size` without recomputation).
        d_energy: width of the space where context and token projections meet (defaults to n_embd).
        use_token_bias: add the per-token bias b_y to the energy.
        landscape: how the energy depends on the current belief p: "linear" (not at all), "mixture" (an MLP of
            the hidden state and the expected embedding) or "soft_tokens" (the backbone reads a provisional token
            whose embedding is the expected embedding). `use_soft_tokens=True` is the research code's spelling.
            "ebt" (the Energy-Based Transformer's energy) replaces the per-token correction by a scalar: the backbone
            reads the candidate (its expected embedding) at position t + 1 and a Linear(n_embd, 1) head scores it;
            thinking differentiates that scalar through the backbone. System 1 stays the per-token head's -E_base.
        correction_scale_init: tanh(s) of the correction's gate at initialisation, in [0, 1). 0 shuts the gate
            (s = 0, docs/DESIGN.md; the correction gets no gradient until s moves). Above 0 (`mixture` only) the gate
            starts open and the mixture MLP's output layer at zero instead: a fresh model still thinks on the base
            landscape, and the correction learns from the first step. Soft tokens read the provisional token
            through the context projection W_c, which is shared and cannot start at zero.
        think_steps: gradient steps on the logits before a token is chosen (alias `refine_steps`).
        think_lr: step size alpha of the descent (alias `alpha_value`).
        think_lr_learnable: make alpha a trained parameter.
        think_lr_random_scale: s >= 1; while training, alpha is multiplied per row and position by a factor drawn
            uniformly from [1/s, s] (the EBT System 2 recipe uses 2), so the energy learns to be descended with
            any step near alpha; 1 disables.
        think_samples: self-verification: G starting points per position, each descended, the one with the lowest
            final energy J_K kept (EBT's System 2 inference). 1 = a single descent.
        think_samples_noise_std: std of the Gaussian noise added to the start of every sample after the first (the
            first starts exactly where `think_init` says); with think_init="random" every sample draws its own start
            anyway, and 0 keeps the draws i.i.d. Default 0: from a System 1 start, no noise measured (0.03 to 1.0)
            made the lowest-energy sample better than one descent, and 1.0 made it 5-27% worse (BENCHMARKS.md).
        softmax_temperature: tau in p = softmax(v / tau) and v0 = -E_base / tau.
        entropy_weight: lambda of the entropy bonus in J = E_p[E] - lambda * H(p). The default lambda = tau makes
            J = tau * KL(p || softmax(-E / tau)) + const: System 1 is the minimum of a fixed landscape, so thinking
            moves only where the belief-dependent correction says so (the research code's 0.1 sharpens towards
            argmin E and measured worse, see BENCHMARKS.md).
        think_max_move: trust region, |v - v0| <= think_max_move per logit; 0 disables.
        absolute_clamp: |v| <= absolute_clamp; 0 disables.
        langevin_noise: std of the Gaussian noise added to v before each step while training (the step then corrects
            it, so the final logits are not noisy; EBT uses 3); 0 disables.
        mixture_stopgrad: hold p fixed inside E(h, y | p) when differentiating J (closed-form gradient);
            false differentiates through the landscape's dependence on p with autograd.
        think_init: start of the descent: "base_energy" (System 1 logits), "zeros" or "random".
        think_gradient: "plain" descends dJ/dv; "natural" preconditions it by the inverse Fisher of the softmax
            (mirror descent on the simplex), so rare tokens move as fast as likely ones: with a fixed landscape
            v <- (1 - alpha) v - alpha E. Needs mixture_stopgrad=true.
        think_init_noise_std: std of Gaussian noise added to the start (and of the "random" start).
        energy_convergence_threshold: each position stops moving once its own |J_k - J_{k-1}| falls below it (its
            logits and J then repeat, so there are always think_steps steps, and a row's result never depends on
            the rows batched with it); thinking ends when every position has stopped. 0 never stops early.
        use_thinking: whether forward and generate think by default (false = System 1).
    """

    model_type = "nanoebm"
    attribute_map = {
        "hidden_size": "n_embd",
        "num_hidden_layers": "n_layer",
        "num_attention_heads": "n_head",
    }

    def __init__(
        self,
        vocab_size: int = 65,
        block_size: int = 256,
        n_layer: int = 6,
        n_head: int = 6,
        n_embd: int = 384,
        dropout: float = 0.1,
        bias: bool = True,
        position_embedding: str = "learned",
        rope_theta: float = 10000.0,
        d_energy: int | None = None,
        use_token_bias: bool = True,
        landscape: str = "mixture",
        use_soft_tokens: bool | None = None,
        correction_scale_init: float = 0.0,
        think_steps: int = 2,
        think_lr: float = 0.5,
        think_lr_learnable: bool = True,
        think_lr_random_scale: float = 1.0,
        think_samples: int = 1,
        think_samples_noise_std: float = 0.0,
        softmax_temperature: float = 1.0,
        entropy_weight: float = 1.0,
        think_max_move: float = 0.25,
        absolute_clamp: float = 0.0,
        langevin_noise: float = 0.0,
        mixture_stopgrad: bool = True,
        think_init: str = "base_energy",
        think_gradient: str = "plain",
        think_init_noise_std: float = 0.0,
        energy_convergence_threshold: float = 0.0,
        use_thinking: bool = True,
        initializer_range: float = 0.02,
        tie_word_embeddings: bool = False,
        **kwargs,
    ):
        # the research code's names for the same knobs
        if "refine_steps" in kwargs:
            think_steps = kwargs.pop("refine_steps")
        if "alpha_value" in kwargs:
            think_lr = kwargs.pop("alpha_value")
        # accepted as a name for block_size, but not kept as an attribute: generate would then cap max_length at it
        # and remind that the text exceeded it, although decoding past block_size is supported (the window slides)
        if "max_position_embeddings" in kwargs:
            block_size = kwargs.pop("max_position_embeddings")
        if use_soft_tokens is not None:
            if use_soft_tokens and landscape not in ("mixture", "soft_tokens"):
                raise ValueError(
                    f"use_soft_tokens=True contradicts landscape={landscape!r}; set one of them "
                    f"(landscape='soft_tokens' is the same as use_soft_tokens=True)"
                )
            if use_soft_tokens:
                landscape = "soft_tokens"
            elif landscape == "soft_tokens":
                landscape = "mixture"
        self.vocab_size = vocab_size
        self.block_size = block_size
        self.n_layer = n_layer
        self.n_head = n_head
        self.n_embd = n_embd
        self.dropout = dropout
        self.bias = bias
        self.position_embedding = position_embedding
        self.rope_theta = rope_theta
        self.d_energy = d_energy if d_energy is not None else n_embd
        self.use_token_bias = use_token_bias
        self.landscape = landscape
        self.correction_scale_init = correction_scale_init
        self.think_steps = think_steps
        self.think_lr = think_lr
        self.think_lr_learnable = think_lr_learnable
        self.think_lr_random_scale = think_lr_random_scale
        self.think_samples = think_samples
        self.think_samples_noise_std = think_samples_noise_std
        self.softmax_temperature = softmax_temperature
        self.entropy_weight = entropy_weight
        self.think_max_move = think_max_move
        self.absolute_clamp = absolute_clamp
        self.langevin_noise = langevin_noise
        self.mixture_stopgrad = mixture_stopgrad
        self.think_init = think_init
        self.think_gradient = think_gradient
        self.think_init_noise_std = think_init_noise_std
        self.energy_convergence_threshold = energy_convergence_threshold
        self.use_thinking = use_thinking
        self.initializer_range = initializer_range
        super().__init__(tie_word_embeddings=tie_word_embeddings, **kwargs)
        self.validate_nanoebm()

    @property
    def use_soft_tokens(self) -> bool:
        return self.landscape == "soft_tokens"

    @property
    def reads_candidate(self) -> bool:
        """Thinking runs the backbone on a provisional token (soft tokens, ebt): one spare position is needed."""
        return self.landscape in PROVISIONAL_LANDSCAPES

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
        need(self.landscape in LANDSCAPES, "landscape", f"allowed: {LANDSCAPES}")
        need(0.0 <= self.correction_scale_init < 1.0, "correction_scale_init", "must be in [0, 1) (it is tanh(s))")
        if self.correction_scale_init > 0:
            need(self.landscape == "mixture", "correction_scale_init",
                 f"an open gate needs a zero-initialised output layer, which only landscape='mixture' has "
                 f"(landscape={self.landscape!r}); use 0")
        if self.landscape == "ebt":
            need(self.think_gradient == "plain", "think_gradient",
                 "landscape='ebt' descends its scalar energy by autograd: only 'plain' is allowed")
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
        for field in ("entropy_weight", "think_max_move", "absolute_clamp", "langevin_noise",
                      "think_init_noise_std", "energy_convergence_threshold", "think_samples_noise_std"):
            value = getattr(self, field)
            need(isinstance(value, (int, float)) and math.isfinite(value) and value >= 0, field,
                 "must be a finite number >= 0 (0 disables it)")
        if self.think_init == "random":
            need(self.think_init_noise_std > 0, "think_init_noise_std",
                 "must be > 0 when think_init='random' (it is the std of the random start)")

    def to_dict(self):
        out = super().to_dict()
        out["use_soft_tokens"] = self.use_soft_tokens  # the research code's flag, kept in sync for readers
        return out


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
