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
import math
import os
import shlex
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

# The pictures live in nanoebm.plots, the comparison in nanoebm.compare, what both share with generation (the
# teacher-forced scores, the thinking settings, `note`) in nanoebm.analysis; none of them imports this file, and none
# imports torch, transformers or matplotlib before a function needs it (--help stays fast).
from nanoebm.analysis import PROG, encode, note, position_stats, resolved_thinking, score_continuations, token_strings
from nanoebm.cli import (UsageError, check_unk_token, model_options, raise_usage_error, reject_unknown, report,
                         translate_research_syntax, unk_token_field)
from nanoebm.compare import comparison_table, evaluate_model, training_text
from nanoebm.corpus import resolve_data_path, validation_text
from nanoebm.folders import check_model_folder, loading
from nanoebm.page import check_html_path, comparison_page, comparison_section, generation_page, log_page
from nanoebm.plots import make_folder, plot_comparison, write_plots

# ----------------------------------------------------------------------------------------------------------------
# Arguments


THINKING = model_options(("think_steps", "think_lr", "think_samples"))  # (help, research aliases) of each
ADAPTING = ("use_adaptation", "adapt_lr", "adapt_params", "adapt_rule", "adapt_decay", "adapt_window", "adapt_rank",
            "adapt_on_output")  # configuration_nanoebm.ADAPT_FIELDS, named here without importing torch
MODEL_FLAGS = {**THINKING, **model_options(ADAPTING)}


def model_option(name):
    """A flag for one of the model's thinking or learning options (configuration_nanoebm.OPTIONS), for this run only:
    unset, the model's own value holds."""
    text, aliases = MODEL_FLAGS[name]
    research = "".join(f" Research syntax also: {alias}=VALUE." for alias in aliases)
    return field(default=None, metadata={"help": f"{text[0].upper()}{text[1:]} (default: the model's own).{research}"})


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
    think_steps: int | None = model_option("think_steps")
    think_lr: float | None = model_option("think_lr")
    think_samples: int | None = model_option("think_samples")
    use_adaptation: bool | None = model_option("use_adaptation")
    adapt_lr: float | None = model_option("adapt_lr")
    adapt_params: str | None = model_option("adapt_params")
    adapt_rule: str | None = model_option("adapt_rule")
    adapt_decay: float | None = model_option("adapt_decay")
    adapt_window: int | None = model_option("adapt_window")
    adapt_rank: int | None = model_option("adapt_rank")
    adapt_on_output: bool | None = model_option("adapt_on_output")
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
    num_beams: int = field(
        default=1,
        metadata={"help": "Beam search over this many beams (>= 1; 1: none); with --do_sample, beam sampling. "
                          "Printed at the end (streaming cannot follow beams)."},
    )
    repetition_penalty: float = field(
        default=1.0,
        metadata={"help": "Divide the positive and multiply the negative scores of characters already in the text "
                          "by this (> 0; 1: off; above 1 discourages repeats)."},
    )
    no_repeat_ngram_size: int = field(
        default=0, metadata={"help": "Never produce the same run of this many characters twice (>= 0; 0: off)."}
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
                          "chose given its context (landscape ebt: the scalar energy of that character as the "
                          "candidate; the verifier's score, unnormalised). min_nll: lowest negative "
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
    dtype: str = field(
        default="auto",
        metadata={"help": "Precision of the weights (from_pretrained's dtype): auto (as saved), float32, bfloat16 "
                          "or float16."},
    )
    unk_token: str | None = unk_token_field()
    plot: str | None = field(
        default=None,
        metadata={"help": "Write PNG pictures into this folder: energy_trace.png (J across thinking steps per "
                          "position), thinking_at_position.png (distribution before/after thinking and the energy "
                          "bowl), kl_strip.png (KL(S2 || S1) per generated token), energy_descent.png (summary). "
                          "With --compare: compare.png."},
    )
    plot_position: int | None = field(
        default=None,
        metadata={"help": "Generated token (a character; 0-based, negative counts from the end) shown in "
                          "thinking_at_position.png (default: where thinking changed the distribution most)."},
    )
    output_json: str | None = field(
        default=None,
        metadata={"help": "Write the prompt, the text, the settings and, per generated token (a character), its "
                          "System 1 / System 2 probability, its energy and the energy gap J0 - JK (with --compare: "
                          "the comparison table)."},
    )
    html: str | None = field(
        default=None,
        metadata={"help": "Write one self-contained interactive page (HTML, no network) to this file: the text "
                          "coloured character by character by KL(S2 || S1), the energy gap, the System 1 / System 2 "
                          "probability or the gain from learning while reading; each character's candidates and "
                          "energy at every thinking step; a thinking-steps slider. The folder must exist. With "
                          "--compare: one section per model over the validation text."},
    )
    html_chars: int = field(
        default=2000,
        metadata={"help": "--html: the characters (from the first predicted one) whose details the page holds; the "
                          "rest of a longer text is shown plain (about 0.5 KB per character)."},
    )
    report_to: Literal["none", "wandb"] = field(
        default="none",
        metadata={"help": "wandb: log the --html page to Weights & Biases as wandb.Html, in a run of its own "
                          "(project $WANDB_PROJECT, else nanoebm; offline with WANDB_MODE=offline). Needs --html."},
    )
    compare: list[str] | None = field(
        default=None,
        metadata={"help": "Evaluate-and-compare mode: for each model folder report validation bits per character "
                          "of System 1 and System 2, the energy gap J0 - JK and decode tokens/s (System 1 and "
                          "System 2, greedy, --max_new_tokens characters), as a table and a bar chart. Every model "
                          "is scored on the one --data_path text; the table says what each trained on (from its "
                          "nanoebm_run.json) and a warning names those trained on another text."},
    )
    data_path: str | None = field(
        default=None,
        metadata={"help": "Corpus for --compare (its last 10%% is the validation text). Default: $NANOEBM_DATA, "
                          "else the embedded tiny Shakespeare."},
    )
    reading_chars: int = field(
        default=20000,
        metadata={"help": "--compare: read the first this many characters of the validation text in order, in "
                          "consecutive windows, with and without learning while reading (the model's adapt_* "
                          "settings, or the flags); 0 skips it."},
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
    **{alias: name for name, (_, aliases) in THINKING.items() for alias in aliases},
}


DTYPES = ("auto", "float32", "bfloat16", "float16")  # --dtype: what from_pretrained's dtype accepts by name
# flags a generate run's JSON leaves out
COMPARE_ONLY = ("compare", "data_path", "eval_blocks", "reading_chars", "output_dir")


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
  run_generate.py --model_name_or_path out --num_beams 4 --repetition_penalty 1.3 --no_repeat_ngram_size 4
  run_generate.py --model_name_or_path out --dtype bfloat16
  run_generate.py --model_name_or_path out --plot plots --output_json sample.json
  run_generate.py --model_name_or_path out --html page.html                 # one interactive page, opens from disk
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
    parser.error = raise_usage_error
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


def validate(args: GenerateArguments) -> None:
    """Every flag's range, and the combinations that cannot work, as one UsageError naming the flag; checked in this
    order, so that a command line with several mistakes is told about the first. Sets --do_sample where
    --num_candidates implies it."""
    check_mode(args)
    check_sampling(args)
    check_thinking(args)
    check_decoding(args)
    if args.dtype not in DTYPES:
        raise UsageError(f"--dtype must be one of {', '.join(DTYPES)} (got {args.dtype!r})")
    if args.num_candidates > 1 and not args.do_sample:
        note(f"--num_candidates {args.num_candidates} samples its candidates: --do_sample is implied")
        args.do_sample = True
    check_inputs(args)
    check_page(args)
    if not args.do_sample and (args.top_k is not None or args.temperature != 1.0 or args.top_p != 1.0):
        note("--top_k / --temperature / --top_p apply to sampling only: add --do_sample (decoding is greedy)")


def check_mode(args: GenerateArguments) -> None:
    """One model to generate from, or the models to compare; some characters to generate."""
    if not args.compare and not args.model_name_or_path:
        raise UsageError("give a model: --model_name_or_path DIR (or checkpoint=DIR), or --compare DIR_A DIR_B ...")
    if args.compare and args.model_name_or_path:
        raise UsageError("--compare takes the model folders itself: drop --model_name_or_path")
    if args.max_new_tokens <= 0:
        raise UsageError(f"--max_new_tokens must be >= 1 (got {args.max_new_tokens})")


def check_sampling(args: GenerateArguments) -> None:
    """Finite numbers (NaN and inf parse as floats), then the sampling ranges."""
    for name in ("temperature", "top_p", "think_lr", "repetition_penalty"):
        value = getattr(args, name)
        if value is not None and not math.isfinite(value):
            raise UsageError(f"--{name} must be a finite number (got {value})")
    if not (0.0 < args.top_p <= 1.0):
        raise UsageError(f"--top_p must be in (0, 1] (got {args.top_p}); 1 disables nucleus sampling")
    if not args.temperature > 0:
        raise UsageError(f"--temperature must be > 0 (got {args.temperature}); for greedy decoding drop --do_sample")
    if args.top_k is not None and args.top_k < 0:
        raise UsageError(f"--top_k must be >= 0 (got {args.top_k}); 0 means no restriction")


def check_thinking(args: GenerateArguments) -> None:
    """The thinking overrides, where given (None: the model's own)."""
    if args.think_steps is not None and args.think_steps < 0:
        raise UsageError(f"--think_steps must be >= 0 (got {args.think_steps})")
    if args.think_lr is not None and not args.think_lr > 0:
        raise UsageError(f"--think_lr must be > 0 (got {args.think_lr})")
    if args.think_samples is not None and args.think_samples < 1:
        raise UsageError(f"--think_samples must be >= 1 (got {args.think_samples})")


def check_decoding(args: GenerateArguments) -> None:
    """Sequences, candidates and beams: each at least one, and only the combinations generate can serve."""
    if args.num_return_sequences < 1 or args.num_candidates < 1:
        raise UsageError("--num_return_sequences and --num_candidates must be >= 1")
    if args.num_return_sequences > 1 and args.num_candidates > 1:
        raise UsageError("use either --num_return_sequences (print every sample) or --num_candidates (keep the best)")
    if args.num_beams < 1:
        raise UsageError(f"--num_beams must be >= 1 (got {args.num_beams}); 1 means no beam search")
    if args.num_beams > 1 and args.num_return_sequences > args.num_beams:
        raise UsageError(f"--num_return_sequences {args.num_return_sequences} is more than --num_beams "
                         f"{args.num_beams}: beam search returns at most one sequence per beam")
    if args.num_return_sequences > 1 and not args.do_sample and args.num_beams == 1:
        raise UsageError("--num_return_sequences > 1 needs --do_sample or --num_beams (greedy decoding returns the "
                         "same text every time)")
    if args.num_beams > 1 and args.num_candidates > 1:
        raise UsageError("use either --num_beams (beam search) or --num_candidates (sample, keep the lowest energy)")
    if not args.repetition_penalty > 0:
        raise UsageError(f"--repetition_penalty must be > 0 (got {args.repetition_penalty}); 1 means no penalty")
    if args.no_repeat_ngram_size < 0:
        raise UsageError(f"--no_repeat_ngram_size must be >= 0 (got {args.no_repeat_ngram_size}); 0 means off")


def check_inputs(args: GenerateArguments) -> None:
    """The prompt, the seed, the picture's position and the comparison's blocks."""
    if args.prompt is not None and args.prompt_file is not None:
        raise UsageError("give either --prompt or --prompt_file, not both")
    check_unk_token(args.unk_token)
    if not 0 <= args.seed < 2 ** 32:
        raise UsageError(f"--seed must be in [0, 2**32) (got {args.seed})")
    if args.plot_position is not None and not -args.max_new_tokens <= args.plot_position < args.max_new_tokens:
        raise UsageError(f"--plot_position {args.plot_position} is outside the {args.max_new_tokens} generated "
                         f"characters: give -{args.max_new_tokens} to {args.max_new_tokens - 1}")
    if args.eval_blocks < 1:
        raise UsageError(f"--eval_blocks must be >= 1 (got {args.eval_blocks})")
    if args.reading_chars < 0:
        raise UsageError(f"--reading_chars must be >= 0 (got {args.reading_chars}); 0 skips reading")


def check_page(args: GenerateArguments) -> None:
    """--html's file (its folder must exist and take it: a refused run writes nothing), its size and its logger."""
    if args.html_chars < 1:
        raise UsageError(f"--html_chars must be >= 1 (got {args.html_chars})")
    if args.html is not None:
        check_html_path(args.html)
    if args.report_to == "wandb" and args.html is None:
        raise UsageError("--report_to wandb logs the page: give --html FILE too")
    if args.html is None and args.html_chars != GenerateArguments.html_chars:
        note("--html_chars sets the page's details: add --html FILE (no page is written)")


# ----------------------------------------------------------------------------------------------------------------
# Loading


def resolve_device(name: str):
    import torch

    mps = getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "mps" if mps else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: no CUDA device is available here; use --device cpu (or auto)")
    if name == "mps" and not mps:
        raise UsageError("--device mps: Apple's MPS backend is not available here; use --device cpu (or auto)")
    return torch.device(name)


def load_model(path: str, device, unk_token: str | None = None, dtype: str = "auto"):
    """(model, tokenizer) from a saved folder, through the Auto classes (the folder's own code), weights in `dtype`;
    UsageError with the reason otherwise (nanoebm/folders.py)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, _, weights = check_model_folder(path)
    with loading(folder):
        tokenizer = AutoTokenizer.from_pretrained(
            folder, trust_remote_code=True, **({"unk_token": unk_token} if unk_token is not None else {})
        )
    with loading(folder, weights):
        model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True, dtype=dtype)
    if tokenizer.vocab_size > model.config.vocab_size:  # characters only: the pad id lies outside the vocabulary
        raise UsageError(f"{str(path)!r}: the tokenizer has {tokenizer.vocab_size} characters but the model only "
                         f"{model.config.vocab_size} ids")
    return model.to(device).eval(), tokenizer


def check_learning(args: GenerateArguments, model, label: str) -> None:
    """The learning-while-reading flags given, against the loaded model (the window is bounded by its block_size)."""
    given = {name: getattr(args, name) for name in ADAPTING if getattr(args, name) is not None}
    if not given:
        return
    if not hasattr(model.config, "adapt_lr"):
        raise UsageError(f"{label}: its model code predates learning while reading (--{next(iter(given))}): continue "
                         f"it with this nanoebm's run_train.py, or drop the --adapt flags")
    from configuration_nanoebm import adaptation_problem

    values = {name: getattr(model.config, name) for name in ADAPTING}
    values.update(given)
    problem = adaptation_problem(values, model.config.block_size)
    if problem is not None:
        raise UsageError(f"--{problem[0]} {values[problem[0]]!r} is invalid: {problem[1]}")


def read_prompt(args: GenerateArguments) -> str:
    if args.prompt_file is not None:
        if args.prompt_file == "-":
            return sys.stdin.read()
        try:
            return Path(args.prompt_file).expanduser().read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as error:
            raise UsageError(f"cannot read --prompt_file {args.prompt_file!r}: {error}") from error
    return args.prompt or ""


# ----------------------------------------------------------------------------------------------------------------
# Generate mode


def generation_kwargs(args: GenerateArguments, thinking: dict, n: int, model, tokenizer) -> dict:
    """generate's arguments. Neither the tokenizer's pad id nor an id it lacks is ever generated: a model sized
    len(tokenizer) has the pad among its outputs, one resized past the tokenizer has ids no token decodes to."""
    kwargs = dict(max_new_tokens=args.max_new_tokens, do_sample=args.do_sample, num_return_sequences=n,
                  use_thinking=thinking["use_thinking"], num_beams=args.num_beams,
                  repetition_penalty=args.repetition_penalty, no_repeat_ngram_size=args.no_repeat_ngram_size)
    never = {tokenizer.pad_token_id, *range(len(tokenizer), model.config.vocab_size)}
    never = sorted(i for i in never if i is not None and i < model.config.vocab_size)
    if never:
        kwargs["suppress_tokens"] = never
    overrides = {name: getattr(args, name) for name in ("think_steps", "think_lr", "think_samples", *ADAPTING)}
    kwargs.update({name: value for name, value in overrides.items() if value is not None})  # None: the model's own
    if args.do_sample:  # transformers would otherwise apply its default top_k=50
        kwargs.update(top_k=args.top_k or 0, temperature=args.temperature, top_p=args.top_p)
    return kwargs


@dataclass
class Generated:
    """What one generate call made, as the printing, the summary, the pictures and the JSON read it."""

    prompt: str
    sequences: object  # (n, P + new) ids on the CPU: the prompt, then each continuation
    P: int  # the prompt's length in tokens
    texts: list[str]  # each continuation, decoded
    tokens: list[list[str]]  # each continuation's tokens (token_strings): what the pictures and the JSON index
    seconds: float
    tokens_per_s: float
    stats: list[dict] | None = None  # position_stats per continuation, where scored
    chosen: int = 0  # the continuation printed in full and summarised
    candidates: list[dict] | None = None  # with --num_candidates: every candidate's scores


def run_generate(args: GenerateArguments, command: str) -> int:
    """Generate mode: continue the prompt, score the text where a choice, a picture or the JSON needs it, print it
    with a summary line on stderr, and write the pictures, the JSON and the page asked for (`command` is the command
    line, which the page shows)."""
    device = resolve_device(args.device)
    model, tokenizer = load_model(args.model_name_or_path, device, args.unk_token, args.dtype)
    check_learning(args, model, repr(args.model_name_or_path))
    prompt = read_prompt(args)
    if prompt == "":
        note("empty prompt: starting from a newline '\\n'")
        prompt = "\n"
    prompt_ids = encode(tokenizer, prompt)
    thinking = resolved_thinking(model, args)
    n = max(args.num_return_sequences, args.num_candidates)
    stream = args.stream and n == 1 and args.num_beams == 1
    note(run_description(args, thinking, n, device))
    gen = generate(model, tokenizer, prompt, prompt_ids, stream, args.seed,
                   generation_kwargs(args, thinking, n, model, tokenizer))
    scores = None
    if args.num_candidates > 1 or args.plot or args.output_json:
        scores = score_continuations(model, gen.sequences.to(device), gen.P, args.think_steps, args.think_lr)
        gen.stats = [position_stats(scores, r) for r in range(n)]
    if args.num_candidates > 1:
        gen.chosen, gen.candidates = choose_candidate(gen, args.select, thinking["use_thinking"])
    print_texts(gen, stream)
    note(summary_line(gen, args.max_new_tokens))
    if args.plot:
        write_plots(model, gen.sequences[gen.chosen:gen.chosen + 1].to(device), gen.P, gen.tokens[gen.chosen],
                    scores, gen.chosen, tokenizer, args, Path(args.plot))
    if args.output_json:
        write_json(generation_record(gen, args, thinking, model, device), Path(args.output_json))
    if args.html:
        page = generation_page(model, tokenizer, gen.sequences[gen.chosen], gen.P, thinking, args, command)
        if args.report_to == "wandb":
            log_page(page, command)
    return 0


def run_description(args: GenerateArguments, thinking: dict, n: int, device) -> str:
    """The line that says, before generating, which model decodes how, how much, where."""
    mode = (f"System 2 ({thinking['think_steps']} thinking steps, alpha={thinking['think_lr']:.4g})"
            if thinking["use_thinking"] and thinking["think_steps"] > 0 else "System 1 (no thinking)")
    if thinking["use_adaptation"]:
        mode += (f", learning while reading (adapt_lr={thinking['adapt_lr']:.4g}, a window of "
                 f"{thinking['adapt_window']} characters{', from its own output too' if args.adapt_on_output else ''})")
    decoding = (f"sampling (T={args.temperature}, top_k={args.top_k or 'off'}, top_p={args.top_p}, seed={args.seed})"
                if args.do_sample else "greedy")
    if args.num_beams > 1:
        decoding = f"beam search ({args.num_beams} beams), {decoding}"
    if args.repetition_penalty != 1.0 or args.no_repeat_ngram_size:
        decoding += (f", repetition_penalty={args.repetition_penalty}, "
                     f"no_repeat_ngram_size={args.no_repeat_ngram_size or 'off'}")
    return (f"{Path(args.model_name_or_path).name}: {mode}, {decoding}, {args.max_new_tokens} characters"
            + (f" x {n}" if n > 1 else "") + f" on {device}" + (f" in {args.dtype}" if args.dtype != "auto" else ""))


def generate(model, tokenizer, prompt: str, prompt_ids: list[int], stream: bool, seed: int, kwargs: dict) -> Generated:
    """model.generate from the seed (printing the text as it comes when `stream`), timed, decoded."""
    import torch
    from transformers import TextStreamer, set_seed

    set_seed(seed)
    input_ids = torch.tensor([prompt_ids], device=model.device)
    streamer = TextStreamer(tokenizer) if stream else None
    started = time.perf_counter()
    with torch.no_grad():
        sequences = model.generate(input_ids, attention_mask=torch.ones_like(input_ids), streamer=streamer, **kwargs)
    elapsed = time.perf_counter() - started
    sequences, P = sequences.cpu(), len(prompt_ids)
    texts = [tokenizer.decode(row[P:].tolist()) for row in sequences]
    tokens = [token_strings(tokenizer, row[P:].tolist()) for row in sequences]
    tokens_per_s = len(sequences) * kwargs["max_new_tokens"] / max(elapsed, 1e-9)
    return Generated(prompt, sequences, P, texts, tokens, elapsed, tokens_per_s)


def choose_candidate(gen: Generated, select: str, use_thinking: bool) -> tuple[int, list[dict]]:
    """--num_candidates: the candidate `select` prefers, and every candidate's scores (listed on stderr)."""
    nll_key = "nll2" if use_thinking else "nll1"  # the distribution the candidates were sampled from
    candidates = [dict(index=i, total_energy=float(s["energy"].sum()), mean_energy=float(s["energy"].mean()),
                       nll=float(s[nll_key].sum()), bits_per_char=float(s[nll_key].mean()) / math.log(2),
                       text=gen.texts[i]) for i, s in enumerate(gen.stats)]
    key = "total_energy" if select == "min_energy" else "nll"
    chosen = min(range(len(candidates)), key=lambda i: candidates[i][key])
    note(f"{len(candidates)} candidates, selected by {select} "
         f"({'sum of the energies of the chosen characters' if key == 'total_energy' else 'sum of -log p'}):")
    for c in candidates:
        preview = c["text"][:48].replace("\n", "↵")
        note(f"  {'*' if c['index'] == chosen else ' '} #{c['index']}: energy {c['total_energy']:10.3f} "
             f"({c['mean_energy']:+.4f}/char)  nll {c['bits_per_char']:.3f} bits/char  {preview!r}")
    return chosen, candidates


def print_texts(gen: Generated, stream: bool) -> None:
    """stdout: the chosen candidate, or every sample under a header, or the one text unless it was streamed."""
    n = len(gen.texts)
    if gen.candidates is not None:
        print(gen.prompt + gen.texts[gen.chosen], flush=True)
    elif n > 1:
        for i, text in enumerate(gen.texts):
            print(f"----- sample {i + 1}/{n} -----\n{gen.prompt}{text}", flush=True)
    elif not stream:
        print(gen.prompt + gen.texts[0], flush=True)


def summary_line(gen: Generated, max_new_tokens: int) -> str:
    """Speed, and where the text was scored, the chosen text's bits per character, KL and energy gap."""
    summary = (f"{len(gen.texts) * max_new_tokens} characters in {gen.seconds:.2f} s "
               f"({gen.tokens_per_s:.1f} tokens/s)")
    if gen.stats is not None:
        s = gen.stats[gen.chosen]
        summary += (f"; chosen text: System 1 {float(s['nll1'].mean()) / math.log(2):.3f} / System 2 "
                    f"{float(s['nll2'].mean()) / math.log(2):.3f} bits/char, "
                    f"mean KL(S2||S1) {float(s['kl'].mean()):.4g}")
        if s["gap"] is not None:
            summary += f", mean energy gap J0-JK {float(s['gap'].mean()):.4g}"
    return summary


def generation_record(gen: Generated, args: GenerateArguments, thinking: dict, model, device) -> dict:
    """--output_json: the prompt, the chosen text with its per-token numbers, the settings in force, and (several
    continuations) every candidate or sample."""
    generate_only = {k: v for k, v in asdict(args).items() if k not in COMPARE_ONLY}
    settings = {**generate_only, **thinking, "device": str(device), "landscape": model.config.landscape,
                "block_size": model.config.block_size, "top_k": args.top_k or 0}
    samples = [dict(text=text, tokens=token_records(gen.sequences[i, gen.P:].tolist(), gen.tokens[i], gen.stats[i]))
               for i, text in enumerate(gen.texts)]
    record = dict(prompt=gen.prompt, text=gen.texts[gen.chosen], model=str(args.model_name_or_path),
                  settings=settings, tokens=samples[gen.chosen]["tokens"],
                  summary=summary_record(gen.stats[gen.chosen], gen.seconds, gen.tokens_per_s), selected=gen.chosen)
    if gen.candidates is not None:
        record["candidates"] = gen.candidates
    if len(samples) > 1:
        record["samples"] = samples
    return record


def token_records(ids: list[int], tokens: list[str], s: dict) -> list[dict]:
    """One record per generated token: its id, its text ("char": a character, or a longer token) and its numbers."""
    gap = s["gap"].tolist() if s["gap"] is not None else [None] * len(tokens)
    return [dict(id=i, char=c, p_system1=float(p1), p_system2=float(p2), energy=float(e), energy_gap=g, kl=float(k))
            for i, c, p1, p2, e, g, k in zip(ids, tokens, s["p1"].tolist(), s["p2"].tolist(), s["energy"].tolist(),
                                             gap, s["kl"].tolist(), strict=True)]


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


# ----------------------------------------------------------------------------------------------------------------
# Compare mode


def run_compare(args: GenerateArguments, command: str) -> int:
    """Compare mode: score every model on the one validation text, print the table, draw and write it (and the
    page, with one section per model)."""
    device = resolve_device(args.device)
    try:
        corpus = resolve_data_path(args.data_path)
    except FileNotFoundError as error:
        raise UsageError(str(error)) from error
    val = validation_text(corpus.read_text(encoding="utf-8"))
    prompt = read_prompt(args) or "\n"  # read once: a --prompt_file - (stdin) serves every model
    names = [Path(p).name or str(p) for p in args.compare]
    labels = [n if names.count(n) == 1 else str(p) for n, p in zip(names, args.compare, strict=True)]
    note(f"validation: last 10% of {corpus} ({len(val)} characters), {args.eval_blocks} blocks per model; decode "
         f"speed over {args.max_new_tokens} characters, greedy, on {device}")
    rows, sections = [], []
    for path, label in zip(args.compare, labels, strict=True):
        model, tokenizer = load_model(path, device, args.unk_token, args.dtype)
        check_learning(args, model, repr(str(path)))
        row = evaluate_model(model, tokenizer, val, prompt, args, device, label)
        row.update(path=str(path), **training_text(path, corpus))
        rows.append(row)
        if args.html:
            sections.append(comparison_section(model, tokenizer, val, args, row))
        note(f"{label}: System 1 {row['bpc_system1']:.4f}, System 2 {row['bpc_system2']:.4f} bits/char")
    warn_other_texts(rows, corpus)
    print(comparison_table(rows), flush=True)
    if args.plot or args.output_dir:
        note(f"wrote {plot_comparison(rows, make_folder(Path(args.plot or args.output_dir)) / 'compare.png')}")
    else:
        note("no bar chart: give --plot DIR or --output_dir DIR")
    if args.output_json or args.output_dir:
        write_json(dict(data=str(corpus), eval_blocks=args.eval_blocks, max_new_tokens=args.max_new_tokens,
                        device=str(device), models=rows),
                   Path(args.output_json) if args.output_json else Path(args.output_dir) / "compare.json")
    if args.html:
        page = comparison_page(sections, val, args, command)
        if args.report_to == "wandb":
            log_page(page, command)
    return 0


def warn_other_texts(rows: list[dict], corpus: Path) -> None:
    """A warning for each model trained on another text than the one scored (or on one its record cannot name)."""
    for row in rows:
        if row["on_this_text"] is not True:
            why = "not on this text" if row["on_this_text"] is False else "which its record cannot tie to this text"
            note(f"warning: {row['model']} trained on {row['trained_on']}, {why}: its bits/char measure how it does "
                 f"on {corpus.name}, not on the text it learned")


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
        command = shlex.join([PROG, *argv])
        return run_compare(args, command) if args.compare else run_generate(args, command)
    except UsageError as error:
        return report(PROG, error, 2)
    except SystemExit as done:  # argparse: --help (0) or a malformed command line (2, usage already printed)
        return done.code if isinstance(done.code, int) else (0 if done.code is None else 2)
    except FloatingPointError as error:  # ThinkingDivergedError
        return report(PROG, error, 1)
    except KeyboardInterrupt:
        print(f"\n{PROG}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
