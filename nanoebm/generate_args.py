"""run_generate.py's arguments checked and read: every flag's range and the combinations that cannot work
(`validate`, before anything is loaded), the learning-while-reading flags against the loaded model (`check_learning`),
and the prompt (`read_prompt`). Each mistake is one UsageError naming the flag. No torch is imported here.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

from nanoebm.analysis import ADAPTING, note
from nanoebm.cli import UsageError, check_unk_token
from nanoebm.page import HTML_CHARS, check_html_path

DTYPES = ("auto", "float32", "bfloat16", "float16")  # --dtype: what from_pretrained's dtype accepts by name


def validate(args) -> None:
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


def check_mode(args) -> None:
    """One model to generate from, or the models to compare; some characters to generate."""
    if not args.compare and not args.model_name_or_path:
        raise UsageError("give a model: --model_name_or_path DIR (or checkpoint=DIR), or --compare DIR_A DIR_B ...")
    if args.compare and args.model_name_or_path:
        raise UsageError("--compare takes the model folders itself: drop --model_name_or_path")
    if args.max_new_tokens <= 0:
        raise UsageError(f"--max_new_tokens must be >= 1 (got {args.max_new_tokens})")


def check_sampling(args) -> None:
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


def check_thinking(args) -> None:
    """The thinking overrides, where given (None: the model's own)."""
    if args.think_steps is not None and args.think_steps < 0:
        raise UsageError(f"--think_steps must be >= 0 (got {args.think_steps})")
    if args.think_lr is not None and not args.think_lr > 0:
        raise UsageError(f"--think_lr must be > 0 (got {args.think_lr})")
    if args.think_samples is not None and args.think_samples < 1:
        raise UsageError(f"--think_samples must be >= 1 (got {args.think_samples})")


def check_decoding(args) -> None:
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


def check_inputs(args) -> None:
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


def check_learning(args, model, label: str) -> None:
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


def read_prompt(args) -> str:
    if args.prompt_file is not None:
        if args.prompt_file == "-":
            return sys.stdin.read()
        try:
            return Path(args.prompt_file).expanduser().read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as error:
            raise UsageError(f"cannot read --prompt_file {args.prompt_file!r}: {error}") from error
    return args.prompt or ""


def check_page(args) -> None:
    """--html's file (its folder must exist and take it: a refused run writes nothing), its size and its logger."""
    if args.html_chars < 1:
        raise UsageError(f"--html_chars must be >= 1 (got {args.html_chars})")
    if args.html is not None:
        check_html_path(args.html)
    if args.report_to == "wandb" and args.html is None:
        raise UsageError("--report_to wandb logs the page: give --html FILE too")
    if args.html is None and args.html_chars != HTML_CHARS:
        note("--html_chars sets the page's details: add --html FILE (no page is written)")
