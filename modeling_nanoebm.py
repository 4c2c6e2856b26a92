"""nanoebm: a character-level transformer that scores an energy for every candidate next token and thinks.

Read top to bottom: the GPT backbone (with a KV cache), the energy head and its landscapes (three that score every
token, and the Energy-Based Transformer's scalar energy of a candidate read by the backbone), the energy descent on
the logits ("thinking", System 2), and the causal-LM wrapper whose `forward` is what `generate`,
`pipeline` and the Trainer call. The maths and the option names are those of nanoebm's docs/DESIGN.md.
"""

import math
import numbers
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

try:  # private in torch: a saved folder must import whatever torch runs it, so its absence only costs the pinning
    from torch.nn.attention import _cur_sdpa_kernel_backends
except ImportError:
    _cur_sdpa_kernel_backends = None
from transformers import GenerationMixin, PreTrainedModel
from transformers import initialization as init
from transformers.cache_utils import Cache, DynamicCache
from transformers.modeling_outputs import BaseModelOutputWithPast
from transformers.utils import ModelOutput, logging

try:  # inside a saved model folder loaded with trust_remote_code (a package)
    from .configuration_nanoebm import NanoEBMConfig, ordinary_file_modes
except ImportError:  # from a checkout, as a top-level module
    from configuration_nanoebm import NanoEBMConfig, ordinary_file_modes

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
    # gradient_checkpointing_enable / the Trainer's --gradient_checkpointing
    supports_gradient_checkpointing = True
    # forward takes **kwargs; without this the Trainer would divide the loss by the accumulation steps twice
    accepts_loss_kwargs = False

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
        return self.drop(inputs_embeds), rotary_cos_sin(position_ids, head_dim, self.config.rope_theta, inputs_embeds.dtype)

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
        cache = cache if cache is not None else past_key_values
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        if inputs_embeds is None:
            inputs_embeds = self.wte(real_token_ids(input_ids, attention_mask, self.config.vocab_size))
        B, T = inputs_embeds.shape[:2]
        if T == 0:
            raise ValueError("input_ids is empty: give at least one token (a newline is a good neutral prompt)")
        use_cache = use_cache if use_cache is not None else (getattr(self.config, "use_cache", True) and not self.training)
        if use_cache and self.checkpointing():  # the backward pass re-runs each block: it would write the cache twice
            logger.warning_once("use_cache=True is incompatible with gradient checkpointing in training: not caching")
            use_cache, cache = False, None
        if use_cache and cache is None:
            cache = DynamicCache(config=self.config)
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
        options = getattr(self._gradient_checkpointing_func, "keywords", None)  # a partial of torch's checkpoint
        if reads_context and options is not None and options.get("use_reentrant", True):  # torch's default: True
            raise ValueError(
                f"gradient_checkpointing_kwargs use_reentrant=True cannot carry the gradients that "
                f"landscape={self.config.landscape!r} needs (through the context's keys and values and the thinking "
                f"descent): use use_reentrant=False, the default"
            )
        # the replay runs the attention kernels this forward ran (the descent's second order needs the math one,
        # chosen around the forward but not around the backward that replays it)
        kernels = _cur_sdpa_kernel_backends() if _cur_sdpa_kernel_backends is not None else None

        def replay(*inputs):
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
    def __init__(self, config: NanoEBMConfig):
        super().__init__()
        self.context_proj = nn.Linear(config.n_embd, config.d_energy, bias=False)  # W_c
        self.token_proj = nn.Linear(config.n_embd, config.d_energy, bias=False)  # W_e
        # std 1/sqrt(d_energy) makes W_c^T W_e ~ I, so <W_c h, W_e e_y> starts like a tied GPT head (h . e_y); two
        # 0.02-scaled factors would start the energies, and their gradients, near zero
        self.context_proj.init_std = self.token_proj.init_std = config.d_energy ** -0.5
        self.token_bias = nn.Parameter(torch.zeros(config.vocab_size)) if config.use_token_bias else None
        if config.landscape == "mixture":
            self.mixture = nn.Sequential(
                nn.Linear(2 * config.n_embd, config.n_embd, bias=config.bias),
                nn.GELU(),
                nn.Linear(config.n_embd, config.d_energy, bias=config.bias),
            )
            if config.correction_scale_init > 0:  # an open gate starts with a zero output: thinks on the base landscape
                self.mixture[-1].init_std = 0.0
        if config.landscape in ("mixture", "soft_tokens"):
            self.correction_scale = nn.Parameter(torch.zeros(()))  # s; starts at 0: think on the base landscape
        if config.landscape == "ebt":  # the Energy-Based Transformer's energy head: a scalar per candidate
            self.scalar = nn.Linear(config.n_embd, 1, bias=False)  # an offset would change no descent

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

        return Landscape(clone(self.base), self.correction, clone(self.scale),
                         {k: clone(v) for k, v in self.inputs.items()}, self.scalar)


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
    def __init__(self, config: NanoEBMConfig):
        super().__init__(config)
        self.transformer = NanoEBMModel(config)
        self.energy_head = EnergyHead(config)
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

    def _resize_token_embeddings(self, new_num_tokens, pad_to_multiple_of=None, mean_resizing=True):
        """transformers' resize of the token embeddings (the energy head reads the same table), extended to the
        other tensor sized by the vocabulary: the energy head's bias b_y. A new id starts as the average candidate:
        with `mean_resizing` (the default) its embedding is the mean of the old ones (transformers) and its bias the
        mean of theirs, and E_base is linear in (e_y, b_y), so its base energy is the mean of the old vocabulary's at
        every position: far below the likely characters (never System 1's argmax) until training moves it. Without
        `mean_resizing` it starts as in a fresh model (embedding N(0, initializer_range), bias 0)."""
        embeddings = super()._resize_token_embeddings(new_num_tokens, pad_to_multiple_of, mean_resizing)
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

    def vocabulary_products(self):
        """What every position shares: W_e e_y (V x d_energy) and, for `mixture`, the correction MLP's weights
        folded with the vocabulary: its first layer's token half applied to every embedding (V x n_embd), and its
        output layer read out against every W_e e_y (n_embd x V, and the bias's (V,)). Computed once per `generate`
        call (the weights cannot change while decoding), else once per forward."""
        frozen = getattr(self, "_frozen_vocabulary", None)
        if frozen is not None:
            return frozen
        embeddings = self.transformer.wte.weight
        features = self.energy_head.token_proj(embeddings)
        if self.config.landscape != "mixture":
            return dict(features=features)
        first, _, second = self.energy_head.mixture
        return dict(
            features=features, token_half=embeddings @ first.weight[:, self.config.n_embd:].T,
            readout=second.weight.T @ features.T,
            readout_bias=second.bias @ features.T if second.bias is not None else None,
        )

    def generate(self, *args, **kwargs):
        """GenerationMixin.generate, with the vocabulary-wide products computed once per call rather than per token,
        and the model's pad id never chosen (`padding_ids`)."""
        with torch.no_grad():
            self._frozen_vocabulary = self.vocabulary_products()
        self._decoding_padding = self.padding_ids()
        try:
            return super().generate(*args, **kwargs)
        finally:
            self._frozen_vocabulary = self._decoding_padding = None

    def build_landscape(self, hidden, context_kv=None, key_valid=None, query_index=None, position_ids=None):
        """E(h, . | p) for the positions in `hidden` (B, n, d)."""
        token_embeddings = self.transformer.wte.weight
        vocabulary = self.vocabulary_products()
        features = vocabulary["features"]
        base = self.energy_head.base_energy(hidden, features)
        landscape = self.config.landscape
        if landscape == "linear":
            return Landscape(base)

        if landscape == "mixture":
            # <MLP([h ; E_p[e_y]]), W_e e_y> folded: the first layer's context half W_h h once per position, its token
            # half as p (E W_e^T), and the output layer read out against the vocabulary, a (W_2^T F^T) + b_2 F^T: a
            # thinking step costs two (n_embd x V) products instead of a (2d x d) and a (d x d_energy) layer
            first, act, _ = self.energy_head.mixture
            context_half = F.linear(hidden, first.weight[:, :self.config.n_embd], first.bias)

            def correction(p, context_half, token_half, readout, readout_bias):
                scores = act(context_half + p.to(token_half.dtype) @ token_half) @ readout
                return scores + readout_bias if readout_bias is not None else scores

            inputs = dict(context_half=context_half, token_half=vocabulary["token_half"],
                          readout=vocabulary["readout"], readout_bias=vocabulary["readout_bias"])
        else:  # soft tokens and ebt: the backbone reads a provisional token embedded as E_p[e_y] at position t + 1
            def candidate_hidden(p, hidden, context_kv, key_valid, query_index, position_ids, **_):
                return self.transformer.provisional_hidden(
                    (p.to(token_embeddings.dtype) @ token_embeddings).to(hidden.dtype), position_ids + 1, context_kv,
                    key_valid, query_index,
                )

            inputs = dict(hidden=hidden, context_kv=context_kv, key_valid=key_valid, query_index=query_index,
                          position_ids=position_ids)
            if landscape == "ebt":  # E(context, p) = w . h'(p): a scalar the backbone computes for the candidate
                def scalar(p, **inputs):
                    return self.energy_head.scalar(candidate_hidden(p, **inputs)).squeeze(-1).float()

                return Landscape(base, inputs=inputs, scalar=scalar)

            def correction(p, features, **inputs):
                return self.energy_head.context_proj(candidate_hidden(p, **inputs)) @ features.T

            inputs["features"] = features
        scale = torch.tanh(self.energy_head.correction_scale).float()
        return Landscape(base, correction, scale, inputs)

    # -- thinking --------------------------------------------------------------------------------------------

    def initial_logits(self, base_energy):
        cfg = self.config
        if cfg.think_init == "base_energy":
            v0 = -base_energy / cfg.softmax_temperature
        else:
            v0 = torch.zeros_like(base_energy)
        if cfg.think_init_noise_std > 0:
            v0 = v0 + cfg.think_init_noise_std * torch.randn_like(v0)
        # centred like every later iterate, so the trust region |v - v0| measures real moves, not a shift
        return v0 - v0.mean(-1, keepdim=True)

    def descent_start(self, base_energy, start=None, start_mask=None, samples=1):
        """v0, centred: `initial_logits`, or `start` where `start_mask` is true; with `samples` = G copies of the
        positions (sample-major), every copy after the first moved by `think_samples_noise_std` of noise."""
        v0 = self.initial_logits(base_energy)
        if start is not None:
            start = start.to(v0.dtype)
            v0 = torch.where(start_mask[..., None], start - start.mean(-1, keepdim=True), v0)
        if samples > 1 and self.config.think_samples_noise_std > 0:
            first = v0.shape[-2] // samples
            noise = self.config.think_samples_noise_std * torch.randn_like(v0)
            noise[..., :first, :] = 0
            v0 = v0 + noise
            v0 = v0 - v0.mean(-1, keepdim=True)
        return v0

    def think(self, landscape: Landscape, steps: int, think_lr=None, create_graph=None, record_final=True,
              detach_refine=False, start=None, start_mask=None, samples=1, second_order_last_only=False):
        """Energy descent on the logits (nanoebm docs/DESIGN.md, section 3). Returns (v_K, (v_1..v_K), J trace), the
        logits centred (`forward` puts them back on System 1's scale).

        The trace (J at v_0..v_K) is computed only with `record_final` (or an early-stop threshold, which reads it);
        decoding asks for neither, so its steps compute only what the closed-form step needs, and the trace is None.
        With `energy_convergence_threshold` > 0 each position stops moving once its own |J_k - J_(k-1)| falls below
        it: its later logits and J repeat, so there are always K steps and a row's result never depends on the other
        rows of its batch; the loop ends when every position has stopped.

        Every position descends its own J (the objective is summed, never averaged, over positions). `ebt`, and
        `mixture_stopgrad=false`, differentiate J with autograd (through the backbone for ebt; second order when
        training, through the math SDPA kernel, the one with a double backward).
        `detach_refine` cuts the gradient between steps: each step learns only from its own update.
        `start` (..., V) replaces `think_init` where `start_mask` (...) is true: training resumes the descent of
        replayed positions from the logits an earlier step refined them to.
        `samples` = G: the positions are G copies of n positions (sample-major); every copy after the first starts
        `think_samples_noise_std` of noise away from the first (self-verification).
        `second_order_last_only`: when the loss reads only v_K, differentiate only the last autograd step twice; the
        earlier ones stay in the chain as first-order moves (EBT's truncate_mcmc: its cost is one second-order step).
        Training's Langevin noise is added before each step, which then corrects it (the final logits are not noisy).
        """
        cfg = self.config
        tau, lam, max_move, clamp = cfg.softmax_temperature, cfg.entropy_weight, cfg.think_max_move, cfg.absolute_clamp
        alpha = self.think_lr if think_lr is None else think_lr
        create_graph = self.training if create_graph is None else create_graph
        v0 = self.descent_start(landscape.base, start, start_mask, samples)
        if self.training and cfg.think_lr_random_scale > 1:  # EBT: alpha * U[1/s, s] per row and position
            s = cfg.think_lr_random_scale
            alpha = alpha * (1 / s + (s - 1 / s) * torch.rand(*v0.shape[:-1], 1, device=v0.device))
        # frozen: the positions whose |J_k - J_(k-1)| fell below the threshold; they keep their logits from then on
        v, steps_taken, trace, previous, frozen = v0, [], [], None, None
        threshold = cfg.energy_convergence_threshold
        track = record_final or threshold > 0
        if max_move > 0:
            low, high = v0 - max_move, v0 + max_move
        autograd_step = landscape.scalar is not None or (not cfg.mixture_stopgrad and landscape.correction is not None)
        differentiable = landscape
        if autograd_step and torch.is_inference_mode_enabled():
            with torch.inference_mode(False):
                differentiable = landscape.cloned()
        for k in range(steps + 1):
            last = k == steps
            if last and not record_final:
                break
            held = v  # where a position that has stopped stays (with the graph of the step that brought it there)
            if detach_refine and 0 < k < steps:  # never the returned v_K itself
                v = v.detach()
            if self.training and cfg.langevin_noise > 0 and not last:
                v = v + cfg.langevin_noise * torch.randn_like(v)
            if autograd_step and not last:
                second_order = create_graph and (not second_order_last_only or k == steps - 1)
                with torch.inference_mode(False), torch.enable_grad():
                    if not v.requires_grad:
                        v = v.clone().requires_grad_(True)
                    with sdpa_kernel(SDPBackend.MATH) if second_order else nullcontext():
                        J = expected_energy(differentiable, v, tau, lam)[0]
                        (grad,) = torch.autograd.grad(J.sum(), v, create_graph=second_order)
            else:
                # the last evaluation only reads J (never differentiated: the trace is detached)
                with torch.no_grad() if last else nullcontext():
                    J, p, log_p, energy = expected_energy(landscape, v, tau, lam, with_objective=track)
                if not last:  # closed form with p held fixed inside E: (1/tau) p (d - <d>_p)
                    d = energy + lam * (log_p + 1.0)
                    centred = d - (p * d).sum(-1, keepdim=True)
                    # natural: the same step preconditioned by the inverse Fisher of softmax(v / tau)
                    grad = centred / tau if cfg.think_gradient == "natural" else p * centred / tau
            if track:
                J = J.detach() if frozen is None else torch.where(frozen, previous, J.detach())
                trace.append(J)
                if threshold > 0 and previous is not None:  # each position stops once its own J has settled
                    settled = (J - previous).abs() < threshold
                    frozen = settled if frozen is None else frozen | settled
                    if bool(frozen.all()):  # the rest of the steps would repeat every position: write them out
                        v = held
                        steps_taken += [v] * (steps - len(steps_taken))
                        trace += [J] * (steps + int(record_final) - len(trace))
                        break
                previous = J
            if last:
                break
            v = v - alpha * grad
            if max_move > 0:
                v = v.clamp(min=low, max=high)
            if clamp > 0:
                v = v.clamp(-clamp, clamp)
            v = v - v.mean(-1, keepdim=True)
            if autograd_step and not create_graph:
                v = v.detach()
            if frozen is not None:
                v = torch.where(frozen[..., None], held, v)
            steps_taken.append(v)
        if steps_taken and not torch.isfinite(v).all():
            raise ThinkingDivergedError(
                f"thinking produced NaN/Inf logits after {len(steps_taken)} step(s): lower think_lr "
                f"(now {float(torch.as_tensor(alpha).detach().mean()):.4g}), raise softmax_temperature "
                f"(now {tau}) or bound the moves with think_max_move / absolute_clamp"
            )
        return v, tuple(steps_taken), torch.stack(trace, dim=-1) if trace else None

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
        truncate_refine: bool = False,
        think_start: torch.Tensor | None = None,
        think_start_mask: torch.Tensor | None = None,
        past_key_values: Cache | None = None,
        **kwargs,
    ) -> NanoEBMCausalLMOutput:
        r"""
        cache: the KV cache of earlier tokens (`past_key_values` before transformers 5.24; either name works).
        labels: targets aligned with `input_ids` (shifted inside, HF convention); -100 is ignored.
        shift_labels: targets already shifted (target of position t at t), as transformers' loss utilities name
            them; the training stream uses these so every one of the block_size positions is scored.
        logits_to_keep: score (and think on) only the last n positions; generate passes 1.
        use_thinking, think_steps, think_lr, think_samples: override the config for this call (generate forwards
            them). think_samples = G > 1 descends G starting points per position and keeps, position by position,
            the one with the lowest final energy (self-verification); its logits, steps and trace are returned.
        return_energy_trace: return J at v_0..v_K (one more landscape evaluation for J_K); false (as decoding asks)
            computes no J at all and returns energy_trace=None.
        return_landscape: also return the belief-dependent energy function (the Trainer's contrastive term).
        detach_refine: cut the gradient between thinking steps (training).
        truncate_refine: the loss reads only the last step: autograd descents (ebt, coupled) differentiate only that
            step twice (training).
        think_start, think_start_mask: logits (B, n, V) to start the descent from where the mask (B, n) is true,
            instead of `think_init` (training's replay buffer).
        """
        use_thinking = self.config.use_thinking if use_thinking is None else use_thinking
        steps, samples = checked_thinking_arguments(self.config, think_steps, think_lr, think_samples)
        if (think_start is None) != (think_start_mask is None):
            raise ValueError("think_start and think_start_mask go together: give both or neither")
        thinking = use_thinking and steps > 0
        samples = samples if thinking else 1
        soft = self.config.reads_candidate and (thinking or return_landscape)
        out = self.transformer(
            input_ids, attention_mask=attention_mask, position_ids=position_ids,
            cache=cache if cache is not None else past_key_values,
            inputs_embeds=inputs_embeds, use_cache=use_cache, output_hidden_states=output_hidden_states,
            return_context_kv=soft,
        )
        hidden = out.last_hidden_state
        T = hidden.shape[1]
        n = T if not logits_to_keep else min(logits_to_keep, T)
        kept = hidden[:, -n:]
        context = lambda copies: dict()  # noqa: E731
        if soft:  # G copies of the n positions read the same real keys and values (never a cache write)
            cache = getattr(out, CACHE_NAME)
            kv = [(layer.keys, layer.values) for layer in cache.layers] if cache is not None else out.context_kv
            S = kv[0][0].shape[2]
            context = lambda copies: dict(  # noqa: E731
                context_kv=kv, key_valid=attention_mask, position_ids=out.position_ids[:, -n:].repeat(1, copies),
                query_index=torch.arange(S - n, S, device=hidden.device).repeat(copies),
            )
        landscape = self.build_landscape(kept.repeat(1, samples, 1) if samples > 1 else kept, **context(samples))
        system1 = -landscape.base[:, :n]
        step_logits, trace = (), None
        if thinking:
            if think_start is not None and samples > 1:
                think_start, think_start_mask = think_start.repeat(1, samples, 1), think_start_mask.repeat(1, samples)
            logits, step_logits, trace = self.think(
                landscape, steps, think_lr, record_final=return_energy_trace or samples > 1,
                detach_refine=detach_refine, start=think_start, start_mask=think_start_mask, samples=samples,
                second_order_last_only=truncate_refine,
            )
            if samples > 1:  # self-verification: per position, the sample whose descent ended lowest
                best = trace[..., -1].unflatten(1, (samples, n)).argmin(1)
                logits, trace = lowest_energy_sample(logits, best), lowest_energy_sample(trace, best)
                step_logits = tuple(lowest_energy_sample(v, best) for v in step_logits)
                if return_landscape:
                    landscape = self.build_landscape(kept, **context(1))
            # the descent works on centred logits; shifted back by System 1's mean over the vocabulary, a descent that
            # changed nothing returns System 1's logits at softmax_temperature 1, and processors that read raw values
            # (repetition_penalty, output_scores) treat both systems alike. No softmax sees the shift, so it carries
            # no gradient: the refined logits train exactly what they trained centred
            shift = system1.detach().mean(-1, keepdim=True)
            logits, step_logits = logits + shift, tuple(v + shift for v in step_logits)
        else:
            logits = system1
        padding = getattr(self, "_decoding_padding", None)
        if padding:  # inside generate: the pad id is never chosen, whatever the decoding strategy
            logits = logits.index_fill(-1, torch.tensor(padding, device=logits.device), torch.finfo(logits.dtype).min)

        loss = None
        if labels is not None or shift_labels is not None:
            loss = self.next_token_loss(logits, labels, shift_labels, attention_mask, self.padding_ids())
        return NanoEBMCausalLMOutput(
            loss=loss, logits=logits, system1_logits=system1, energies=-system1, step_logits=step_logits,
            energy_trace=trace, hidden_states=out.hidden_states, landscape=landscape if return_landscape else None,
            **{CACHE_NAME: getattr(out, CACHE_NAME)},
        )

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
        """Feed only the new tokens, inside a window of at most `block_size` tokens.

        Each row's window depends on its own text alone, so a left-padded row decodes exactly as it would alone.
        Learned positions: a row reads `decode_window(...)` tokens: its prompt's last `block_size` at most, then a
        window that grows to `block_size` and falls back to `block_size // 2` (every cached key would change
        position, so the window is re-read: amortised, one re-read per `block_size // 2` tokens). Rotary positions: the oldest cached keys are dropped, which is
        exact for this model, whose every layer attends to the last `block_size` keys (cached hidden states still
        carry older context, so this is not the same as re-reading the last `block_size` tokens). Without a cache
        every step re-reads the last `block_size` tokens, as the research code does.
        """
        cache = cache if cache is not None else past_key_values
        block = self.config.block_size
        cache_position = kwargs.pop("cache_position", None)
        if next_sequence_length is None and cache_position is not None and cache is not None \
                and cache.get_seq_length() > 0:  # transformers < 5.3 passes only the new tokens' positions
            next_sequence_length = cache_position.shape[-1]
        first = kwargs.pop("is_first_iteration", False)
        kwargs.pop("position_ids", None)  # generate's absolute positions ignore the window; recomputed below
        if attention_mask is None:
            padding = torch.tensor(getattr(self, "_decoding_padding", None) or [], dtype=torch.long,
                                   device=input_ids.device)
            attention_mask = ((input_ids < self.config.vocab_size) & ~torch.isin(input_ids, padding)).long()
        lengths = attention_mask.sum(-1)
        if first and int(lengths.max()) > block:
            logger.warning_once(f"a prompt has {int(lengths.max())} tokens, more than block_size={block}: only its "
                                f"last {block} are read")
        cached = cache.get_seq_length() if (use_cache and cache is not None) else 0
        new = next_sequence_length
        if self.config.position_embedding == "rope":
            if cached == 0 or new is None:
                new, cached = min(input_ids.shape[1], block), 0
            elif cached + new > block:
                drop = cached + new - block
                for layer in cache.layers:
                    layer.keys, layer.values = layer.keys[:, :, drop:], layer.values[:, :, drop:]
                cached -= drop
            window = attention_mask[:, -(cached + new):]
            position_ids = positions_from_mask(attention_mask, 0, new, input_ids.device)
        else:
            if use_cache and cache is not None:
                if not hasattr(cache, "_nanoebm_prompt_width"):  # the first step of this generate call
                    cache._nanoebm_prompt_width = input_ids.shape[1]
                generated = input_ids.shape[1] - cache._nanoebm_prompt_width
                context = decode_window(lengths, block, generated)
                grown = (cached > 0 and new is not None and cached + new == int(context.max()) and bool(
                    (context == decode_window(lengths - new, block, generated - new) + new).all()))
            else:  # no cache: every step re-reads the last block_size tokens
                context, grown = lengths.clamp(max=block), False
            width = int(context.max())
            if not grown:  # first step, or some row's window restarts: re-read every row's window
                new, cached = width, 0
            columns = torch.arange(width, device=input_ids.device)
            window = (columns[None, :] >= width - context[:, None]).long()
            position_ids = positions_from_mask(window, 0, new, input_ids.device)
        if cache is not None and cached == 0 and cache.get_seq_length():
            cache.crop(-cache.get_seq_length())  # empty it
        kwargs.setdefault("return_energy_trace", False)
        # a row that hit eos_token_id is extended with the pad id under attention_mask 1; generate discards what it
        # produces, so those ids read as 0 (left padding, under attention_mask 0, is handled by the backbone)
        fed = input_ids[:, -new:]
        fed = fed.masked_fill((fed >= self.config.vocab_size) & window[:, -new:].bool(), 0)
        return {
            "input_ids": fed.contiguous(),
            "attention_mask": window,
            "position_ids": position_ids,
            CACHE_NAME: cache if use_cache else None,
            "use_cache": use_cache,
            **kwargs,
        }


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
