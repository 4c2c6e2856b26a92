#!/usr/bin/env python
"""Generate text with a nanoebm model, look at what thinking did, and compare models.

    python run_generate.py --model_name_or_path out --prompt "HAMLET:" --max_new_tokens 500
    python run_generate.py --model_name_or_path out --do_sample --num_candidates 8 --select min_energy
    python run_generate.py --model_name_or_path out --plot plots --output_json sample.json
    python run_generate.py --compare out-linear out-mixture --plot plots
    python run_generate.py checkpoint=out use_thinking=true think_steps=4 topk=64 sample=true   # research syntax

A model is a folder written by `save_pretrained` (run_train.py writes one); it is loaded through the Auto classes
with `trust_remote_code=True`, so nanoebm need not be installed. Everything the model computes per position
(System 1 and System 2 distributions, the base energy of the chosen character, the expected energy J at every
thinking step) comes from teacher-forced forward passes over prompt + generated text: one pass when that text fits
in `block_size`, otherwise overlapping windows that give every character between block_size // 2 and block_size
characters of context (as cached decoding with learned positions does).

Exit status: 0 on success, 2 on bad input (a message on stderr, never a traceback), 1 if thinking diverged.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

from nanoebm.cli import UsageError, reject_unknown, translate_research_syntax
from nanoebm.corpus import fixed_blocks, load_bpc_metric, resolve_data_path, validation_text

ROOT = Path(__file__).resolve().parent
PROG = "run_generate.py"


# ----------------------------------------------------------------------------------------------------------------
# Arguments


@dataclass
class GenerateArguments:
    model_name_or_path: str | None = field(
        default=None,
        metadata={"help": "Folder written by save_pretrained / run_train.py (loaded with trust_remote_code). "
                          "Research syntax: checkpoint=DIR. Not needed with --compare."},
    )
    prompt: str | None = field(
        default=None,
        metadata={"help": "Text to continue. An empty (or absent) prompt starts from a newline '\\n', as nanoGPT "
                          "does. Every character must be in the model's vocabulary (see --unk_token)."},
    )
    prompt_file: str | None = field(
        default=None, metadata={"help": "Read the prompt from this UTF-8 file ('-' = stdin) instead of --prompt."}
    )
    max_new_tokens: int = field(default=500, metadata={"help": "Characters to generate (>= 1)."})
    use_thinking: bool = field(
        default=True,
        metadata={"help": "Think (System 2: energy descent on the logits) before choosing every character. "
                          "'--use_thinking false' (or --no_thinking) decodes from System 1 (-E_base)."},
    )
    no_thinking: bool = field(default=False, metadata={"help": "Same as --use_thinking false."})
    think_steps: int | None = field(
        default=None,
        metadata={"help": "Descent steps K per character (default: the model config's think_steps). "
                          "Research syntax also: refine_steps=K."},
    )
    think_lr: float | None = field(
        default=None,
        metadata={"help": "Step size alpha (> 0) of the descent (default: the model's own, learned, alpha). "
                          "Research syntax also: alpha_value=A."},
    )
    do_sample: bool = field(
        default=False,
        metadata={"help": "Sample from the (refined) distribution; without it decoding is greedy. "
                          "Research syntax: sample=true."},
    )
    top_k: int | None = field(
        default=None,
        metadata={"help": "Sample only among the k most likely characters (with --do_sample; default: no "
                          "restriction). Research syntax: topk=K."},
    )
    temperature: float = field(
        default=1.0, metadata={"help": "Sampling temperature (> 0; with --do_sample). Research syntax: sample_temp=T."}
    )
    top_p: float = field(
        default=1.0,
        metadata={"help": "Nucleus sampling: keep the smallest set of characters whose probability reaches p, "
                          "0 < p <= 1 (with --do_sample). Research syntax: sample_top_p=P."},
    )
    seed: int = field(default=1337, metadata={"help": "Random seed (sampling is reproducible for a given seed)."})
    num_return_sequences: int = field(
        default=1, metadata={"help": "Independent samples to print (needs --do_sample); printed at the end."}
    )
    num_candidates: int = field(
        default=1,
        metadata={"help": "Self-verified sampling: sample this many continuations (implies --do_sample), score each "
                          "with one teacher-forced forward pass over prompt + candidate, and print the one --select "
                          "prefers. Every candidate's score is reported on stderr."},
    )
    select: Literal["min_energy", "min_nll"] = field(
        default="min_energy",
        metadata={"help": "How --num_candidates picks. min_energy: lowest total energy = the sum, over the generated "
                          "characters, of the base energy E_base(h_t, y_t) the model assigns to the character it "
                          "chose given its context (the verifier's score; unnormalised). min_nll: lowest negative "
                          "log-likelihood of the candidate under the distribution it was sampled from (System 2 when "
                          "thinking, else System 1; normalised per position)."},
    )
    stream: bool = field(
        default=True,
        metadata={"help": "Print characters to the terminal as they are produced (one sequence only; several "
                          "sequences or candidates are printed at the end). --no_stream prints at the end."},
    )
    device: Literal["auto", "cpu", "cuda", "mps"] = field(
        default="auto", metadata={"help": "Where to run: auto picks cuda, then mps, then cpu."}
    )
    unk_token: str | None = field(
        default=None,
        metadata={"help": "Map characters outside the vocabulary to this vocabulary character (e.g. ' ') instead "
                          "of stopping with an error that lists them."},
    )
    plot: str | None = field(
        default=None,
        metadata={"help": "Write PNG pictures into this folder: energy_trace.png (J across thinking steps per "
                          "position), thinking_at_position.png (distribution before/after thinking and the energy "
                          "bowl), kl_strip.png (KL(S2 || S1) per character), energy_descent.png (summary). "
                          "With --compare: compare.png."},
    )
    plot_position: int | None = field(
        default=None,
        metadata={"help": "Generated character (0-based; negative counts from the end) shown in "
                          "thinking_at_position.png (default: where thinking changed the distribution most)."},
    )
    output_json: str | None = field(
        default=None,
        metadata={"help": "Write the prompt, the text, the settings and per-character System 1 / System 2 "
                          "probabilities of the chosen character, its energy and the energy gap J0 - JK (with "
                          "--compare: the comparison table)."},
    )
    compare: list[str] | None = field(
        default=None,
        metadata={"help": "Evaluate-and-compare mode: for each model folder report validation bits per character "
                          "of System 1 and System 2, the energy gap J0 - JK and decode tokens/s (System 1 and "
                          "System 2, greedy, --max_new_tokens characters), as a table and a bar chart."},
    )
    data_path: str | None = field(
        default=None,
        metadata={"help": "Corpus for --compare (its last 10%% is the validation text). Default: $NANOEBM_DATA, "
                          "else the embedded tiny Shakespeare."},
    )
    eval_blocks: int = field(
        default=20,
        metadata={"help": "--compare: validation blocks of block_size + 1 characters, at evenly spaced "
                          "(deterministic) offsets of the validation text."},
    )
    output_dir: str | None = field(
        default=None,
        metadata={"help": "--compare: folder for compare.png and compare.json when --plot / --output_json are not "
                          "given."},
    )


# The research code's sample.py keys (key=value) and the flags they mean; every flag name is accepted as a key too.
RESEARCH_KEYS = {
    "checkpoint": "model_name_or_path",
    "topk": "top_k",
    "sample": "do_sample",
    "sample_temp": "temperature",
    "sample_top_p": "top_p",
    "refine_steps": "think_steps",
    "alpha_value": "think_lr",
}


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Defaults shown where there is one (not "default: None"), the epilog's layout kept."""

    def _get_help_string(self, action):
        if action.default is None or isinstance(action, argparse._StoreFalseAction):
            return action.help
        return super()._get_help_string(action)


EPILOG = """\
research-code syntax (sample.py): key=value words are accepted and mapped onto the flags:
  checkpoint=DIR -> --model_name_or_path DIR   topk=K -> --top_k K          sample=true -> --do_sample
  sample_temp=T  -> --temperature T            sample_top_p=P -> --top_p P  refine_steps=K -> --think_steps K
  alpha_value=A  -> --think_lr A               any other flag: name=value (prompt=..., max_new_tokens=...)

examples:
  run_generate.py --model_name_or_path out --prompt "HAMLET:" --max_new_tokens 500
  run_generate.py --model_name_or_path out --think_steps 4 --top_k 64 --do_sample --temperature 1.2 --top_p 0.9
  run_generate.py --model_name_or_path out --no_thinking                      # System 1, greedy
  run_generate.py --model_name_or_path out --do_sample --num_candidates 8 --select min_energy
  run_generate.py --model_name_or_path out --plot plots --output_json sample.json
  run_generate.py --compare out-a out-b --eval_blocks 20 --plot plots
  run_generate.py checkpoint=out use_thinking=true think_steps=4 topk=64 sample=true sample_temp=1.2 sample_top_p=0.9

exit status: 0 ok, 2 bad input (message on stderr), 1 thinking diverged (NaN/Inf: lower --think_lr).
"""


def build_parser():
    from transformers import HfArgumentParser

    parser = HfArgumentParser(
        GenerateArguments, prog=PROG, formatter_class=_HelpFormatter, epilog=EPILOG,
        description="Generate text with a nanoebm model (System 2 thinking by default), draw what thinking did, "
                    "pick the best of several samples by energy, or compare models.",
    )
    for action in parser._actions:  # the --no_<flag> complements HfArgumentParser adds for flags that default to true
        if isinstance(action, argparse._StoreFalseAction):
            action.help = f"Same as --{action.dest} false."
    return parser


def parse_arguments(argv: list[str]) -> GenerateArguments:
    parser = build_parser()
    argv = translate_research_syntax(argv, parser, renames=RESEARCH_KEYS)
    args, remaining = parser.parse_args_into_dataclasses(
        args=argv, return_remaining_strings=True, look_for_args_file=False
    )
    reject_unknown(parser, remaining)
    validate(args)
    return args


def note(message: str) -> None:
    print(f"[{PROG}] {message}", file=sys.stderr, flush=True)


def validate(args: GenerateArguments) -> None:
    if not args.compare and not args.model_name_or_path:
        raise UsageError("give a model: --model_name_or_path DIR (or checkpoint=DIR), or --compare DIR_A DIR_B ...")
    if args.compare and args.model_name_or_path:
        raise UsageError("--compare takes the model folders itself: drop --model_name_or_path")
    if args.max_new_tokens <= 0:
        raise UsageError(f"--max_new_tokens must be >= 1 (got {args.max_new_tokens})")
    if not (0.0 < args.top_p <= 1.0):
        raise UsageError(f"--top_p must be in (0, 1] (got {args.top_p}); 1 disables nucleus sampling")
    if not args.temperature > 0:
        raise UsageError(f"--temperature must be > 0 (got {args.temperature}); for greedy decoding drop --do_sample")
    if args.top_k is not None and args.top_k < 0:
        raise UsageError(f"--top_k must be >= 0 (got {args.top_k}); 0 means no restriction")
    if args.think_steps is not None and args.think_steps < 0:
        raise UsageError(f"--think_steps must be >= 0 (got {args.think_steps})")
    if args.think_lr is not None and not args.think_lr > 0:
        raise UsageError(f"--think_lr must be > 0 (got {args.think_lr})")
    if args.num_return_sequences < 1 or args.num_candidates < 1:
        raise UsageError("--num_return_sequences and --num_candidates must be >= 1")
    if args.num_return_sequences > 1 and args.num_candidates > 1:
        raise UsageError("use either --num_return_sequences (print every sample) or --num_candidates (keep the best)")
    if args.num_return_sequences > 1 and not args.do_sample:
        raise UsageError("--num_return_sequences > 1 needs --do_sample (greedy decoding returns the same text every "
                         "time)")
    if args.num_candidates > 1 and not args.do_sample:
        note(f"--num_candidates {args.num_candidates} samples its candidates: --do_sample is implied")
        args.do_sample = True
    if args.prompt is not None and args.prompt_file is not None:
        raise UsageError("give either --prompt or --prompt_file, not both")
    if args.unk_token is not None and len(args.unk_token) != 1:
        raise UsageError(f"--unk_token must be one character of the vocabulary (got {args.unk_token!r})")
    if args.eval_blocks < 1:
        raise UsageError(f"--eval_blocks must be >= 1 (got {args.eval_blocks})")
    if not args.do_sample and (args.top_k is not None or args.temperature != 1.0 or args.top_p != 1.0):
        note("--top_k / --temperature / --top_p apply to sampling only: add --do_sample (decoding is greedy)")


# ----------------------------------------------------------------------------------------------------------------
# Loading


def resolve_device(name: str):
    import torch

    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: no CUDA device is available here; use --device cpu (or auto)")
    if name == "mps" and not (getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()):
        raise UsageError("--device mps: Apple's MPS backend is not available here; use --device cpu (or auto)")
    return torch.device(name)


def load_model(path: str, device, unk_token: str | None = None):
    """(model, tokenizer) from a saved folder, through the Auto classes; UsageError with the reason otherwise."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = Path(path).expanduser()
    made_by = "save_pretrained (run_train.py writes such a folder)"
    if not folder.exists():
        raise UsageError(f"model folder {str(path)!r} does not exist")
    if not folder.is_dir():
        raise UsageError(f"{str(path)!r} is a file, not a model folder: expected a folder written by {made_by}; "
                         "the research code's .pt checkpoints cannot be loaded")
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise UsageError(f"{str(path)!r} is not a saved model: it has no config.json (expected a folder written by "
                         f"{made_by})")
    try:
        model_type = json.loads(config_file.read_text(encoding="utf-8")).get("model_type")
    except (OSError, ValueError) as error:
        raise UsageError(f"{config_file} is not readable JSON: {error}") from error
    if model_type != "nanoebm":
        raise UsageError(f"{str(path)!r} holds a {model_type!r} model, not a nanoebm one (energies and thinking are "
                         "nanoebm's)")
    try:
        tokenizer = AutoTokenizer.from_pretrained(
            folder, trust_remote_code=True, **({"unk_token": unk_token} if unk_token is not None else {})
        )
        model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)
    except (OSError, ValueError, ImportError, KeyError, TypeError, AttributeError) as error:
        raise UsageError(f"could not load the model in {str(path)!r}: {error}") from error
    if len(tokenizer) > model.config.vocab_size:
        raise UsageError(f"{str(path)!r}: the tokenizer has {len(tokenizer)} characters but the model only "
                         f"{model.config.vocab_size} ids")
    return model.to(device).eval(), tokenizer


def read_prompt(args: GenerateArguments) -> str:
    if args.prompt_file is not None:
        if args.prompt_file == "-":
            return sys.stdin.read()
        try:
            return Path(args.prompt_file).expanduser().read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as error:
            raise UsageError(f"cannot read --prompt_file {args.prompt_file!r}: {error}") from error
    return args.prompt or ""


def encode(tokenizer, text: str, what: str = "the prompt") -> list[int]:
    try:
        return tokenizer(text)["input_ids"]
    except ValueError as error:
        raise UsageError(f"{what} cannot be encoded: {error} On the command line: --unk_token ' '.") from error


def thinking_module(model):
    """The modeling module the model was loaded from (the saved folder's copy), for `expected_energy`."""
    return sys.modules[type(model).__module__]


# ----------------------------------------------------------------------------------------------------------------
# Teacher-forced analysis


def score_continuations(model, ids, start: int, think_steps: int | None = None, think_lr: float | None = None):
    """Per-position data for the targets ids[:, start:] of a batch of equally long sequences (B, L).

    One teacher-forced forward with thinking on (think_steps, think_lr as given, else the model's) when the text
    fits in block_size; otherwise windows of block_size characters that overlap by half, so that each target
    reads between block_size // 2 and block_size characters of context. Returns CPU tensors:
    targets (B, n), logp1 / logp2 (B, n, V) log-probabilities of System 1 (-E_base) and of the refined logits,
    energy (B, n) E_base of the target, trace (B, n, K + 1) J at v_0..v_K or None without thinking steps,
    window_start (n,) where each target's window began.
    """
    import torch
    import torch.nn.functional as F

    B, L = ids.shape
    if not 1 <= start < L:
        raise ValueError(f"start={start} must be in [1, {L})")
    block = model.config.block_size
    stride = max(1, block // 2)
    parts = {k: [] for k in ("targets", "logp1", "logp2", "energy", "trace", "window_start")}
    j = start
    with torch.no_grad():
        while j < L:
            a = max(0, min(j - max(1, block - stride), L - 1 - block))
            b = min(L - 1, a + block)
            out = model(ids[:, a:b], use_cache=False, use_thinking=True, think_steps=think_steps, think_lr=think_lr,
                        return_energy_trace=True)
            sl = slice(j - 1 - a, b - a)
            targets = ids[:, j:b + 1]
            parts["targets"].append(targets.cpu())
            parts["logp1"].append(F.log_softmax(out.system1_logits[:, sl].float(), dim=-1).cpu())
            parts["logp2"].append(F.log_softmax(out.logits[:, sl].float(), dim=-1).cpu())
            parts["energy"].append(out.energies[:, sl].float().gather(-1, targets[..., None])[..., 0].cpu())
            if out.energy_trace is not None:
                parts["trace"].append(out.energy_trace[:, sl].float().cpu())
            parts["window_start"].append(torch.full((b + 1 - j,), a, dtype=torch.long))
            j = b + 1
    result = {k: torch.cat(v, dim=1 if k != "window_start" else 0) for k, v in parts.items() if v}
    result.setdefault("trace", None)
    return result


def position_stats(scores, row: int = 0) -> dict:
    """Per-character numbers of one sequence of `score_continuations`."""
    logp1, logp2, targets = scores["logp1"][row], scores["logp2"][row], scores["targets"][row]
    chosen1 = logp1.gather(-1, targets[:, None])[:, 0]
    chosen2 = logp2.gather(-1, targets[:, None])[:, 0]
    kl = (logp2.exp() * (logp2 - logp1)).sum(-1).clamp(min=0)
    trace = scores["trace"]
    gap = (trace[row, :, 0] - trace[row, :, -1]) if trace is not None else None
    return dict(p1=chosen1.exp(), p2=chosen2.exp(), nll1=-chosen1, nll2=-chosen2, kl=kl,
                energy=scores["energy"][row], gap=gap)


def energy_bowl(model, ids, target: int, window_start: int, think_steps=None, think_lr=None, n_points=61):
    """J along the straight line v(t) = v0 + t (vK - v0) from the System 1 logits v0 (t = 0) to the refined logits
    vK (t = 1), for the target ids[0, target], extended on both sides: to t = -0.5 below and, above, to 1.75 or
    past the bottom of J along the line when that lies further out (at most t = 40).

    Returns ts and J(v(t)); the thinking iterates projected on the line (t_k) with their energies J_k (the model's
    own energy trace); and the trust region |v - v0| <= think_max_move as an interval of t. v0 is recomputed with
    the model's `initial_logits` (exact for think_init='base_energy' without init noise, the default).
    """
    import torch

    module = thinking_module(model)
    cfg = model.config
    with torch.no_grad():
        out = model(ids[:, window_start:target], use_cache=False, use_thinking=True, think_steps=think_steps,
                    think_lr=think_lr, return_energy_trace=True, return_landscape=True)
        landscape = out.landscape
        v0 = model.initial_logits(landscape.base)
        d = out.logits.float() - v0

        def J_at(t):
            J = module.expected_energy(landscape, v0 + t * d, cfg.softmax_temperature, cfg.entropy_weight)[0]
            return float(J[0, -1])

        coarse = [1.0, 1.5, 2.0, 3.0, 4.0, 6.0, 8.0, 12.0, 16.0, 24.0, 32.0]
        values = [J_at(t) for t in coarse]
        J0, floor = J_at(0.0), min(values)
        # the first t where J is within 2% of its lowest value along the line: the bottom of the bowl (or of the
        # slide, when J keeps falling as p sharpens towards one character)
        t_min = next(t for t, J in zip(coarse, values) if J - floor <= 0.02 * max(J0 - floor, 1e-12))
        upper = min(40.0, max(1.75, 1.25 * t_min))
        ts = torch.linspace(-0.5, upper, n_points)
        bowl = [J_at(t) for t in ts.tolist()]
        last = d[0, -1]
        norm = float((last * last).sum())
        iterates = [v0, *out.step_logits]
        t_k = [float(((v[0, -1].float() - v0[0, -1]) * last).sum()) / norm if norm > 0 else 0.0 for v in iterates]
        J_k = out.energy_trace[0, -1].float().tolist() if out.energy_trace is not None else []
        biggest = float(last.abs().max())
        trust = (cfg.think_max_move / biggest) if cfg.think_max_move > 0 and biggest > 0 else None
    return dict(ts=ts.tolist(), J=bowl, t_k=t_k[:len(J_k)], J_k=J_k, move=math.sqrt(norm), trust_t=trust)


# ----------------------------------------------------------------------------------------------------------------
# Pictures


def show_char(c: str) -> str:
    return {"\n": "↵", " ": "␣", "\t": "⇥"}.get(c, c)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _plain_text(draw):
    """Run a drawing function with mathtext off: generated text is full of '$'."""
    import functools

    @functools.wraps(draw)
    def wrapper(*args, **kwargs):
        import matplotlib

        with matplotlib.rc_context({"text.parse_math": False}):
            return draw(*args, **kwargs)

    return wrapper


@_plain_text
def plot_energy_trace(trace, chars: str, path: Path, n_examples: int = 6) -> Path:
    """J_k - J_0 across thinking steps for every generated position: the mean (with 10-90% band) and a few
    individual positions; and the gap J_0 - J_K along the text."""
    import torch

    plt = _pyplot()
    n, K1 = trace.shape
    steps = list(range(K1))
    rel = trace - trace[:, :1]
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(11, 4), gridspec_kw={"width_ratios": [1, 1.6]})
    picks = sorted(set(torch.linspace(0, n - 1, min(n_examples, n)).round().long().tolist()))
    for i in picks:
        ax.plot(steps, rel[i].tolist(), lw=1, alpha=0.7, marker=".", label=f"#{i} {show_char(chars[i])!r}")
    lo, hi = torch.quantile(rel, 0.1, dim=0), torch.quantile(rel, 0.9, dim=0)
    ax.fill_between(steps, lo.tolist(), hi.tolist(), color="k", alpha=0.1, label="10-90% of positions")
    ax.plot(steps, rel.mean(0).tolist(), color="k", lw=2.5, marker="o", label=f"mean over {n} positions")
    ax.axhline(0, color="grey", lw=0.5)
    ax.set_xticks(steps)
    ax.set_xlabel("thinking step k")
    ax.set_ylabel("J_k - J_0 (expected energy)")
    ax.set_title("energy descent per position")
    ax.legend(fontsize=7, loc="lower left")
    gap = (trace[:, 0] - trace[:, -1]).tolist()
    ax2.plot(range(n), gap, lw=0.8, color="tab:blue")
    ax2.fill_between(range(n), 0, gap, alpha=0.3, color="tab:blue")
    ax2.axhline(sum(gap) / n, color="k", ls="--", lw=1, label=f"mean gap {sum(gap) / n:.4g}")
    ax2.set_xlabel("generated character")
    ax2.set_ylabel("gap J_0 - J_K")
    ax2.set_title("energy gap thinking bought, along the text")
    ax2.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def _plot_distribution(ax, logp1, logp2, vocab: list[str], chosen: int, top: int = 8):
    import torch

    p1, p2 = logp1.exp(), logp2.exp()
    ids = list(dict.fromkeys(torch.topk(p2, min(top, p2.numel())).indices.tolist()
                             + torch.topk(p1, min(top, p1.numel())).indices.tolist()))
    ids.sort(key=lambda i: -float(p2[i]))
    ids = ids[:12]
    x = torch.arange(len(ids)).float()
    ax.bar((x - 0.2).tolist(), [float(p1[i]) for i in ids], width=0.4, label="System 1 (before)", color="tab:grey")
    ax.bar((x + 0.2).tolist(), [float(p2[i]) for i in ids], width=0.4, label="System 2 (after)", color="tab:orange")
    ax.set_xticks(x.tolist())
    labels = ax.set_xticklabels([show_char(vocab[i]) for i in ids], fontsize=11)
    for label, i in zip(labels, ids):
        if i == chosen:
            label.set_color("tab:red")
            label.set_fontweight("bold")
    ax.set_ylabel("probability")
    ax.legend(fontsize=8)


def _plot_bowl(ax, bowl: dict):
    ax.plot(bowl["ts"], bowl["J"], color="tab:blue", lw=2, label="J(v0 + t (vK - v0))")
    if bowl["J_k"]:
        ax.scatter(bowl["t_k"], bowl["J_k"], color="tab:red", zorder=3, s=25, label="thinking iterates (projected)")
        K = len(bowl["J_k"]) - 1
        crowded = (bowl["ts"][-1] - bowl["ts"][0]) > 8  # iterates too close together to label each
        for k, (t, J) in enumerate(zip(bowl["t_k"], bowl["J_k"])):
            if not crowded or k in (0, K):
                ax.annotate(f"v{k}" if k < K or K == 0 else f"vK=v{k}", (t, J), textcoords="offset points",
                            xytext=(4, 4), fontsize=8)
    if bowl.get("trust_t") is not None and bowl["trust_t"] < bowl["ts"][-1]:
        ax.axvspan(bowl["trust_t"], bowl["ts"][-1], color="grey", alpha=0.12, lw=0,
                   label="outside the trust region |v - v0| <= think_max_move")
    ax.axvline(0, color="grey", lw=0.5, ls=":")
    ax.axvline(1, color="grey", lw=0.5, ls=":")
    ax.set_xlabel("t  (0 = System 1 logits v0, 1 = refined logits vK)")
    ax.set_ylabel("expected energy J")
    ax.legend(fontsize=7, loc="upper right")


@_plain_text
def plot_thinking_at_position(chars: str, index: int, logp1, logp2, vocab, chosen: int, bowl: dict,
                              path: Path) -> Path:
    plt = _pyplot()
    context = "".join(show_char(c) for c in chars[max(0, index - 24):index])
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    _plot_distribution(ax, logp1, logp2, vocab, chosen)
    ax.set_title(f"next character after ...{context!s} (chose {show_char(vocab[chosen])!r})", fontsize=9)
    _plot_bowl(ax2, bowl)
    ax2.set_title(f"energy bowl at generated character #{index} (|vK - v0| = {bowl['move']:.3g})", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


@_plain_text
def plot_kl_strip(chars: str, kl, path: Path, width: int = 64, max_chars: int = 1024) -> Path:
    """A heat strip: each generated character on a cell coloured by KL(S2 || S1) at that position."""
    import numpy as np

    plt = _pyplot()
    values = np.asarray(kl, dtype=float)
    offset = max(0, len(chars) - max_chars)
    chars, values = chars[offset:], values[offset:]
    rows = math.ceil(len(chars) / width)
    grid = np.full((rows, width), np.nan)
    grid.flat[:len(values)] = values
    fig, ax = plt.subplots(figsize=(width * 0.17 + 1.5, rows * 0.3 + 1.2))
    vmax = max(float(np.nanmax(values)) if len(values) else 0.0, 1e-9)
    image = ax.imshow(grid, cmap="YlOrRd", vmin=0, vmax=vmax, aspect="auto", interpolation="nearest")
    for i, c in enumerate(chars):
        r, col = divmod(i, width)
        dark = values[i] > 0.6 * vmax
        ax.text(col, r, show_char(c), ha="center", va="center", fontsize=7, color="white" if dark else "black",
                family="DejaVu Sans Mono")
    ax.set_xticks([])
    ax.set_yticks(range(rows))
    ax.set_yticklabels([str(offset + r * width) for r in range(rows)], fontsize=7)
    ax.set_title("how much thinking changed each choice: KL(System 2 || System 1) in nats"
                 + (f" (last {max_chars} characters)" if offset else ""), fontsize=9)
    fig.colorbar(image, ax=ax, fraction=0.02, pad=0.01)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


@_plain_text
def plot_energy_descent(trace, bowl: dict, index: int, path: Path, title: str | None = None) -> Path:
    """The README picture: J_k - J_0 over thinking steps (mean and band over positions) and the bowl at one."""
    import torch

    plt = _pyplot()
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(9.5, 3.5))
    steps = list(range(trace.shape[1]))
    rel = trace - trace[:, :1]
    lo, hi = torch.quantile(rel, 0.1, dim=0), torch.quantile(rel, 0.9, dim=0)
    ax.fill_between(steps, lo.tolist(), hi.tolist(), alpha=0.2, color="tab:blue", label="10-90% of positions")
    ax.plot(steps, rel.mean(0).tolist(), marker="o", lw=2, color="tab:blue",
            label=f"mean over {trace.shape[0]} positions")
    ax.axhline(0, color="grey", lw=0.5)
    ax.set_xticks(steps)
    ax.set_xlabel("thinking step k")
    ax.set_ylabel("J_k - J_0")
    ax.set_title(f"expected energy across thinking steps (mean gap J0 - JK = {float(-rel[:, -1].mean()):.3g})",
                 fontsize=9)
    ax.legend(fontsize=7, loc="lower left")
    _plot_bowl(ax2, bowl)
    ax2.set_title(f"J along the line v0 -> vK at one position (#{index})", fontsize=9)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


@_plain_text
def plot_comparison(rows: list[dict], path: Path) -> Path:
    plt = _pyplot()
    names = [r["model"] for r in rows]
    x = list(range(len(rows)))
    fig, axes = plt.subplots(1, 3, figsize=(4 + 2.2 * len(rows), 3.8))
    ax = axes[0]
    for offset, key, name, color in ((-0.2, "bpc_system1", "System 1", "tab:grey"),
                                     (0.2, "bpc_system2", "System 2", "tab:orange")):
        bars = ax.bar([i + offset for i in x], [r[key] for r in rows], 0.4, label=name, color=color)
        ax.bar_label(bars, fmt="%.3f", fontsize=7)
    low = min(min(r["bpc_system1"], r["bpc_system2"]) for r in rows)
    ax.set_ylim(bottom=max(0.0, low - 0.25))
    ax.set_title("validation bits per character (lower is better)", fontsize=9)
    ax.legend(fontsize=8)
    axes[1].bar(x, [r["energy_gap"] or 0.0 for r in rows], 0.5, color="tab:blue")
    axes[1].set_title("energy gap J0 - JK (thinking)", fontsize=9)
    ax = axes[2]
    ax.bar([i - 0.2 for i in x], [r["tokens_per_s_system1"] for r in rows], 0.4, label="System 1", color="tab:grey")
    ax.bar([i + 0.2 for i in x], [r["tokens_per_s_system2"] for r in rows], 0.4, label="System 2",
           color="tab:orange")
    ax.set_title("decode tokens/s (greedy)", fontsize=9)
    ax.legend(fontsize=8)
    for ax in axes:
        ax.set_xticks(x)
        ax.set_xticklabels(names, rotation=20, ha="right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


# ----------------------------------------------------------------------------------------------------------------
# Generate mode


def resolved_thinking(model, args: GenerateArguments) -> dict:
    steps = args.think_steps if args.think_steps is not None else int(model.config.think_steps)
    alpha = args.think_lr if args.think_lr is not None else float(model.think_lr.detach())
    return dict(use_thinking=args.use_thinking and not args.no_thinking, think_steps=steps, think_lr=alpha)


def generation_kwargs(args: GenerateArguments, thinking: dict, n: int) -> dict:
    kwargs = dict(max_new_tokens=args.max_new_tokens, do_sample=args.do_sample, num_return_sequences=n,
                  use_thinking=thinking["use_thinking"])
    if args.think_steps is not None:
        kwargs["think_steps"] = args.think_steps
    if args.think_lr is not None:
        kwargs["think_lr"] = args.think_lr
    if args.do_sample:  # transformers would otherwise apply its default top_k=50
        kwargs.update(top_k=args.top_k or 0, temperature=args.temperature, top_p=args.top_p)
    return kwargs


def run_generate(args: GenerateArguments) -> int:
    import torch
    from transformers import TextStreamer, set_seed

    device = resolve_device(args.device)
    model, tokenizer = load_model(args.model_name_or_path, device, args.unk_token)
    prompt = read_prompt(args)
    if prompt == "":
        note("empty prompt: starting from a newline '\\n'")
        prompt = "\n"
    prompt_ids = encode(tokenizer, prompt)
    thinking = resolved_thinking(model, args)
    n = max(args.num_return_sequences, args.num_candidates)
    stream = args.stream and n == 1
    mode = (f"System 2 ({thinking['think_steps']} thinking steps, alpha={thinking['think_lr']:.4g})"
            if thinking["use_thinking"] and thinking["think_steps"] > 0 else "System 1 (no thinking)")
    decoding = (f"sampling (T={args.temperature}, top_k={args.top_k or 'off'}, top_p={args.top_p}, seed={args.seed})"
                if args.do_sample else "greedy")
    note(f"{Path(args.model_name_or_path).name}: {mode}, {decoding}, {args.max_new_tokens} characters"
         + (f" x {n}" if n > 1 else "") + f" on {device}")

    set_seed(args.seed)
    input_ids = torch.tensor([prompt_ids], device=device)
    streamer = TextStreamer(tokenizer) if stream else None
    started = time.perf_counter()
    with torch.no_grad():
        sequences = model.generate(input_ids, attention_mask=torch.ones_like(input_ids), streamer=streamer,
                                   **generation_kwargs(args, thinking, n))
    elapsed = time.perf_counter() - started
    sequences = sequences.cpu()
    P = len(prompt_ids)
    texts = [tokenizer.decode(row[P:].tolist()) for row in sequences]
    tokens_per_s = n * args.max_new_tokens / max(elapsed, 1e-9)

    need_scores = args.num_candidates > 1 or args.plot or args.output_json
    scores = None
    if need_scores:
        scores = score_continuations(model, sequences.to(device), P, args.think_steps, args.think_lr)
    stats = [position_stats(scores, r) for r in range(n)] if scores is not None else None

    chosen, candidates = 0, None
    if args.num_candidates > 1:
        nll_key = "nll2" if thinking["use_thinking"] else "nll1"
        candidates = [dict(index=i, total_energy=float(s["energy"].sum()), mean_energy=float(s["energy"].mean()),
                           nll=float(s[nll_key].sum()), bits_per_char=float(s[nll_key].mean()) / math.log(2),
                           text=texts[i]) for i, s in enumerate(stats)]
        key = "total_energy" if args.select == "min_energy" else "nll"
        chosen = min(range(n), key=lambda i: candidates[i][key])
        note(f"{n} candidates, selected by {args.select} "
             f"({'sum of E_base of the chosen characters' if key == 'total_energy' else 'sum of -log p'}):")
        for c in candidates:
            preview = c["text"][:48].replace("\n", "↵")
            note(f"  {'*' if c['index'] == chosen else ' '} #{c['index']}: energy {c['total_energy']:10.3f} "
                 f"({c['mean_energy']:+.4f}/char)  nll {c['bits_per_char']:.3f} bits/char  {preview!r}")
        print(prompt + texts[chosen], flush=True)
    elif n > 1:
        for i, text in enumerate(texts):
            print(f"----- sample {i + 1}/{n} -----\n{prompt}{text}", flush=True)
    elif not stream:
        print(prompt + texts[0], flush=True)

    summary = f"{n * args.max_new_tokens} characters in {elapsed:.2f} s ({tokens_per_s:.1f} tokens/s)"
    if stats is not None:
        s = stats[chosen]
        summary += (f"; chosen text: System 1 {float(s['nll1'].mean()) / math.log(2):.3f} / System 2 "
                    f"{float(s['nll2'].mean()) / math.log(2):.3f} bits/char, "
                    f"mean KL(S2||S1) {float(s['kl'].mean()):.4g}")
        if s["gap"] is not None:
            summary += f", mean energy gap J0-JK {float(s['gap'].mean()):.4g}"
    note(summary)

    if args.plot:
        write_plots(model, sequences[chosen:chosen + 1].to(device), P, texts[chosen], scores, chosen, tokenizer,
                    args, Path(args.plot))
    if args.output_json:
        settings = {**{k: v for k, v in asdict(args).items() if k not in ("compare", "data_path", "eval_blocks",
                                                                          "output_dir")},
                    **thinking, "device": str(device), "landscape": model.config.landscape,
                    "block_size": model.config.block_size, "top_k": args.top_k or 0}
        samples = [dict(text=texts[i], tokens=token_records(texts[i], stats[i])) for i in range(n)]
        record = dict(prompt=prompt, text=texts[chosen], model=str(args.model_name_or_path), settings=settings,
                      tokens=samples[chosen]["tokens"], summary=summary_record(stats[chosen], elapsed, tokens_per_s),
                      selected=chosen)
        if candidates is not None:
            record["candidates"] = candidates
        if n > 1:
            record["samples"] = samples
        write_json(record, Path(args.output_json))
    return 0


def token_records(text: str, s: dict) -> list[dict]:
    gap = s["gap"].tolist() if s["gap"] is not None else [None] * len(text)
    return [dict(char=c, p_system1=float(p1), p_system2=float(p2), energy=float(e), energy_gap=g, kl=float(k))
            for c, p1, p2, e, g, k in zip(text, s["p1"].tolist(), s["p2"].tolist(), s["energy"].tolist(), gap,
                                          s["kl"].tolist())]


def summary_record(s: dict, elapsed: float, tokens_per_s: float) -> dict:
    return dict(
        seconds=elapsed, tokens_per_s=tokens_per_s, total_energy=float(s["energy"].sum()),
        bits_per_char_system1=float(s["nll1"].mean()) / math.log(2),
        bits_per_char_system2=float(s["nll2"].mean()) / math.log(2), mean_kl=float(s["kl"].mean()),
        mean_energy_gap=float(s["gap"].mean()) if s["gap"] is not None else None,
    )


def write_json(record: dict, path: Path) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(record, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    except OSError as error:
        raise UsageError(f"cannot write {path}: {error}") from error
    note(f"wrote {path}")


def write_plots(model, ids, P: int, text: str, scores, row: int, tokenizer, args, folder: Path) -> list[Path]:
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise UsageError(f"cannot create --plot folder {folder}: {error}") from error
    s = position_stats(scores, row)
    vocab = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
    n = len(text)
    if args.plot_position is not None:
        if not -n <= args.plot_position < n:
            raise UsageError(f"--plot_position {args.plot_position} is outside the {n} generated characters")
        index = args.plot_position % n
    else:
        index = int(s["kl"].argmax())
    written = [plot_kl_strip(text, s["kl"].tolist(), folder / "kl_strip.png")]
    trace = scores["trace"][row] if scores["trace"] is not None else None
    if trace is None:
        steps = resolved_thinking(model, args)["think_steps"]
        note(f"think_steps={steps}: nothing to draw but kl_strip.png (no thinking, no energy trace)")
    else:
        bowl = energy_bowl(model, ids, P + index, int(scores["window_start"][index]), args.think_steps,
                           args.think_lr)
        written.append(plot_thinking_at_position(
            text, index, scores["logp1"][row, index], scores["logp2"][row, index], vocab,
            int(scores["targets"][row, index]), bowl, folder / "thinking_at_position.png"))
        written.append(plot_energy_trace(trace, text, folder / "energy_trace.png"))
        written.append(plot_energy_descent(trace, bowl, index, folder / "energy_descent.png"))
    note("wrote " + ", ".join(str(p) for p in written))
    return written


# ----------------------------------------------------------------------------------------------------------------
# Compare mode



def evaluate_model(model, tokenizer, val: str, args: GenerateArguments, device, label: str) -> dict:
    import torch
    import torch.nn.functional as F

    ids = torch.tensor(encode(tokenizer, val, f"the validation text (for {label})"))
    block = model.config.block_size
    try:
        batch = fixed_blocks(ids, block, args.eval_blocks).to(device)
    except ValueError as error:
        raise UsageError(str(error)) from error
    nll1, nll2, gaps = [], [], []
    with torch.no_grad():
        for chunk in batch.split(8):
            out = model(chunk[:, :-1], use_cache=False, use_thinking=True, think_steps=args.think_steps,
                        think_lr=args.think_lr, return_energy_trace=True)
            y = chunk[:, 1:].flatten()
            nll1.append(F.cross_entropy(out.system1_logits.float().flatten(0, 1), y, reduction="none").cpu())
            nll2.append(F.cross_entropy(out.logits.float().flatten(0, 1), y, reduction="none").cpu())
            if out.energy_trace is not None:
                gaps.append((out.energy_trace[..., 0] - out.energy_trace[..., -1]).float().flatten().cpu())
    metric = load_bpc_metric()
    s1 = metric.compute(nll=torch.cat(nll1).numpy())
    s2 = metric.compute(nll=torch.cat(nll2).numpy())

    prompt = read_prompt(args) or "\n"
    prompt_ids = torch.tensor([encode(tokenizer, prompt)], device=device)
    speed = {}
    for name, use_thinking in (("system1", False), ("system2", True)):
        kw = dict(do_sample=False, use_thinking=use_thinking, think_steps=args.think_steps, think_lr=args.think_lr)
        kw = {k: v for k, v in kw.items() if v is not None}
        with torch.no_grad():
            model.generate(prompt_ids, attention_mask=torch.ones_like(prompt_ids), max_new_tokens=2, **kw)  # warm-up
            started = time.perf_counter()
            out = model.generate(prompt_ids, attention_mask=torch.ones_like(prompt_ids),
                                 max_new_tokens=args.max_new_tokens, **kw)
            out.cpu()
        speed[name] = args.max_new_tokens / max(time.perf_counter() - started, 1e-9)
    thinking = resolved_thinking(model, args)
    return dict(
        model=label, path=None, landscape=model.config.landscape, block_size=block,
        think_steps=thinking["think_steps"], think_lr=thinking["think_lr"],
        parameters=sum(p.numel() for p in model.parameters()),
        bpc_system1=s1["bits_per_char"], bpc_system2=s2["bits_per_char"], n_chars=s1["n_chars"],
        energy_gap=float(torch.cat(gaps).mean()) if gaps else None,
        tokens_per_s_system1=speed["system1"], tokens_per_s_system2=speed["system2"],
    )


def comparison_table(rows: list[dict]) -> str:
    header = ("| model | landscape | think steps | bpc System 1 | bpc System 2 | S2 - S1 | energy gap J0-JK "
              "| tok/s System 1 | tok/s System 2 |")
    lines = [header, "|" + "---|" * 9]
    for r in rows:
        gap = f"{r['energy_gap']:.4g}" if r["energy_gap"] is not None else "-"
        lines.append(
            f"| {r['model']} | {r['landscape']} | {r['think_steps']} | {r['bpc_system1']:.4f} | {r['bpc_system2']:.4f} "
            f"| {r['bpc_system2'] - r['bpc_system1']:+.4f} | {gap} | {r['tokens_per_s_system1']:.1f} "
            f"| {r['tokens_per_s_system2']:.1f} |"
        )
    return "\n".join(lines)


def run_compare(args: GenerateArguments) -> int:
    device = resolve_device(args.device)
    try:
        corpus = resolve_data_path(args.data_path)
    except FileNotFoundError as error:
        raise UsageError(str(error)) from error
    val = validation_text(corpus.read_text(encoding="utf-8"))
    names = [Path(p).name or str(p) for p in args.compare]
    labels = [n if names.count(n) == 1 else str(p) for n, p in zip(names, args.compare)]
    note(f"validation: last 10% of {corpus} ({len(val)} characters), {args.eval_blocks} blocks per model; decode "
         f"speed over {args.max_new_tokens} characters, greedy, on {device}")
    rows = []
    for path, label in zip(args.compare, labels):
        model, tokenizer = load_model(path, device, args.unk_token)
        row = evaluate_model(model, tokenizer, val, args, device, label)
        row["path"] = str(path)
        rows.append(row)
        note(f"{label}: System 1 {row['bpc_system1']:.4f}, System 2 {row['bpc_system2']:.4f} bits/char")
    print(comparison_table(rows), flush=True)
    folder = Path(args.plot or args.output_dir) if (args.plot or args.output_dir) else None
    if folder is not None:
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise UsageError(f"cannot create {folder}: {error}") from error
        note(f"wrote {plot_comparison(rows, folder / 'compare.png')}")
    else:
        note("no bar chart: give --plot DIR or --output_dir DIR")
    json_path = Path(args.output_json) if args.output_json else (Path(args.output_dir) / "compare.json"
                                                                 if args.output_dir else None)
    if json_path is not None:
        write_json(dict(data=str(corpus), eval_blocks=args.eval_blocks, max_new_tokens=args.max_new_tokens,
                        device=str(device), models=rows), json_path)
    return 0


# ----------------------------------------------------------------------------------------------------------------


def quiet_transformers():
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; returns the exit status (never raises SystemExit, so tests can call it)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        args = parse_arguments(argv)
        quiet_transformers()
        return run_compare(args) if args.compare else run_generate(args)
    except UsageError as error:
        print(f"{PROG}: error: {error}", file=sys.stderr, flush=True)
        return 2
    except SystemExit as done:  # argparse: --help (0) or a malformed command line (2, usage already printed)
        return done.code if isinstance(done.code, int) else (0 if done.code is None else 2)
    except FloatingPointError as error:  # ThinkingDivergedError
        print(f"{PROG}: error: {error}", file=sys.stderr, flush=True)
        return 1
    except KeyboardInterrupt:
        print(f"\n{PROG}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
