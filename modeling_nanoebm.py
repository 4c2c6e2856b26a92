"""nanoebm: a character-level transformer that scores an energy for every candidate next token and thinks.

Read top to bottom: the GPT backbone (with a KV cache), the energy head and its landscapes, one class each (three
that score every token, and the Energy-Based Transformer's scalar energy of a candidate read by the backbone), the
energy descent on the logits ("thinking", System 2), the causal-LM wrapper whose `forward` is what `generate`,
`pipeline` and the Trainer call, and the window of tokens each decoding step reads. The maths and the option names
are those of nanoebm's docs/DESIGN.md.
"""

import math
import numbers
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from transformers import GenerationMixin, PreTrainedModel
from transformers import initialization as init
from transformers.cache_utils import Cache, DynamicCache
from transformers.modeling_outputs import BaseModelOutputWithPast
from transformers.utils import ModelOutput, logging

try:  # inside a saved model folder loaded with trust_remote_code (a package)
    from .configuration_nanoebm import (ADAPT_FIELDS, LANDSCAPES, OPTION, NanoEBMConfig, adaptation_problem,
                                        landscape_names, ordinary_file_modes)
except ImportError:  # from a checkout, as a top-level module
    from configuration_nanoebm import (ADAPT_FIELDS, LANDSCAPES, OPTION, NanoEBMConfig, adaptation_problem,
                                       landscape_names, ordinary_file_modes)

logger = logging.get_logger(__name__)

# transformers 5.24 renamed the cache argument and output field `past_key_values` to `cache`. A saved folder carries
# this file, so it must run on both sides of the rename: it speaks whichever name the installed version uses and
# accepts both on the way in.
CACHE_NAME = "cache" if "cache" in getattr(BaseModelOutputWithPast, "__dataclass_fields__", {}) else "past_key_values"


class ThinkingDivergedError(FloatingPointError):
    """The energy descent produced NaN or Inf logits."""


# ----------------------------------------------------------------------------------------------------------------
# Backbone: a nanoGPT decoder with a KV cache, padding masks and optional rotary positions


def rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def rotary_cos_sin(position_ids, head_dim, theta, dtype):
    """cos/sin of shape (B, 1, T, head_dim); computed on the fly, so no buffer needs re-initialising on load."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=position_ids.device).float() / head_dim))
    freqs = position_ids[..., None].float() * inv_freq
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos()[:, None].to(dtype), emb.sin()[:, None].to(dtype)


class CausalSelfAttention(nn.Module):
    def __init__(self, config: NanoEBMConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_head = config.n_head
        self.head_dim = config.n_embd // config.n_head
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.c_proj.init_std = residual_std(config)
        self.resid_dropout = nn.Dropout(config.dropout)
        self.dropout = config.dropout

    def forward(self, x, attn_mask, rotary=None, cache=None, context_kv=None):
        """`attn_mask` is boolean (B, 1, Tq, Tk), True = may attend, or None for plain causal attention.

        `context_kv` are the keys/values of real tokens that provisional (soft) tokens read without being cached.
        Returns the output and this call's own (key, value) so callers can keep them as context.
        """
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_head, self.head_dim).transpose(1, 2) for t in (q, k, v))
        if rotary is not None:
            cos, sin = rotary
            q, k = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
        own_kv = (k, v)
        if cache is not None:
            k, v = cache.update(k, v, self.layer_idx)
        elif context_kv is not None:
            k, v = torch.cat((context_kv[0], k), dim=2), torch.cat((context_kv[1], v), dim=2)
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=attn_mask, dropout_p=self.dropout if self.training else 0.0,
            is_causal=attn_mask is None and T > 1,
        )
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.resid_dropout(self.c_proj(y)), own_kv


class MLP(nn.Module):
    def __init__(self, config: NanoEBMConfig):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.gelu = nn.GELU()
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.c_proj.init_std = residual_std(config)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        return self.dropout(self.c_proj(self.gelu(self.c_fc(x))))


class Block(nn.Module):
    def __init__(self, config: NanoEBMConfig, layer_idx: int):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.attn = CausalSelfAttention(config, layer_idx)
        self.ln_2 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x, attn_mask, rotary=None, cache=None, context_kv=None):
        a, own_kv = self.attn(self.ln_1(x), attn_mask, rotary, cache, context_kv)
        x = x + a
        return x + self.mlp(self.ln_2(x)), own_kv


class NanoEBMPreTrainedModel(PreTrainedModel):
    config: NanoEBMConfig
    config_class = NanoEBMConfig
    base_model_prefix = "transformer"
    main_input_name = "input_ids"
    _no_split_modules = ["Block"]
    _skip_keys_device_placement = [CACHE_NAME]
    _supports_sdpa = True
    # activation checkpointing of the backbone's blocks (NanoEBMModel.run_block), switched on by transformers'
    # activation_checkpointing_enable / the Trainer's --activation_checkpointing (gradient_checkpointing_* before 5.23)
    supports_gradient_checkpointing = True
    # forward takes **kwargs; without this the Trainer would divide the loss by the accumulation steps twice
    accepts_loss_kwargs = False

    if not hasattr(PreTrainedModel, "activation_checkpointing_enable"):  # transformers < 5.23: its names of 5.23

        def activation_checkpointing_enable(self, activation_checkpointing_kwargs=None):
            """transformers 5.23's name for gradient_checkpointing_enable, so one spelling works on every version."""
            self.gradient_checkpointing_enable(gradient_checkpointing_kwargs=activation_checkpointing_kwargs)

        def activation_checkpointing_disable(self):
            self.gradient_checkpointing_disable()

    def save_pretrained(self, save_directory, *args, **kwargs):
        """Write a folder that every Auto class can load with trust_remote_code (AutoModel needs its own entry),
        whose files get the modes the umask gives (the Trainer's saves come through here too)."""
        self.config.auto_map = {
            **(getattr(self.config, "auto_map", None) or {}),
            "AutoConfig": "configuration_nanoebm.NanoEBMConfig",
            "AutoModel": "modeling_nanoebm.NanoEBMModel",
            "AutoModelForCausalLM": "modeling_nanoebm.NanoEBMForCausalLM",
        }
        with ordinary_file_modes(save_directory):
            return super().save_pretrained(save_directory, *args, **kwargs)

    @torch.no_grad()
    def _init_weights(self, module):
        """nanoGPT's init: N(0, 0.02), with the std a Linear was built with where it differs (`init_std`: the
        residual projections' 0.02 / sqrt(2 n_layer), the energy head's 1 / sqrt(d_energy)). The std lives on the
        Linear itself because transformers initialises children before their parent and never twice (from 5.24 a
        parent's re-initialisation of a child is silently skipped)."""
        std = self.config.initializer_range
        if isinstance(module, nn.Linear):
            own = getattr(module, "init_std", std)
            if own > 0:
                init.normal_(module.weight, mean=0.0, std=own)
            else:
                init.zeros_(module.weight)
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            init.normal_(module.weight, mean=0.0, std=std)
        elif isinstance(module, nn.LayerNorm):
            init.ones_(module.weight)
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, EnergyHead):
            if hasattr(module, "correction_scale"):  # tanh(s) = correction_scale_init (0: the gate is shut)
                init.constant_(module.correction_scale, math.atanh(self.config.correction_scale_init))
            if module.token_bias is not None:
                init.zeros_(module.token_bias)
        elif isinstance(module, NanoEBMForCausalLM):
            init.constant_(module.think_lr_raw, inverse_softplus(self.config.think_lr))


def residual_std(config):
    return config.initializer_range / (2 * config.n_layer) ** config.residual_init_power


def inverse_softplus(x: float) -> float:
    return x + math.log(-math.expm1(-x))


class NanoEBMModel(NanoEBMPreTrainedModel):
    """The GPT backbone: token (+ learned position) embeddings, pre-LN blocks, final LayerNorm."""

    def __init__(self, config: NanoEBMConfig):
        super().__init__(config)
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        if config.position_embedding == "learned":
            # one spare position: a provisional (candidate) token sits one past the last real one
            self.wpe = nn.Embedding(config.block_size + int(config.reads_candidate), config.n_embd)
        self.drop = nn.Dropout(config.dropout)
        self.h = nn.ModuleList([Block(config, i) for i in range(config.n_layer)])
        self.ln_f = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.gradient_checkpointing = False  # set, with _gradient_checkpointing_func, by gradient_checkpointing_enable
        self.post_init()

    def get_input_embeddings(self):
        return self.wte

    def set_input_embeddings(self, value):
        self.wte = value

    def embed(self, inputs_embeds, position_ids):
        if self.config.position_embedding == "learned":
            if position_ids.numel() and int(position_ids.max()) >= self.wpe.num_embeddings:
                raise ValueError(
                    f"position {int(position_ids.max())} is beyond block_size={self.config.block_size}: feed at most "
                    f"block_size tokens (generate crops longer prompts from the left for you)"
                )
            return self.drop(inputs_embeds + self.wpe(position_ids)), None
        head_dim = self.config.n_embd // self.config.n_head
        rotary = rotary_cos_sin(position_ids, head_dim, self.config.rope_theta, inputs_embeds.dtype)
        return self.drop(inputs_embeds), rotary

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        output_hidden_states: bool | None = None,
        return_context_kv: bool = False,
        past_key_values: Cache | None = None,
        **kwargs,
    ) -> BaseModelOutputWithPast:
        """`cache` (`past_key_values` before transformers 5.24) holds the keys and values of earlier tokens."""
        inputs_embeds = self.input_embeddings(input_ids, inputs_embeds, attention_mask)
        B, T = inputs_embeds.shape[:2]
        use_cache, cache = self.call_cache(use_cache, cache if cache is not None else past_key_values)
        past_len = cache.get_seq_length() if cache is not None else 0
        if attention_mask is not None and attention_mask.shape[-1] != past_len + T:
            raise ValueError(
                f"attention_mask covers {attention_mask.shape[-1]} tokens but the cache holds {past_len} and "
                f"{T} are new"
            )
        if position_ids is None:
            position_ids = positions_from_mask(attention_mask, past_len, T, inputs_embeds.device).expand(B, -1)
        x, rotary = self.embed(inputs_embeds, position_ids)
        # rotary models attend to at most block_size keys (a sliding window), which is what the cached decode
        # computes once it drops keys older than the window
        window = self.config.block_size if self.config.position_embedding == "rope" else None
        attn_mask = causal_padding_mask(attention_mask, past_len, T, x.device, window)
        all_hidden = () if output_hidden_states else None
        context_kv = [] if return_context_kv else None
        for block in self.h:
            if output_hidden_states:
                all_hidden += (x,)
            x, own_kv = self.run_block(block, x, attn_mask, rotary, cache if use_cache else None,
                                       reads_context=return_context_kv)
            if return_context_kv:
                context_kv.append(own_kv)
        x = self.ln_f(x)
        if output_hidden_states:
            all_hidden += (x,)
        out = BaseModelOutputWithPast(
            last_hidden_state=x, hidden_states=all_hidden, **{CACHE_NAME: cache if use_cache else None}
        )
        out.context_kv = context_kv  # not a declared field: read by the causal LM only
        out.position_ids = position_ids
        return out

    def input_embeddings(self, input_ids, inputs_embeds, attention_mask):
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        if inputs_embeds is None:
            inputs_embeds = self.wte(real_token_ids(input_ids, attention_mask, self.config.vocab_size))
        if inputs_embeds.shape[1] == 0:
            raise ValueError("input_ids is empty: give at least one token (a newline is a good neutral prompt)")
        return inputs_embeds

    def call_cache(self, use_cache, cache):
        """(use_cache, cache) for one call: caching is on by default when not training (decoding), and a fresh
        DynamicCache is made when none is given."""
        if use_cache is None:
            use_cache = getattr(self.config, "use_cache", True) and not self.training
        if use_cache and self.checkpointing():  # the backward pass re-runs each block: it would write the cache twice
            logger.warning_once("use_cache=True is incompatible with gradient checkpointing in training: not caching")
            use_cache, cache = False, None
        if use_cache and cache is None:
            cache = DynamicCache(config=self.config)
        return use_cache, cache

    def provisional_hidden(self, embeds, position_ids, context_kv, key_valid, query_index):
        """Hidden states of provisional (soft) tokens that see the real tokens 0..query_index and themselves.

        `context_kv` holds each layer's real keys/values (B, H, S, hd); provisional i follows real token
        `query_index[i]`. Nothing is written to any cache, so decoding needs no roll-back.
        """
        S, Tq = context_kv[0][0].shape[2], embeds.shape[1]
        key = torch.arange(S, device=embeds.device)[None, :]
        real = key <= query_index[:, None]  # (Tq, S)
        if self.config.position_embedding == "rope":  # the same sliding window as the real tokens
            real = real & (key > query_index[:, None] - self.config.block_size)
        mask = torch.cat((real, torch.eye(Tq, dtype=torch.bool, device=embeds.device)), dim=1)[None, None]
        if key_valid is not None:
            own = torch.ones(key_valid.shape[0], Tq, dtype=torch.bool, device=embeds.device)
            mask = mask & torch.cat((key_valid.bool(), own), dim=1)[:, None, None, :]
        x, rotary = self.embed(embeds, position_ids)
        for block, kv in zip(self.h, context_kv):
            x, _ = self.run_block(block, x, mask, rotary, context_kv=kv, reads_context=True)
        return self.ln_f(x)

    def checkpointing(self) -> bool:
        """Activation checkpointing applies when it is on, in training, with gradients to compute (never decoding)."""
        return self.gradient_checkpointing and self.training and torch.is_grad_enabled()

    def run_block(self, block, x, mask, rotary, cache=None, context_kv=None, reads_context=False):
        """One block; under activation checkpointing its activations are recomputed in the backward pass instead of
        kept. `reads_context`: gradients must also flow through the real tokens' keys and values that provisional
        tokens read (soft tokens, ebt), and the descent differentiates through the block with torch.autograd.grad
        (twice in training). Only the non-reentrant checkpoint (transformers' default) does both; its preserved RNG
        state replays the same dropout."""
        if not self.checkpointing():
            return block(x, mask, rotary, cache, context_kv)
        # the replay runs the attention kernels this forward ran (the descent's second order needs the math one,
        # chosen around the forward but not around the backward that replays it), read from torch's public switches
        enabled = [backend for backend, on in ((SDPBackend.FLASH_ATTENTION, torch.backends.cuda.flash_sdp_enabled()),
                                               (SDPBackend.EFFICIENT_ATTENTION,
                                                torch.backends.cuda.mem_efficient_sdp_enabled()),
                                               (SDPBackend.MATH, torch.backends.cuda.math_sdp_enabled()),
                                               (SDPBackend.CUDNN_ATTENTION, torch.backends.cuda.cudnn_sdp_enabled()))
                   if on]
        kernels = enabled if len(enabled) < 4 else None  # all four on: torch's default, nothing to pin

        def replay(*inputs):
            # torch's reentrant checkpoint runs its first pass under no_grad (documented): there it cannot carry the
            # gradients through the context's keys and values, nor the descent's torch.autograd.grad
            if reads_context and not torch.is_grad_enabled():
                raise ValueError(
                    f"activation_checkpointing_kwargs (gradient_checkpointing_kwargs) use_reentrant=True cannot "
                    f"carry the gradients that landscape={self.config.landscape!r} needs (through the context's keys "
                    f"and values and the thinking descent): use use_reentrant=False, the default"
                )
            with sdpa_kernel(kernels) if kernels is not None else nullcontext():
                return block(*inputs)

        return self._gradient_checkpointing_func(replay, x, mask, rotary, None, context_kv)


def real_token_ids(input_ids, attention_mask, vocab_size):
    """Token ids with padding made harmless: the tokenizer's pad id lies outside the model's vocabulary (it can
    never be mistaken for a character), so padded positions, which attention masks out, read id 0 instead."""
    if attention_mask is None:  # training and plain calls: no padding (the embedding rejects an out-of-range id)
        return input_ids
    ids = input_ids.masked_fill(~attention_mask[:, -input_ids.shape[1]:].bool(), 0)
    outside = ids >= vocab_size
    if outside.any():
        bad = sorted(set(ids[outside].tolist()))
        raise ValueError(
            f"input_ids hold {bad[:5]}, outside the vocabulary [0, {vocab_size}): ids at or above vocab_size are "
            f"padding and need attention_mask == 0 there (the tokenizer's pad token, or generate with "
            f"attention_mask)"
        )
    return ids


def positions_from_mask(attention_mask, past_len, T, device):
    """Positions count real tokens only, so a left-padded row gets the positions it would have unpadded."""
    if attention_mask is None:
        return torch.arange(past_len, past_len + T, device=device)[None]
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, -T:]


def causal_padding_mask(attention_mask, past_len, T, device, window=None):
    """Boolean (B, 1, T, past+T) mask, or None when plain causal attention is exact (no padding, no cache).

    With `window`, a query sees only the last `window` keys (itself included).
    """
    S = past_len + T
    banded = window is not None and S > window
    if attention_mask is None and past_len == 0 and not banded:
        return None
    query = torch.arange(past_len, S, device=device)[:, None]
    key = torch.arange(S, device=device)[None, :]
    mask = (key <= query) & (key > query - window) if banded else key <= query
    mask = mask[None, None]
    if attention_mask is not None:
        # a padded query would see no key at all (NaN in SDPA): let every query see itself
        mask = mask & (attention_mask.bool()[:, None, None, :] | (key == query)[None, None])
    return mask


# ----------------------------------------------------------------------------------------------------------------
# Energy head: E(h, y | p) = b_y - <W_c h, W_e e_y> - tanh(s) <r(p), W_e e_y>, or for ebt E(context, p) = w . h'(p)


class EnergyHead(nn.Module):
    """The per-token base energy's projections and bias, and the parameters the landscape adds (`build`)."""

    def __init__(self, config: NanoEBMConfig, landscape: "EnergyLandscape"):
        super().__init__()
        self.context_proj = nn.Linear(config.n_embd, config.d_energy, bias=False)  # W_c
        self.token_proj = nn.Linear(config.n_embd, config.d_energy, bias=False)  # W_e
        # std 1/sqrt(d_energy) makes W_c^T W_e ~ I, so <W_c h, W_e e_y> starts like a tied GPT head (h . e_y); two
        # 0.02-scaled factors would start the energies, and their gradients, near zero
        self.context_proj.init_std = self.token_proj.init_std = config.d_energy ** -0.5
        self.token_bias = nn.Parameter(torch.zeros(config.vocab_size)) if config.use_token_bias else None
        landscape.build(self)

    def base_energy(self, hidden, token_features):
        energy = -(self.context_proj(hidden).float() @ token_features.float().T)
        return energy + self.token_bias.float() if self.token_bias is not None else energy


@dataclass
class Landscape:
    """The energy as a function of the belief p, for one batch of positions: per candidate token (`linear`,
    `mixture`, `soft_tokens`), or one scalar for the belief itself (`ebt`, whose per-token view is the System 1 head's
    E_base: what contrastive divergence trains)."""

    base: torch.Tensor  # E_base (..., V), float32
    correction: Callable[..., torch.Tensor] | None = None  # (p, **inputs) -> <r(p), W_e e_y> for every y (..., V)
    scale: torch.Tensor | None = None  # tanh(s)
    inputs: dict = field(default_factory=dict)  # the tensors the correction reads (hidden states, context, weights)
    scalar: Callable[..., torch.Tensor] | None = None  # ebt: (p, **inputs) -> E(context, p) (...,), float32
    autograd: bool = False  # the descent takes dJ/dv by autograd (`EnergyLandscape.autograd`), else the closed form

    def __call__(self, p: torch.Tensor) -> torch.Tensor:
        if self.correction is None:
            return self.base
        return self.base - self.scale * self.correction(p, **self.inputs).float()

    def token_energy(self, tokens: torch.Tensor) -> torch.Tensor:
        """The energy the model gives candidate `tokens` (...,) as the next token: E_base(h, y), or for `ebt` the
        scalar energy of the one-hot belief on y (one more backbone pass). The verifier's score for best-of-N."""
        if self.scalar is None:
            return self.base.gather(-1, tokens[..., None]).squeeze(-1)
        return self.scalar(F.one_hot(tokens, self.base.shape[-1]).to(self.base.dtype), **self.inputs)

    def cloned(self) -> "Landscape":
        """A copy whose tensors autograd may save: tensors made under torch.inference_mode (pipelines decode
        that way) cannot be, and the coupled descent differentiates through the landscape even when decoding."""

        def clone(x):
            if torch.is_tensor(x):
                return x.clone()
            if isinstance(x, (list, tuple)):
                return type(x)(clone(item) for item in x)
            return x

        with torch.inference_mode(False):
            return Landscape(clone(self.base), self.correction, clone(self.scale),
                             {k: clone(v) for k, v in self.inputs.items()}, self.scalar, self.autograd)


# ----------------------------------------------------------------------------------------------------------------
# The landscapes, one class each: the config's `landscape` names the class (LANDSCAPE_CLASSES); its facts (what the
# config validates) are its row of configuration_nanoebm.LANDSCAPES


LANDSCAPE_CLASSES = {}  # the config's `landscape` name -> its EnergyLandscape subclass (filled as each is defined)


class EnergyLandscape:
    """One kind of energy landscape, E(h, y | p) or a scalar E(context, p): the parameters it adds to the energy head,
    its energy for a batch of positions (a `Landscape`), which gradient the descent takes, and the products with the
    vocabulary that decoding computes once per generate call. A subclass registers itself under its `name`, which must
    have a row in configuration_nanoebm.LANDSCAPES (the facts the config validates without torch)."""

    name: str = ""  # the config's `landscape` value

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if "name" not in vars(cls):  # a variant of another landscape must not take its place under the same name
            raise TypeError(f"{cls.__name__} must set its own `name`, the config's landscape value")
        if cls.name not in LANDSCAPES:
            raise TypeError(f"{cls.__name__}.name={cls.name!r} has no row in configuration_nanoebm.LANDSCAPES: add "
                            f"its LandscapeFacts there (docs/DESIGN.md, 'Adding a landscape')")
        if cls.name in LANDSCAPE_CLASSES:
            raise TypeError(f"landscape {cls.name!r} is {LANDSCAPE_CLASSES[cls.name].__name__} already")
        LANDSCAPE_CLASSES[cls.name] = cls

    def __init__(self, config: NanoEBMConfig):
        self.config, self.facts = config, LANDSCAPES[self.name]

    def build(self, head: EnergyHead):
        """Add this landscape's own parameters to the energy head (their names are those of the saved weights)."""

    def vocabulary(self, head: EnergyHead, embeddings, features) -> dict:
        """Products with the whole vocabulary that every position shares, beyond W_e e_y (`features`): computed once
        per forward, and once per generate call when decoding (the weights cannot change meanwhile)."""
        return {}

    def energy(self, model, base, hidden, vocabulary: dict, candidate: dict) -> Landscape:
        """The energy of the positions `hidden` (B, n, d) as a function of the belief, with E_base `base` (B, n, V),
        the `vocabulary` products (`features` and this class's own) and, where it reads a candidate
        (`facts.reads_candidate`), what `NanoEBMModel.provisional_hidden` needs (`candidate_hidden`)."""
        raise NotImplementedError

    def autograd(self) -> bool:
        """Whether the descent takes dJ/dv by autograd: where the landscape has no closed form, or its dependence
        on p is to be differentiated too (`mixture_stopgrad=false`). Else the closed form, p held fixed in E."""
        return not self.facts.closed_form or not self.config.mixture_stopgrad


def landscape_class(name: str) -> type:
    """The EnergyLandscape subclass registered under the config's `landscape` name."""
    if name not in LANDSCAPE_CLASSES:
        raise ValueError(f"landscape={name!r} has no EnergyLandscape subclass in modeling_nanoebm.py (registered: "
                         f"{sorted(LANDSCAPE_CLASSES)})")
    return LANDSCAPE_CLASSES[name]


def candidate_hidden(model, p, hidden, context_kv, key_valid, query_index, position_ids, **_):
    """h'(p): what the backbone outputs for a provisional token embedded as E_p[e_y] at position t + 1, reading the
    real tokens 0..t (soft tokens, ebt)."""
    embeddings = model.transformer.wte.weight
    return model.transformer.provisional_hidden(
        (p.to(embeddings.dtype) @ embeddings).to(hidden.dtype), position_ids + 1, context_kv, key_valid, query_index,
    )


class LinearLandscape(EnergyLandscape):
    """E = E_base: the belief changes nothing, so at tau = lambda = 1 thinking returns System 1 (DESIGN 3.2)."""

    name = "linear"

    def energy(self, model, base, hidden, vocabulary, candidate):
        return Landscape(base)

    def autograd(self):
        return False  # nothing depends on p: the closed form is exact


class MixtureLandscape(EnergyLandscape):
    """r(p) = MLP([h ; E_p[e_y]]), folded with the vocabulary (DESIGN 2, "The mixture, folded")."""

    name = "mixture"

    def build(self, head):
        config = self.config
        head.mixture = nn.Sequential(
            nn.Linear(2 * config.n_embd, config.n_embd, bias=config.bias),
            nn.GELU(),
            nn.Linear(config.n_embd, config.d_energy, bias=config.bias),
        )
        if config.correction_scale_init > 0:  # an open gate starts with a zero output: thinks on the base landscape
            head.mixture[-1].init_std = 0.0
        head.correction_scale = nn.Parameter(torch.zeros(()))  # s; starts at 0: think on the base landscape

    def vocabulary(self, head, embeddings, features):
        """The first layer's token half applied to every embedding (V x n_embd), and the output layer read out
        against every W_e e_y (n_embd x V, and the bias's (V,))."""
        first, _, second = head.mixture
        return dict(
            token_half=embeddings @ first.weight[:, self.config.n_embd:].T, readout=second.weight.T @ features.T,
            readout_bias=second.bias @ features.T if second.bias is not None else None,
        )

    def energy(self, model, base, hidden, vocabulary, candidate):
        # <MLP([h ; E_p[e_y]]), W_e e_y> folded: the first layer's context half W_h h once per position, its token
        # half as p (E W_e^T), and the output layer read out against the vocabulary, a (W_2^T F^T) + b_2 F^T: a
        # thinking step costs two (n_embd x V) products instead of a (2d x d) and a (d x d_energy) layer
        first, act, _ = model.energy_head.mixture
        context_half = F.linear(hidden, first.weight[:, :self.config.n_embd], first.bias)

        def correction(p, context_half, token_half, readout, readout_bias):
            scores = act(context_half + p.to(token_half.dtype) @ token_half) @ readout
            return scores + readout_bias if readout_bias is not None else scores

        inputs = dict(context_half=context_half, token_half=vocabulary["token_half"],
                      readout=vocabulary["readout"], readout_bias=vocabulary["readout_bias"])
        return Landscape(base, correction, torch.tanh(model.energy_head.correction_scale).float(), inputs)


class SoftTokensLandscape(EnergyLandscape):
    """r(p) = W_c h'(p): the backbone reads E_p[e_y] as a provisional token at t + 1 (DESIGN 2, "Soft tokens")."""

    name = "soft_tokens"

    def build(self, head):
        head.correction_scale = nn.Parameter(torch.zeros(()))  # s; starts at 0: think on the base landscape

    def energy(self, model, base, hidden, vocabulary, candidate):
        def correction(p, features, **inputs):
            return model.energy_head.context_proj(candidate_hidden(model, p, **inputs)) @ features.T

        inputs = dict(hidden=hidden, **candidate, features=vocabulary["features"])
        return Landscape(base, correction, torch.tanh(model.energy_head.correction_scale).float(), inputs)


class EBTLandscape(EnergyLandscape):
    """The Energy-Based Transformer's E(context, p) = w . h'(p), a scalar the backbone computes for the candidate
    (DESIGN 2.1); its per-token view is E_base, which contrastive divergence trains."""

    name = "ebt"

    def build(self, head):
        head.scalar = nn.Linear(self.config.n_embd, 1, bias=False)  # an offset would change no descent

    def energy(self, model, base, hidden, vocabulary, candidate):
        def scalar(p, **inputs):
            return model.energy_head.scalar(candidate_hidden(model, p, **inputs)).squeeze(-1).float()

        return Landscape(base, inputs=dict(hidden=hidden, **candidate), scalar=scalar)


def expected_energy(landscape: Landscape, logits, temperature, entropy_weight, with_objective=True):
    """J(v) = sum_y p(y) E(y | p) - lambda H(p), with p = softmax(v / tau), per position (None unless
    `with_objective`: the descent's closed-form step needs only p, log p and E). For `ebt`, J(v) = E(context, p)
    - lambda H(p), and the per-token energies returned are None."""
    log_p = F.log_softmax(logits / temperature, dim=-1)
    p = log_p.exp()
    if landscape.scalar is not None:
        J = landscape.scalar(p, **landscape.inputs) + entropy_weight * (p * log_p).sum(-1)
        return J, p, log_p, None
    energy = landscape(p)
    if not with_objective:
        return None, p, log_p, energy
    return (p * energy).sum(-1) + entropy_weight * (p * log_p).sum(-1), p, log_p, energy


# ----------------------------------------------------------------------------------------------------------------
# Thinking (System 2): energy descent on the logits, from v0 down J(v)


def think_init_logits(config, base_energy):
    """v0 as `think_init` names it: System 1's logits -E_base / tau, or zeros (`random`, whose randomness is the
    `think_init_noise_std` added to either)."""
    if config.think_init == "base_energy":
        v0 = -base_energy / config.softmax_temperature
    else:
        v0 = torch.zeros_like(base_energy)
    if config.think_init_noise_std > 0:
        v0 = v0 + config.think_init_noise_std * torch.randn_like(v0)
    # centred like every later iterate, so the trust region |v - v0| measures real moves, not a shift
    return v0 - v0.mean(-1, keepdim=True)


def descent_start(v0, config, start=None, start_mask=None, samples=1):
    """v0, centred: the initial logits `v0`, or `start` where `start_mask` is true (training's replay buffer resumes
    the descent of replayed positions from the logits an earlier step refined them to); with `samples` = G copies of
    the positions (sample-major), every copy after the first moved by `think_samples_noise_std` of noise
    (self-verification)."""
    if start is not None:
        start = start.to(v0.dtype)
        v0 = torch.where(start_mask[..., None], start - start.mean(-1, keepdim=True), v0)
    if samples > 1 and config.think_samples_noise_std > 0:
        first = v0.shape[-2] // samples
        noise = config.think_samples_noise_std * torch.randn_like(v0)
        noise[..., :first, :] = 0
        v0 = v0 + noise
        v0 = v0 - v0.mean(-1, keepdim=True)
    return v0


def closed_form_gradient(landscape: Landscape, v, config, with_objective=True):
    """J at v (None unless `with_objective`) and the descent direction with p held fixed inside E:
    (1/tau) p (d - <d>_p), d = E + lambda (log p + 1). `think_gradient="natural"` preconditions the same step by the
    inverse Fisher of softmax(v / tau), which removes the factor p."""
    tau, lam = config.softmax_temperature, config.entropy_weight
    J, p, log_p, energy = expected_energy(landscape, v, tau, lam, with_objective=with_objective)
    d = energy + lam * (log_p + 1.0)
    centred = d - (p * d).sum(-1, keepdim=True)
    return J, centred / tau if config.think_gradient == "natural" else p * centred / tau


def autograd_gradient(landscape: Landscape, v, config, second_order):
    """J at v and dJ/dv by autograd, for energies whose dependence on p the closed form would miss: `ebt` (through
    the backbone) and `mixture_stopgrad=false`. `second_order` (training) keeps the gradient's own graph, through the
    math SDPA kernel, the one with a double backward. Returns (J, grad, v), v made a leaf where it had no graph."""
    with torch.inference_mode(False), torch.enable_grad():
        if not v.requires_grad:
            v = v.clone().requires_grad_(True)
        with sdpa_kernel(SDPBackend.MATH) if second_order else nullcontext():
            J = expected_energy(landscape, v, config.softmax_temperature, config.entropy_weight)[0]
            (grad,) = torch.autograd.grad(J.sum(), v, create_graph=second_order)
    return J, grad, v


def descent_update(v, grad, alpha, bounds, config):
    """v - alpha grad, kept inside the trust region `bounds` (v0 -/+ think_max_move, or None) and |v| <=
    absolute_clamp, then centred."""
    v = v - alpha * grad
    if bounds is not None:
        v = v.clamp(min=bounds[0], max=bounds[1])
    if config.absolute_clamp > 0:
        v = v.clamp(-config.absolute_clamp, config.absolute_clamp)
    return v - v.mean(-1, keepdim=True)


class EnergyTrace:
    """J at v_0, v_1, ... per position (detached), and the positions that have stopped moving.

    With `energy_convergence_threshold` > 0 each position stops once its own |J_k - J_(k-1)| falls below it: its
    later logits and J repeat, so there are always K steps and a row's result never depends on the other rows of its
    batch; the descent ends when every position has stopped.
    """

    def __init__(self, threshold: float):
        self.threshold, self.values, self.frozen = threshold, [], None

    def record(self, J) -> bool:
        """Append J_k (a stopped position keeps its last J); True once every position has stopped."""
        previous = self.values[-1] if self.values else None
        J = J.detach() if self.frozen is None else torch.where(self.frozen, previous, J.detach())
        self.values.append(J)
        if self.threshold > 0 and previous is not None:
            settled = (J - previous).abs() < self.threshold
            self.frozen = settled if self.frozen is None else self.frozen | settled
            return bool(self.frozen.all())
        return False

    def repeat_last(self, length: int):
        self.values += [self.values[-1]] * (length - len(self.values))


def step_size(alpha, v0, config, training):
    """alpha, or in training with think_lr_random_scale s > 1, EBT's alpha * U[1/s, s] per row and position."""
    if not (training and config.think_lr_random_scale > 1):
        return alpha
    s = config.think_lr_random_scale
    return alpha * (1 / s + (s - 1 / s) * torch.rand(*v0.shape[:-1], 1, device=v0.device))


def energy_descent(landscape: Landscape, v0, steps: int, alpha, config, training=False, create_graph=False,
                   record_final=True, detach_refine=False, second_order_last_only=False):
    """Energy descent on the logits (nanoebm docs/DESIGN.md, section 3) from the centred `v0`, `steps` steps of size
    `alpha`. Returns (v_K, (v_1..v_K), J trace), the logits centred (the model's `forward` puts them back on System
    1's scale). Every position descends its own J (the objective is summed, never averaged, over positions).

    The trace (J at v_0..v_K) is computed only with `record_final` (or an early-stop threshold, which reads it);
    decoding asks for neither, so its steps compute only what the closed-form step needs, and the trace is None.
    `detach_refine` cuts the gradient between steps: each step learns only from its own update.
    `second_order_last_only`: when the loss reads only v_K, differentiate only the last autograd step twice; the
    earlier ones stay in the chain as first-order moves (EBT's truncate_mcmc: its cost is one second-order step).
    `training` adds Langevin noise before each step, which then corrects it (the final logits are not noisy).
    """
    alpha = step_size(alpha, v0, config, training)
    autograd_step = landscape.autograd
    differentiable = landscape.cloned() if autograd_step and torch.is_inference_mode_enabled() else landscape
    threshold = config.energy_convergence_threshold
    trace = EnergyTrace(threshold) if record_final or threshold > 0 else None
    bounds = (v0 - config.think_max_move, v0 + config.think_max_move) if config.think_max_move > 0 else None
    v, moves = v0, []
    for k in range(steps + int(record_final)):
        last = k == steps
        held = v  # where a position that has stopped stays (with the graph of the step that brought it there)
        if detach_refine and 0 < k < steps:  # never the returned v_K itself
            v = v.detach()
        if training and config.langevin_noise > 0 and not last:
            v = v + config.langevin_noise * torch.randn_like(v)
        if last:  # the last evaluation only reads J (never differentiated: the trace is detached)
            with torch.no_grad():
                J = expected_energy(landscape, v, config.softmax_temperature, config.entropy_weight)[0]
        elif autograd_step:
            second_order = create_graph and (not second_order_last_only or k == steps - 1)
            J, grad, v = autograd_gradient(differentiable, v, config, second_order)
        else:
            J, grad = closed_form_gradient(landscape, v, config, with_objective=trace is not None)
        if trace is not None and trace.record(J):  # every position has stopped: the rest would repeat, written out
            v = held
            moves += [v] * (steps - len(moves))
            trace.repeat_last(steps + int(record_final))
            break
        if last:
            break
        v = descent_update(v, grad, alpha, bounds, config)
        if autograd_step and not create_graph:
            v = v.detach()
        if trace is not None and trace.frozen is not None:
            v = torch.where(trace.frozen[..., None], held, v)
        moves.append(v)
    if moves and not torch.isfinite(v).all():
        raise ThinkingDivergedError(
            f"thinking produced NaN/Inf logits after {len(moves)} step(s): lower think_lr "
            f"(now {float(torch.as_tensor(alpha).detach().mean()):.4g}), raise softmax_temperature "
            f"(now {config.softmax_temperature}) or bound the moves with think_max_move / absolute_clamp"
        )
    return v, tuple(moves), torch.stack(trace.values, dim=-1) if trace is not None and trace.values else None


def checked_thinking_arguments(config, think_steps, think_lr, think_samples):
    """(steps, samples) for one call. `generate` forwards these from the user untouched, so a bad one is a
    ValueError that names it, never a silent cast (2.5 steps are not 2) or a NaN descent."""

    def integer(value):
        return isinstance(value, numbers.Integral) and not isinstance(value, bool)

    steps = config.think_steps if think_steps is None else think_steps
    if not (integer(steps) and steps >= 0):
        raise ValueError(f"think_steps={steps!r} is invalid: must be an integer >= 0")
    if think_lr is not None and not (isinstance(think_lr, numbers.Real) and not isinstance(think_lr, bool)
                                     and math.isfinite(think_lr) and think_lr > 0):
        raise ValueError(f"think_lr={think_lr!r} is invalid: must be a finite number > 0")
    samples = config.think_samples if think_samples is None else think_samples
    if not (integer(samples) and samples >= 1):
        raise ValueError(f"think_samples={samples!r} is invalid: must be an integer >= 1")
    return int(steps), int(samples)


def lowest_energy_sample(x, best):
    """x (B, G * n, ...) holds G samples of n positions, sample-major; keep sample best (B, n) of each position."""
    x = x.unflatten(1, (-1, best.shape[1]))  # (B, G, n, ...)
    index = best.view(best.shape[0], 1, best.shape[1], *([1] * (x.dim() - 3)))
    return x.gather(1, index.expand(-1, 1, -1, *x.shape[3:])).squeeze(1)


# ----------------------------------------------------------------------------------------------------------------
# The causal LM: System 1 reads -E_base, System 2 descends J on the logits


@dataclass
class NanoEBMCausalLMOutput(ModelOutput):
    """
    loss: next-token cross-entropy of `logits` (when labels are given).
    logits: the scores decoding sees: refined by thinking, or System 1 when thinking is off. Refined logits have
        System 1's mean over the vocabulary at every position, so raw values are comparable between the systems.
    system1_logits: -E_base, the one-pass prediction.
    energies: E_base, the base energy of every candidate token.
    step_logits: the logits after each thinking step (v_1 .. v_K), on the same scale as `logits`.
    energy_trace: J at v_0 .. v_K, shape (..., K + 1); J_0 - J_K is the energy gap thinking bought.
    landscape: the belief-dependent energy function of this batch (only with `return_landscape=True`).
    """

    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    system1_logits: torch.Tensor | None = None
    energies: torch.Tensor | None = None
    step_logits: tuple[torch.Tensor, ...] | None = None
    energy_trace: torch.Tensor | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None
    landscape: Landscape | None = None
    # the KV cache, under the name the installed transformers gives it (`cache` from 5.24, else `past_key_values`)
    if CACHE_NAME == "cache":
        cache: Cache | None = None
    else:
        past_key_values: Cache | None = None


class NanoEBMForCausalLM(NanoEBMPreTrainedModel, GenerationMixin):
    """The backbone, the energy head and the descent, as a causal LM. `forward` takes, beyond transformers' usual
    arguments:

    cache: the KV cache of earlier tokens (`past_key_values` before transformers 5.24; either name works).
    labels: targets aligned with `input_ids` (shifted inside, HF convention); -100 is ignored.
    shift_labels: targets already shifted (target of position t at t), as transformers' loss utilities name them;
        the training stream uses these so every one of the block_size positions is scored.
    logits_to_keep: score (and think on) only the last n positions; generate passes 1.
    use_thinking, think_steps, think_lr, think_samples: override the config for this call (generate forwards them).
        think_samples = G > 1 descends G starting points per position and keeps, position by position, the one with
        the lowest final energy (self-verification); its logits, steps and trace are returned.
    return_energy_trace: return J at v_0..v_K (one more landscape evaluation for J_K); false (as decoding asks)
        computes no J at all and returns energy_trace=None.
    return_landscape: also return the belief-dependent energy function (the Trainer's contrastive term).
    detach_refine: cut the gradient between thinking steps (training).
    detach_system1: the landscape reads the backbone's states, the token features and E_base detached, so the losses
        on thinking (refined CE, contrastive) train only the energy's own parameters (the mixture MLP, its gate, alpha)
        and System 1 learns from its own CE alone, as a plain GPT does (training; `linear` and `mixture` only).
    truncate_refine: the loss reads only the last step: autograd descents (ebt, coupled) differentiate only that step
        twice (training).
    think_start, think_start_mask: logits (B, n, V) to start the descent from where the mask (B, n) is true, instead
        of `think_init` (training's replay buffer).
    use_adaptation, adapt_lr, adapt_params, adapt_rule, adapt_decay, adapt_window, adapt_rank: learning while reading
        for this call (the config's otherwise; not in training): each row is read in windows of `adapt_window` tokens,
        each predicted by the weights learned from the windows before it, then learned from (`read_row`). Text longer
        than block_size is read whole; the loaded weights are put back after the call.
    """

    def __init__(self, config: NanoEBMConfig):
        super().__init__(config)
        self.transformer = NanoEBMModel(config)
        self.energy_landscape = landscape_class(config.landscape)(config)  # what `landscape` names (not a module)
        self.energy_head = EnergyHead(config, self.energy_landscape)
        # alpha = softplus(think_lr_raw) > 0; a Parameter only when it is learned, so "learnable" means it
        raw = torch.tensor(inverse_softplus(config.think_lr))
        if config.think_lr_learnable:
            self.think_lr_raw = nn.Parameter(raw)
        else:
            self.register_buffer("think_lr_raw", raw)
        self.post_init()

    def get_input_embeddings(self):
        return self.transformer.wte

    def set_input_embeddings(self, value):
        self.transformer.wte = value

    def resize_token_embeddings(self, new_num_tokens=None, pad_to_multiple_of=None, mean_resizing=True):
        """transformers' resize of the token embeddings (the energy head reads the same table), extended to the
        other tensor sized by the vocabulary: the energy head's bias b_y (the public method, so a rename of
        transformers' private helpers cannot skip it). A new id starts as the average candidate:
        with `mean_resizing` (the default) its embedding is the mean of the old ones (transformers) and its bias the
        mean of theirs, and E_base is linear in (e_y, b_y), so its base energy is the mean of the old vocabulary's at
        every position: far below the likely characters (never System 1's argmax) until training moves it. Without
        `mean_resizing` it starts as in a fresh model (embedding N(0, initializer_range), bias 0)."""
        embeddings = super().resize_token_embeddings(new_num_tokens, pad_to_multiple_of, mean_resizing)
        bias, size = self.energy_head.token_bias, embeddings.weight.shape[0]
        if embeddings.weight.grad is not None and embeddings.weight.grad.shape != embeddings.weight.shape:
            embeddings.weight.grad = None  # a stale gradient of the old size would fail the next backward
        if bias is not None and bias.shape[0] != size:
            with torch.no_grad():
                resized = torch.full((size,), float(bias.float().mean()) if mean_resizing else 0.0,
                                     dtype=bias.dtype, device=bias.device)
                kept = min(size, bias.shape[0])
                resized[:kept] = bias[:kept]
            self.energy_head.token_bias = nn.Parameter(resized, requires_grad=bias.requires_grad)
        return embeddings

    def padding_ids(self) -> list[int]:
        """The pad id where it lies inside the model's output, as in a model sized `len(tokenizer)` (the characters
        plus the pad): the config's `pad_token_id` (transformers' Trainer sets it from its tokenizer) or the
        generation config's (nanoebm's Trainer records it there). Decoding never chooses it; as a label it is
        ignored. A `pad_token_id` passed to one generate call keeps its transformers meaning (what fills a finished
        row; it may be a character) and is not suppressed."""
        named = (getattr(self.config, "pad_token_id", None), getattr(self.generation_config, "pad_token_id", None))
        return sorted({int(i) for i in named if isinstance(i, int) and 0 <= i < self.config.vocab_size})

    @property
    def think_lr(self) -> torch.Tensor:
        return F.softplus(self.think_lr_raw)

    # -- landscape -------------------------------------------------------------------------------------------

    def vocabulary_products(self, detached=False):
        """What every position shares: W_e e_y (V x d_energy) and the landscape's own products with the vocabulary
        (`EnergyLandscape.vocabulary`: the mixture's folded MLP). Computed once per `generate` call (the weights
        cannot change while decoding), else once per forward. `detached`: the embeddings and W_e e_y as constants,
        so only the landscape's own weights learn from these products (`detach_system1`)."""
        frozen = getattr(self, "_frozen_vocabulary", None)
        if frozen is not None:
            return frozen
        embeddings = self.transformer.wte.weight
        features = self.energy_head.token_proj(embeddings)
        if detached:
            embeddings, features = embeddings.detach(), features.detach()
        return dict(features=features, **self.energy_landscape.vocabulary(self.energy_head, embeddings, features))

    def generate(self, *args, **kwargs):
        """GenerationMixin.generate; with learning while reading (`use_adaptation`, or the config's), the prompt is
        read with learning first and continued by the adapted weights (`generate_reading`)."""
        adapt = {name: kwargs.pop(name) for name in ADAPT_FIELDS if name in kwargs}
        settings = adaptation_settings(self.config, adapt)
        if settings is not None:
            return generate_reading(self, settings, *args, **kwargs)
        return self.generate_static(*args, use_adaptation=False, **kwargs)

    def generate_static(self, *args, **kwargs):
        """GenerationMixin.generate with the weights as they are, the vocabulary-wide products computed once per call
        rather than per token, and the model's pad id never chosen (`padding_ids`)."""
        with torch.no_grad():
            self._frozen_vocabulary = self.vocabulary_products()
        self._decoding_padding = self.padding_ids()
        try:
            return super().generate(*args, **kwargs)
        finally:
            self._frozen_vocabulary = self._decoding_padding = None

    def build_landscape(self, hidden, context_kv=None, key_valid=None, query_index=None, position_ids=None,
                        detached=False):
        """E(h, . | p) for the positions in `hidden` (B, n, d), as the config's landscape class computes it; the
        candidate's context (`context_kv` ...) for a landscape that reads one. `detached`: with System 1's parts (h,
        the vocabulary's features, E_base) as constants (`detach_system1`, per-token landscapes only)."""
        vocabulary = self.vocabulary_products(detached)
        base = self.energy_head.base_energy(hidden, vocabulary["features"])
        if detached:
            hidden, base = hidden.detach(), base.detach()
        candidate = dict(context_kv=context_kv, key_valid=key_valid, query_index=query_index,
                         position_ids=position_ids)
        landscape = self.energy_landscape.energy(self, base, hidden, vocabulary, candidate)
        landscape.autograd = self.energy_landscape.autograd()
        return landscape

    # -- thinking --------------------------------------------------------------------------------------------

    def initial_logits(self, base_energy):
        """v0 as this model's `think_init` names it (`think_init_logits`), before any `think_start`."""
        return think_init_logits(self.config, base_energy)

    def think(self, landscape: Landscape, steps: int, think_lr=None, create_graph=None, record_final=True,
              detach_refine=False, start=None, start_mask=None, samples=1, second_order_last_only=False):
        """`energy_descent` with this model's step size alpha = softplus(think_lr_raw) (or `think_lr`), from
        `initial_logits` (or `start` where `start_mask` is true; `samples` copies: see `descent_start`).
        `create_graph` (default: in training) differentiates the autograd steps twice, as training's loss needs."""
        v0 = descent_start(self.initial_logits(landscape.base), self.config, start, start_mask, samples)
        return energy_descent(
            landscape, v0, steps, self.think_lr if think_lr is None else think_lr, self.config, training=self.training,
            create_graph=self.training if create_graph is None else create_graph, record_final=record_final,
            detach_refine=detach_refine, second_order_last_only=second_order_last_only,
        )

    # -- forward ---------------------------------------------------------------------------------------------

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        shift_labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        output_hidden_states: bool | None = None,
        logits_to_keep: int = 0,
        use_thinking: bool | None = None,
        think_steps: int | None = None,
        think_lr: float | None = None,
        think_samples: int | None = None,
        return_energy_trace: bool = True,
        return_landscape: bool = False,
        detach_refine: bool = False,
        detach_system1: bool = False,
        truncate_refine: bool = False,
        think_start: torch.Tensor | None = None,
        think_start_mask: torch.Tensor | None = None,
        use_adaptation: bool | None = None,
        adapt_lr: float | None = None,
        adapt_params: str | None = None,
        adapt_rule: str | None = None,
        adapt_decay: float | None = None,
        adapt_window: int | None = None,
        adapt_rank: int | None = None,
        past_key_values: Cache | None = None,
        **kwargs,
    ) -> NanoEBMCausalLMOutput:
        """The scores `generate`, pipelines and the Trainer read: System 1's -E_base, refined by thinking when it is
        on, with the loss when labels are given. The arguments beyond transformers' usual ones: see the class."""
        thinking, steps, samples, soft = self.thinking_plan(
            use_thinking, think_steps, think_lr, think_samples, think_start, think_start_mask, return_landscape)
        reading = adaptation_settings(self.config, dict(
            use_adaptation=use_adaptation, adapt_lr=adapt_lr, adapt_params=adapt_params, adapt_rule=adapt_rule,
            adapt_decay=adapt_decay, adapt_window=adapt_window, adapt_rank=adapt_rank))
        if reading is not None and not self.training:
            return forward_reading(self, input_ids, attention_mask, labels, shift_labels, reading, dict(
                use_thinking=use_thinking, think_steps=think_steps, think_lr=think_lr, think_samples=think_samples,
                return_energy_trace=return_energy_trace))
        if detach_system1 and soft:
            own = " or ".join(map(repr, landscape_names(reads_candidate=False)))
            raise ValueError(f"detach_system1=True needs an energy with parameters of its own beside System 1's "
                             f"({own}); landscape={self.config.landscape!r} runs its energy through the backbone "
                             f"System 1 uses")
        out = self.transformer(
            input_ids, attention_mask=attention_mask, position_ids=position_ids, inputs_embeds=inputs_embeds,
            cache=cache if cache is not None else past_key_values, use_cache=use_cache,
            output_hidden_states=output_hidden_states, return_context_kv=soft,
        )
        T = out.last_hidden_state.shape[1]
        n = T if not logits_to_keep else min(logits_to_keep, T)
        landscape = self.positions_landscape(out, n, attention_mask, samples, soft, detach_system1)
        if detach_system1:  # System 1's logits keep their own gradient: the landscape's copy of E_base has none
            features = self.energy_head.token_proj(self.transformer.wte.weight)
            system1 = -self.energy_head.base_energy(out.last_hidden_state[:, -n:], features)
        else:
            system1 = -landscape.base[:, :n]
        step_logits, trace, logits = (), None, system1
        if thinking:
            logits, step_logits, trace = self.system2(
                landscape, system1, steps, samples, think_lr, think_start, think_start_mask,
                return_energy_trace=return_energy_trace, detach_refine=detach_refine, truncate_refine=truncate_refine,
            )
            if samples > 1 and return_landscape:  # the landscape of the n positions, once
                landscape = self.positions_landscape(out, n, attention_mask, 1, soft, detach_system1)
        logits = self.never_padding(logits)
        loss = None
        if labels is not None or shift_labels is not None:
            loss = self.next_token_loss(logits, labels, shift_labels, attention_mask, self.padding_ids())
        return NanoEBMCausalLMOutput(
            loss=loss, logits=logits, system1_logits=system1, energies=-system1, step_logits=step_logits,
            energy_trace=trace, hidden_states=out.hidden_states, landscape=landscape if return_landscape else None,
            **{CACHE_NAME: getattr(out, CACHE_NAME)},
        )

    def thinking_plan(self, use_thinking, think_steps, think_lr, think_samples, think_start, think_start_mask,
                      return_landscape):
        """(thinking, steps, samples, soft) for one call: the config's settings unless the call overrides them; `soft`:
        provisional tokens will read the real tokens' keys and values (a landscape that reads a candidate)."""
        use_thinking = self.config.use_thinking if use_thinking is None else use_thinking
        steps, samples = checked_thinking_arguments(self.config, think_steps, think_lr, think_samples)
        if (think_start is None) != (think_start_mask is None):
            raise ValueError("think_start and think_start_mask go together: give both or neither")
        thinking = use_thinking and steps > 0
        soft = self.config.reads_candidate and (thinking or return_landscape)
        return thinking, steps, samples if thinking else 1, soft

    def never_padding(self, logits):
        """Inside generate the pad id is never chosen, whatever the decoding strategy (`padding_ids`)."""
        padding = getattr(self, "_decoding_padding", None)
        if not padding:
            return logits
        return logits.index_fill(-1, torch.tensor(padding, device=logits.device), torch.finfo(logits.dtype).min)

    def positions_landscape(self, out, n, attention_mask=None, copies=1, soft=False, detached=False):
        """The landscape of the backbone output `out`'s last `n` positions, `copies` times over (sample-major). With
        `soft`, the copies' provisional tokens read the same real keys and values (never a cache write);
        `detached`: see `build_landscape`."""
        kept = out.last_hidden_state[:, -n:]
        hidden = kept.repeat(1, copies, 1) if copies > 1 else kept
        if not soft:
            return self.build_landscape(hidden, detached=detached)
        cache = getattr(out, CACHE_NAME)
        kv = [(layer.keys, layer.values) for layer in cache.layers] if cache is not None else out.context_kv
        S = kv[0][0].shape[2]
        return self.build_landscape(
            hidden, context_kv=kv, key_valid=attention_mask, position_ids=out.position_ids[:, -n:].repeat(1, copies),
            query_index=torch.arange(S - n, S, device=kept.device).repeat(copies),
        )

    def system2(self, landscape, system1, steps, samples, think_lr, start, start_mask, return_energy_trace,
                detach_refine, truncate_refine):
        """(logits, step logits, J trace) of the descent from every position; with `samples` = G > 1 starts, per
        position the sample whose descent ended lowest (self-verification, which reads the final J)."""
        if start is not None and samples > 1:
            start, start_mask = start.repeat(1, samples, 1), start_mask.repeat(1, samples)
        logits, step_logits, trace = self.think(
            landscape, steps, think_lr, record_final=return_energy_trace or samples > 1, detach_refine=detach_refine,
            start=start, start_mask=start_mask, samples=samples, second_order_last_only=truncate_refine,
        )
        if samples > 1:
            best = trace[..., -1].unflatten(1, (samples, system1.shape[1])).argmin(1)
            logits, trace = lowest_energy_sample(logits, best), lowest_energy_sample(trace, best)
            step_logits = tuple(lowest_energy_sample(v, best) for v in step_logits)
        # the descent works on centred logits; shifted back by System 1's mean over the vocabulary, a descent that
        # changed nothing returns System 1's logits at softmax_temperature 1, and processors that read raw values
        # (repetition_penalty, output_scores) treat both systems alike. No softmax sees the shift, so it carries
        # no gradient: the refined logits train exactly what they trained centred
        shift = system1.detach().mean(-1, keepdim=True)
        return logits + shift, tuple(v + shift for v in step_logits), trace

    @staticmethod
    def next_token_loss(logits, labels=None, shift_labels=None, attention_mask=None, padding_ids=()):
        """Mean next-token cross-entropy in nats. `labels` follow the HF convention (aligned with the input, shifted
        here), so a tokenizer's padded batch can be its own labels: a target is ignored where it or the position
        predicting it is padding (attention_mask 0), as a row alone would score it. `shift_labels` are pre-shifted
        (the training stream's). Either way -100 and `padding_ids` are ignored; any other id outside the vocabulary
        is a ValueError (cross_entropy would fail deep inside, or assert on a GPU)."""
        if shift_labels is None:
            logits, shift_labels = logits[:, :-1], labels[:, 1:]
            if attention_mask is not None:
                real = attention_mask[:, -labels.shape[1]:].bool()
                shift_labels = shift_labels.masked_fill(~(real[:, 1:] & real[:, :-1]), -100)
        if logits.shape[1] != shift_labels.shape[1]:
            raise ValueError(
                f"labels cover {shift_labels.shape[1]} positions but {logits.shape[1]} were scored "
                f"(logits_to_keep must be 0 when computing a loss)"
            )
        for pad in padding_ids:
            shift_labels = shift_labels.masked_fill(shift_labels == pad, -100)
        V = logits.shape[-1]
        outside = (shift_labels != -100) & ((shift_labels < 0) | (shift_labels >= V))
        if outside.any():
            bad = sorted(set(shift_labels[outside].tolist()))
            raise ValueError(
                f"labels hold {bad[:5]}, outside the vocabulary [0, {V}) (vocab_size={V}): use -100 where no target "
                f"is scored (padding under attention_mask 0 and the pad id are ignored already)"
            )
        return F.cross_entropy(logits.float().flatten(0, 1), shift_labels.flatten(), ignore_index=-100)

    # -- generation ------------------------------------------------------------------------------------------

    def prepare_inputs_for_generation(
        self, input_ids, next_sequence_length=None, cache=None, attention_mask=None, use_cache=True,
        past_key_values=None, **kwargs,
    ):
        """Feed only the new tokens, inside a window of at most `block_size` tokens (`decode_step`), where the
        window depends on how many tokens this generate call has added (counted by
        `_update_model_kwargs_for_generation`, 0 on its first step)."""
        cache = cache if cache is not None else past_key_values
        generated = kwargs.pop("nanoebm_generated", 0)
        kwargs.pop("is_first_iteration", None)
        kwargs.pop("position_ids", None)  # generate's absolute positions ignore the window; decode_step's instead
        if attention_mask is None:
            padding = torch.tensor(getattr(self, "_decoding_padding", None) or [], dtype=torch.long,
                                   device=input_ids.device)
            attention_mask = ((input_ids < self.config.vocab_size) & ~torch.isin(input_ids, padding)).long()
        longest, block = int(attention_mask.sum(-1).max()), self.config.block_size
        if generated == 0 and longest > block:
            logger.warning_once(f"a prompt has {longest} tokens, more than block_size={block}: only its last {block} "
                                f"are read")
        fed, window, position_ids = decode_step(input_ids, attention_mask, cache if use_cache else None,
                                                next_sequence_length, generated, self.config)
        kwargs.setdefault("return_energy_trace", False)
        return {
            "input_ids": fed,
            "attention_mask": window,
            "position_ids": position_ids,
            CACHE_NAME: cache if use_cache else None,
            "use_cache": use_cache,
            **kwargs,
        }

    def _update_model_kwargs_for_generation(self, outputs, model_kwargs, is_encoder_decoder=False, num_new_tokens=1):
        """transformers' bookkeeping between decoding steps, plus the count of tokens this generate call has added:
        where a row's prompt ends decides its decode window, and neither the tokens (a prompt may be any text) nor
        the cache (a reused one holds another call's window) can tell it."""
        model_kwargs = super()._update_model_kwargs_for_generation(
            outputs, model_kwargs, is_encoder_decoder=is_encoder_decoder, num_new_tokens=num_new_tokens
        )
        model_kwargs["nanoebm_generated"] = model_kwargs.get("nanoebm_generated", 0) + num_new_tokens
        return model_kwargs


# ----------------------------------------------------------------------------------------------------------------
# Learning while reading (the second System 2): descent on the weights over the text already read


class AdaptationDivergedError(FloatingPointError):
    """Learning while reading produced a NaN or Inf loss or weight."""


def adaptation_settings(config, overrides) -> dict | None:
    """The learning-while-reading settings of one call: the config's, with the call's `overrides` (the ADAPT_FIELDS a
    caller gave, None meaning the config's own); None when the call does not learn. A bad value is a ValueError that
    names the argument, as for thinking: generate forwards them from the user untouched."""
    values = {name: getattr(config, name, OPTION[name].default) for name in ADAPT_FIELDS}
    values.update({name: value for name, value in overrides.items() if value is not None})
    problem = adaptation_problem(values, config.block_size)
    if problem is not None:
        raise ValueError(f"{problem[0]}={values[problem[0]]!r} is invalid: {problem[1]}")
    if values["adapt_window"] is None:
        values["adapt_window"] = config.block_size
    return values if values["use_adaptation"] else None


def learning_weights(model, group: str) -> dict:
    """{name: parameter} of the weights `group` names: 'head' the energy head's, 'norms' every bias and LayerNorm,
    'lora' every matrix of the blocks and the energy head (through low-rank adapters), 'all' every weight but alpha
    (the descent's step size is a setting of thinking, not of the text)."""
    chosen = {}
    for name, param in model.named_parameters():
        if name.endswith("think_lr_raw"):
            continue
        if group == "all" or (group == "head" and name.startswith("energy_head.")) \
                or (group == "norms" and (param.dim() == 1 or ".ln_" in name or "ln_f" in name)) \
                or (group == "lora" and param.dim() == 2 and ".wte." not in name and ".wpe." not in name):
            chosen[name] = param
    return chosen


class Reader:
    """One call's learning while reading: the trained weights it starts from, the adapted copy it writes into the
    model (restored bit for bit by `restore`), and the update rule's state. Strictly causal by use: `read_row` scores
    a window before `learn` reads it.

    The rule: 'sgd' steps theta -= lr g; 'rms' divides each gradient by the root of its running mean square over the
    windows read so far (floored at a tenth of the tensor's mean root, as Krause et al. floor theirs), which needs no
    statistics of the training data, so any saved folder can learn. `adapt_decay` pulls the weights back toward the
    trained ones by that fraction after every update. 'lora' learns rank-`adapt_rank` factors B A added to each
    matrix (B starts at zero: the first window is scored by the trained model)."""

    def __init__(self, model, settings: dict):
        self.model, self.settings, self.updates = model, settings, 0
        self.weights = learning_weights(model, settings["adapt_params"])
        self.trained = {name: p.detach().clone() for name, p in self.weights.items()}
        if settings["adapt_params"] == "lora":  # A drawn from its own generator: every call reads the same way
            draw = torch.Generator(device="cpu").manual_seed(0)
            rank = settings["adapt_rank"]
            self.factors = {
                name: [torch.zeros(p.shape[0], rank, dtype=torch.float32, device=p.device),  # B
                       (torch.randn(rank, p.shape[1], generator=draw) / math.sqrt(p.shape[1])).to(p.device)]  # A
                for name, p in self.weights.items()
            }
        self.square = {}

    def restore(self):
        """Put the trained weights back (bit for bit: the copies were taken before any update)."""
        with torch.no_grad():
            for name, param in self.weights.items():
                param.copy_(self.trained[name])

    def gradients(self, loss) -> dict:
        """d loss / d weight of every learning weight, without touching any `.grad` (the loaded model's state)."""
        names = list(self.weights)
        grads = torch.autograd.grad(loss, [self.weights[n] for n in names], allow_unused=True)
        return {n: g if g is not None else torch.zeros_like(self.weights[n]) for n, g in zip(names, grads)}

    def learn(self, loss):
        """One update from a window's System 1 cross-entropy `loss`; a non-finite loss or weight puts the trained
        weights back and raises, naming the knob to lower."""
        if not torch.isfinite(loss):
            self.diverged(f"the loss of window {self.updates + 1} is {float(loss)}")
        grads = self.gradients(loss)
        with torch.no_grad():
            if self.settings["adapt_params"] == "lora":
                self.learn_factors(grads)
            else:
                for name, grad in grads.items():
                    self.step(self.weights[name], name, grad.float(), self.trained[name])
        self.updates += 1
        if not all(torch.isfinite(p).all() for p in self.weights.values()):
            self.diverged(f"update {self.updates} made a weight NaN or Inf")

    def learn_factors(self, grads):
        """The gradient of W = W0 + B A reaches B as G A^T and A as B^T G."""
        for name, grad in grads.items():
            B, A = self.factors[name]
            grad = grad.float()
            gB, gA = grad @ A.T, B.T @ grad
            self.step(B, name + ".B", gB, torch.zeros_like(B))
            self.step(A, name + ".A", gA, None)
            self.weights[name].copy_((self.trained[name].float() + B @ A).to(self.weights[name].dtype))

    def step(self, tensor, key, grad, anchor):
        lr, decay = self.settings["adapt_lr"], self.settings["adapt_decay"]
        if self.settings["adapt_rule"] == "rms":
            square = self.square.get(key)
            square = grad.square() if square is None else 0.99 * square + 0.01 * grad.square()
            self.square[key] = square
            root = square.sqrt()
            grad = grad / root.clamp(min=0.1 * float(root.mean()) + 1e-12)
        tensor.sub_((lr * grad).to(tensor.dtype))
        if decay > 0 and anchor is not None:
            tensor.add_((decay * (anchor.float() - tensor.float())).to(tensor.dtype))

    def diverged(self, what):
        self.restore()
        raise AdaptationDivergedError(
            f"learning while reading diverged: {what}: lower adapt_lr (now {self.settings['adapt_lr']:.4g})"
            + (" or raise adapt_decay" if self.settings["adapt_rule"] == "rms" else "")
        )


def read_row(model, ids, settings, forward_kwargs):
    """Read one row of token ids (T,) in windows of `adapt_window` tokens, each read from its own start: a window is
    scored by the weights learned from the windows before it, then learned from: its System 1 cross-entropy on every
    target it has scored, the first token after it included (strictly causal: each character is predicted before
    any weight learns from it). Returns each window's outputs, in order, and the Reader whose weights are now in the
    model (the caller restores them)."""
    reader = Reader(model, settings)
    outputs, W = [], settings["adapt_window"]
    try:
        for start in range(0, ids.shape[0], W):
            window, targets = ids[start:start + W][None].clone(), ids[start + 1:start + W + 1].clone()
            with torch.inference_mode(False), torch.enable_grad():
                out = adapted_forward(model, reader, window, forward_kwargs)
                if targets.numel():
                    reader.learn(F.cross_entropy(out.system1_logits[0, :targets.numel()].float(), targets))
            outputs.append(detached_output(out))
    except BaseException:
        reader.restore()
        raise
    return outputs, reader


def adapted_forward(model, reader, window, forward_kwargs):
    """The model's output on one window, read by the weights the reader has learned so far; NaN or Inf there (in
    System 1, or in thinking on the adapted landscape) is the learning's fault once it has moved the weights."""
    try:
        out = model(window, use_cache=False, use_adaptation=False, **forward_kwargs)
    except ThinkingDivergedError as error:
        if reader.updates:
            reader.diverged(f"thinking on the weights learned from {reader.updates} window(s) failed ({error})")
        raise
    if reader.updates and not torch.isfinite(out.system1_logits).all():
        reader.diverged(f"the weights learned from {reader.updates} window(s) give NaN or Inf logits")
    return out


def detached_output(out):
    return {key: (value.detach() if torch.is_tensor(value) else tuple(v.detach() for v in value) if
                  isinstance(value, tuple) else value)
            for key, value in (("logits", out.logits), ("system1_logits", out.system1_logits),
                               ("step_logits", out.step_logits), ("energy_trace", out.energy_trace))}


def joined_outputs(windows: list[dict]) -> dict:
    """One row's windows joined along the positions."""
    joined = {}
    for key in ("logits", "system1_logits", "energy_trace"):
        parts = [w[key] for w in windows]
        joined[key] = None if parts[0] is None else torch.cat(parts, dim=1)
    steps = [w["step_logits"] for w in windows]
    joined["step_logits"] = tuple(torch.cat(parts, dim=1) for parts in zip(*steps)) if steps[0] else ()
    return joined


def forward_reading(model, input_ids, attention_mask, labels, shift_labels, settings, forward_kwargs):
    """`forward` with learning while reading: each row read alone (`read_row`, no row learns from another's text),
    its weights put back before the next; padded positions get zero logits. Text longer than block_size is welcome:
    every window is read from its own start."""
    if input_ids is None:
        raise ValueError("use_adaptation=True reads token ids: pass input_ids, not inputs_embeds")
    B, T = input_ids.shape
    mask = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask[:, -T:].bool()
    rows = []
    for b in range(B):
        windows, reader = read_row(model, input_ids[b][mask[b]], settings, forward_kwargs)
        reader.restore()
        rows.append(joined_outputs(windows))

    def padded(parts):  # each row's (1, n_b, ...) at its real positions of a (B, T, ...) tensor of zeros
        if parts[0] is None:
            return None
        full = parts[0].new_zeros(B, T, *parts[0].shape[2:])
        for b, part in enumerate(parts):
            full[b, mask[b]] = part[0]
        return full

    joined = {key: padded([row[key] for row in rows]) for key in ("logits", "system1_logits", "energy_trace")}
    step_logits = [padded([row["step_logits"][k] for row in rows]) for k in range(len(rows[0]["step_logits"]))]
    loss = None
    if labels is not None or shift_labels is not None:
        loss = model.next_token_loss(joined["logits"], labels, shift_labels, attention_mask, model.padding_ids())
    return NanoEBMCausalLMOutput(loss=loss, logits=joined["logits"], system1_logits=joined["system1_logits"],
                                 energies=-joined["system1_logits"], step_logits=tuple(step_logits),
                                 energy_trace=joined["energy_trace"])


def generate_reading(model, settings, inputs=None, **kwargs):
    """`generate` with learning while reading: each row's prompt is read with learning (all of it, however long),
    then continued by the adapted weights (the last block_size tokens as context); with `adapt_on_output` the model
    also learns from every `adapt_window` tokens it writes, and the next chunk re-reads its window, so no key or value
    computed by older weights is used. Rows, and with `adapt_on_output` every returned sequence, are generated one at
    a time, each from the trained weights, which are put back afterwards. Returns the sequences (B * n, P + new),
    padded on the right with the pad id where a row stopped early."""
    input_ids = kwargs.pop("input_ids", inputs)
    if input_ids is None or input_ids.shape[-1] == 0:
        raise ValueError("use_adaptation=True needs a prompt to read: pass input_ids with at least one token")
    if kwargs.get("return_dict_in_generate") or kwargs.get("num_beams", 1) > 1:
        raise ValueError("use_adaptation=True returns the sequences of greedy or sampled decoding: leave "
                         "return_dict_in_generate and num_beams at their defaults")
    attention_mask = kwargs.pop("attention_mask", None)
    mask = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
    config = kwargs.get("generation_config") or model.generation_config
    new = kwargs.pop("max_new_tokens", None) or config.max_new_tokens
    new = new if new is not None else max(0, (kwargs.pop("max_length", None) or config.max_length) - input_ids.shape[1])
    copies = kwargs.pop("num_return_sequences", None) or config.num_return_sequences or 1
    streamer = kwargs.pop("streamer", None)
    if streamer is not None:
        if input_ids.shape[0] * copies > 1:
            raise ValueError("a streamer follows one sequence: pass one prompt and num_return_sequences=1")
        streamer.put(input_ids[0][mask[0]].cpu())
        kwargs["streamer"] = streamer  # each generate call gets its own ContinuationStreamer (generate_row)
    per_row = []
    for b in range(input_ids.shape[0]):
        prompt = input_ids[b][mask[b]]
        if settings["adapt_on_output"]:
            per_row.append([generate_row(model, prompt, settings, new, 1, kwargs)[0] for _ in range(copies)])
        else:
            per_row.append(generate_row(model, prompt, settings, new, copies, kwargs))
    if streamer is not None:
        streamer.end()
    pad = kwargs.get("pad_token_id", config.pad_token_id)
    pad = pad if pad is not None else (config.eos_token_id if isinstance(config.eos_token_id, int) else 0)
    longest = max(len(seq) for row in per_row for seq in row)
    sequences = input_ids.new_full((input_ids.shape[0] * copies, input_ids.shape[1] + longest), pad)
    for b, row in enumerate(per_row):
        for i, seq in enumerate(row):
            sequences[b * copies + i, :input_ids.shape[1]] = input_ids[b]
            sequences[b * copies + i, input_ids.shape[1]:input_ids.shape[1] + len(seq)] = seq
    return sequences


class ContinuationStreamer:
    """Passes each generate call's new tokens to the user's streamer: not the window it was given as its prompt (the
    whole prompt was streamed once), nor its end (the next chunk continues the same text)."""

    def __init__(self, streamer):
        self.streamer, self.prompt_seen = streamer, False

    def put(self, value):
        if self.prompt_seen:
            self.streamer.put(value)
        self.prompt_seen = True

    def end(self):
        pass


def generate_row(model, prompt, settings, new, copies, kwargs):
    """The new tokens of `copies` continuations of one row's `prompt` (1-D, no padding), each a 1-D tensor."""
    _, reader = read_row(model, prompt, settings, dict(use_thinking=False, return_energy_trace=False))
    block, eos = model.config.block_size, model.generation_config.eos_token_id
    chunk = settings["adapt_window"] if settings["adapt_on_output"] else max(new, 1)
    try:
        context, made = prompt, [prompt.new_zeros(0)] * copies
        while len(made[0]) < new:
            n = min(chunk, new - len(made[0]))
            window = context[-block:][None]
            call = dict(kwargs)
            if call.get("streamer") is not None:
                call["streamer"] = ContinuationStreamer(call["streamer"])
            out = model.generate_static(window, attention_mask=torch.ones_like(window), max_new_tokens=n,
                                        num_return_sequences=copies, use_adaptation=False, **call)
            made = [torch.cat((m, o[window.shape[1]:])) for m, o in zip(made, out)]
            fresh = out[0, window.shape[1]:]
            if not settings["adapt_on_output"] or len(fresh) < n or (eos is not None and bool(
                    torch.isin(fresh, torch.as_tensor(eos, device=fresh.device)).any())):
                break
            context = torch.cat((context, fresh))
            learn_from(model, reader, context[-min(n + 1, block):])  # the chunk, read after the token before it
        return made
    finally:
        reader.restore()


def learn_from(model, reader, ids):
    """One update of `reader` on the System 1 cross-entropy of the text `ids` (1-D), read from its start."""
    with torch.inference_mode(False), torch.enable_grad():
        window = ids[None].clone()
        out = model(window, use_cache=False, use_adaptation=False, use_thinking=False, return_energy_trace=False)
        reader.learn(F.cross_entropy(out.system1_logits[0, :-1].float(), window[0, 1:]))


# ----------------------------------------------------------------------------------------------------------------
# Decoding: the window of tokens each generate step reads


def decode_step(input_ids, attention_mask, cache, new, generated, config):
    """What one decoding step feeds the model: (token ids, the window's attention mask, its position ids).

    Each row's window depends on its own text alone, so a left-padded row decodes exactly as it would alone.
    Learned positions: a row reads `decode_window(...)` tokens: its prompt's last `block_size` at most, then a window
    that grows to `block_size` and falls back to `block_size // 2` (every cached key would change position, so the
    window is re-read: amortised, one re-read per `block_size // 2` tokens). Rotary positions: the oldest cached keys
    are dropped, which is exact for this model, whose every layer attends to the last `block_size` keys (cached hidden
    states still carry older context, so this is not the same as re-reading the last `block_size` tokens). Without a
    cache every step re-reads the last `block_size` tokens, as the research code does.

    `cache` (None without one) is trimmed in place to the keys the step keeps; the first step of a call
    (`generated` = 0) re-reads its window, so a reused cache decodes as a fresh one. `new`: how many tokens are new
    since the last step (None on the first).
    """
    cached = cache.get_seq_length() if cache is not None else 0
    if config.position_embedding == "rope":
        new, cached, window = rotary_window(attention_mask, cache, cached, new, generated, config.block_size)
        position_ids = positions_from_mask(attention_mask, 0, new, input_ids.device)
    else:
        new, cached, window = learned_window(attention_mask.sum(-1), cached, new, generated, config.block_size,
                                             cached_decoding=cache is not None)
        position_ids = positions_from_mask(window, 0, new, input_ids.device)
    if cache is not None and cached == 0 and cache.get_seq_length():
        cache.crop(-cache.get_seq_length())  # empty it
    # a row that hit eos_token_id is extended with the pad id under attention_mask 1; generate discards what it
    # produces, so those ids read as 0 (left padding, under attention_mask 0, is handled by the backbone)
    fed = input_ids[:, -new:]
    fed = fed.masked_fill((fed >= config.vocab_size) & window[:, -new:].bool(), 0)
    return fed.contiguous(), window, position_ids


def rotary_window(attention_mask, cache, cached, new, generated, block_size):
    """(new tokens to feed, cached keys kept, the window's mask) with rotary positions: the cached keys plus the new
    tokens, the oldest keys dropped beyond `block_size`; the first step reads the last `block_size` tokens."""
    if generated == 0 or cached == 0 or new is None:
        new, cached = min(attention_mask.shape[1], block_size), 0
    elif cached + new > block_size:
        drop = cached + new - block_size
        for layer in cache.layers:
            layer.keys, layer.values = layer.keys[:, :, drop:], layer.values[:, :, drop:]
        cached -= drop
    return new, cached, attention_mask[:, -(cached + new):]


def learned_window(lengths, cached, new, generated, block_size, cached_decoding=True):
    """(new tokens to feed, cached keys kept, the window's mask) with learned positions, for rows of `lengths` real
    tokens of which the last `generated` were generated. The cache grows by the new tokens while every row's window
    grows by them; otherwise every row's window is re-read (and without a cache, the last `block_size` tokens)."""
    if cached_decoding:
        context = decode_window(lengths, block_size, generated)
        grown = (generated > 0 and cached > 0 and new is not None and cached + new == int(context.max()) and bool(
            (context == decode_window(lengths - new, block_size, generated - new) + new).all()))
    else:
        context, grown = lengths.clamp(max=block_size), False
    width = int(context.max())
    if not grown:  # first step, or some row's window restarts: re-read every row's window
        new, cached = width, 0
    columns = torch.arange(width, device=lengths.device)
    return new, cached, (columns[None, :] >= width - context[:, None]).long()


def decode_window(lengths, block_size, generated=0):
    """How many of its last tokens a row reads when decoding with learned positions, given its `lengths` real
    tokens of which the last `generated` were generated: the prompt's last `block_size` tokens at most, then one
    more per new token up to `block_size`, where the window restarts at `block_size // 2` and grows back. A
    function of the row's own prompt and length only, so batching and padding never change a row's context."""
    half = max(1, block_size // 2)
    period = block_size - half + 1
    read = (lengths - generated).clamp(max=block_size) + generated
    return torch.where(read <= block_size, read, half + (read - block_size - 1) % period)


NanoEBMModel.register_for_auto_class("AutoModel")
NanoEBMForCausalLM.register_for_auto_class("AutoModelForCausalLM")
