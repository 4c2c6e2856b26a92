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
import os
import shlex
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

# The argument checks live in nanoebm.generate_args, generate mode's steps in nanoebm.generating, compare mode in
# nanoebm.compare, the pictures in nanoebm.plots, what they share (the teacher-forced scores, the thinking settings,
# `note`) in nanoebm.analysis; none of them imports this file, and none imports torch, transformers or matplotlib
# before a function needs it (--help stays fast).
from nanoebm.analysis import PROG, encode, note, position_stats, resolved_thinking, score_continuations
from nanoebm.cli import (UsageError, model_options, raise_usage_error, reject_unknown, report,
                         translate_research_syntax, unk_token_field)
from nanoebm.compare import run_compare
from nanoebm.generate_args import ADAPTING, check_learning, read_prompt, validate
from nanoebm.generating import (choose_candidate, generate, generation_record, load_model, print_texts, resolve_device,
                                summary_line, write_json)
from nanoebm.page import HTML_CHARS, generation_page, log_page
from nanoebm.plots import write_plots

# ----------------------------------------------------------------------------------------------------------------
# Arguments


THINKING = model_options(("think_steps", "think_lr", "think_samples"))  # (help, research aliases) of each
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
        default=HTML_CHARS,
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


# ----------------------------------------------------------------------------------------------------------------
# Generate mode (its steps: nanoebm/generating.py)


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


# ----------------------------------------------------------------------------------------------------------------
# Compare mode: nanoebm/compare.py (run_compare)


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
