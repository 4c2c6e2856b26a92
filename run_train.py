#!/usr/bin/env python
"""Train nanoebm on a character stream with the HF Trainer; `accelerate launch run_train.py` runs it distributed.

    python run_train.py                                    # the embedded tiny Shakespeare; the machine's preset
    accelerate launch run_train.py --contrastive_type pcd  # with PCD (the research defaults on a GPU machine)

The research code's syntax is accepted as well: `run_train.py model.use_contrastive=true train.max_steps=100`.
Losses (docs/DESIGN.md): CE of the refined logits (mean over thinking steps, or the last with --truncate_refine),
mixed with the System 1 CE by --aux_ce_weight, plus --contrastive_weight times a contrastive divergence term whose
negatives come from Langevin chains on the logits (cd | pcd | fast_pcd; on by default, `--use_contrastive false`
turns it off). A finished run writes a complete model folder; it never overwrites another run's results.
"""

import argparse
import sys
import time
from dataclasses import fields
from pathlib import Path

from configuration_nanoebm import OPTIONS
from nanoebm.arguments import (NANOEBM_ARGUMENTS, RESEARCH_KEYS, DataArguments, LossArguments, ModelArguments,
                               ParsedArguments, RunArguments, StartArguments, check_detach_system1, check_loggers,
                               check_training_numbers)
from nanoebm.card import describe_run, opening_text, read_record, suggested_prompt, summary, write_results
from nanoebm.cli import UsageError, given_values, raise_usage_error, report, translate_research_syntax
from nanoebm.folders import CHECKPOINTS, check_output_dir, finish_folder, keep_logs, startup_guard, writing_dir
from nanoebm.settings import (PRESETS, TRAINING_DEFAULTS, build_arguments, check_resume_flags, choose_preset,
                              layers_for, marked_assumed, merge, run_settings, settle_training, starting_layer)

# run_train's public surface: the argument dataclasses live in nanoebm/arguments.py
__all__ = ["DataArguments", "LossArguments", "ModelArguments", "ParsedArguments", "RunArguments", "StartArguments",
           "cli", "main", "parse_args"]

PROG = "run_train.py"
# the standard TrainingArguments flags --help shows (every other one works too: --help_training lists them)
SHOWN_TRAINING_FLAGS = {
    "output_dir": "the model folder a finished run writes (checkpoints go to its checkpoints/ subfolder)",
    "max_steps": "optimizer steps", "learning_rate": "peak AdamW learning rate (cosine decay to a tenth)",
    "per_device_train_batch_size": "blocks per process per step", "gradient_accumulation_steps": "default: 1",
    "warmup_steps": "linear warm-up steps", "logging_steps": "log every N steps", "eval_steps": "evaluate every N",
    "save_steps": "checkpoint every N steps", "seed": "default: 42 (initialisation and data order)",
    "resume_from_checkpoint": "a checkpoint folder (or 'last'): resumes that run exactly, with its own flags (a flag "
                              "that would change what it computes is refused: --model_name_or_path CHECKPOINT "
                              "continues it as a new run instead)",
    "bf16": "autocast the backbone to bfloat16 (thinking stays float32)", "torch_compile": "compile the model",
    "use_cpu": "train on the CPU even if a GPU is present (picks the cpu preset)",
    "report_to": "wandb, tensorboard, ... (or --wandb_project)", "run_name": "the run's name in the logger",
}

# ----------------------------------------------------------------------------------------------------------------
# --help: nanoebm's options first, with their real defaults, without building TrainingArguments' parser


def default_text(name, value):
    model_defaults = {option.name: option.default for option in OPTIONS}
    if name in PRESETS["gpu"]:
        return f"gpu preset {PRESETS['gpu'][name]}, cpu preset {PRESETS['cpu'][name]}"
    if name in model_defaults:
        shown = model_defaults[name]
        if shown is None:
            return "n_embd" if name == "d_energy" else None
        return repr(shown)
    if name in TRAINING_DEFAULTS:
        return repr(TRAINING_DEFAULTS[name])
    return None if value is None else repr(value)


def help_text() -> str:
    parser = argparse.ArgumentParser(
        prog=PROG, add_help=False,
        formatter_class=lambda prog: argparse.RawDescriptionHelpFormatter(prog, max_help_position=32, width=118),
        usage=f"{PROG} [--preset gpu|cpu] [options]   (or: accelerate launch {PROG} ...)",
        description=__doc__.split("\n\n", 1)[1],
        epilog="Every other transformers TrainingArguments flag works as well (--bf16, --gradient_accumulation_steps, "
               f"--fsdp, ...): `python {PROG} --help_training` lists them.\nResearch syntax: key=value words "
               "(model.think_steps=4 train.max_steps=100 data.batch_size=64) map onto the flags.\nSettings merge in "
               "this order, each over the ones before: defaults < --preset < --recipe < the folder continued or the "
               "run resumed < the command line; nanoebm_run.json records each value and where it came from.\nExit "
               "status: 0 done, 2 bad input (one message, no traceback), 1 training diverged (NaN loss: the message "
               "names the knobs).",
    )
    titles = {StartArguments: "start", ModelArguments: "model (a new model; continuing or resuming keeps the saved "
                                                       "architecture)",
              DataArguments: "data", LossArguments: "losses", RunArguments: "results"}
    for cls in NANOEBM_ARGUMENTS:
        group = parser.add_argument_group(titles[cls])
        for f in fields(cls):
            shown = default_text(f.name, f.default)
            tail = f" (default: {shown})" if shown is not None else ""
            group.add_argument(f"--{f.name}", metavar="", help=f.metadata.get("help", "") + tail)
    group = parser.add_argument_group("standard training options nanoebm sets (TrainingArguments)")
    for name, text in SHOWN_TRAINING_FLAGS.items():
        shown = default_text(name, None)
        group.add_argument(f"--{name}", metavar="", help=text + (f" (default: {shown})" if shown else ""))
    return parser.format_help()

# ----------------------------------------------------------------------------------------------------------------
# Parsing: the command line is read once, into the values it gives; nanoebm/settings.py merges them over the
# defaults, the preset, the recipe and what a continued or resumed run brings


def new_parser():
    from transformers import HfArgumentParser, TrainingArguments

    parser = HfArgumentParser((*NANOEBM_ARGUMENTS, TrainingArguments), prog=PROG, allow_abbrev=False)
    parser.error = raise_usage_error  # a bad value is one message, not the whole usage
    return parser


def parse_args(argv=None) -> ParsedArguments:
    """The run's arguments: the command line's values merged over the other layers (nanoebm/settings.py), built
    into the argument dataclasses and TrainingArguments, and checked together."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = new_parser()
    argv = translate_research_syntax(argv, parser, renames=RESEARCH_KEYS, sections=("model", "data", "train"))
    given = given_values(parser, argv)
    checkpoint, source = starting_layer(given, parser)
    preset, reason = choose_preset(given, source)
    settings = marked_assumed(merge(layers_for(given, preset, source)), source)
    parsed = build_arguments(settings)
    if checkpoint is not None and read_record(checkpoint) is not None:
        check_resume_flags(preset, source, settings)
    training_args = parsed[-1]
    check_loggers(training_args.report_to)
    check_training_numbers(training_args)
    check_detach_system1(parsed[3], settings)
    settle_training(training_args, parsed[4], checkpoint)
    return ParsedArguments(*parsed, argv=argv, preset=preset, preset_reason=reason, settings=settings,
                           resume_from=checkpoint)


# ----------------------------------------------------------------------------------------------------------------
# main: parse and resolve the settings, build the data and the model, train, save, summarise


def always_thinks(config, loss_args):
    """True when every step runs the descent, so every parameter (alpha and the correction too) gets a gradient."""
    lowest = loss_args.think_steps_range[0] if loss_args.think_steps_range else config.think_steps
    return config.use_thinking and lowest > 0 and loss_args.warmup_steps_no_refine == 0


def describe_start(args: ParsedArguments, model, tokenizer) -> str:
    """The line a run starts with: its preset and why, the model's size and the batch per step."""
    T = args.training
    return (f"nanoebm: preset {args.preset} ({args.preset_reason}); {model.num_parameters() / 1e6:.2f}M parameters, "
            f"vocabulary {tokenizer.vocab_size}, landscape {model.config.landscape}, block {model.config.block_size}; "
            f"{T.world_size} process(es) x batch {T.per_device_train_batch_size} x accumulation "
            f"{T.gradient_accumulation_steps} = "
            f"{T.world_size * T.per_device_train_batch_size * T.gradient_accumulation_steps} blocks per step")


def main(argv=None, callbacks=None):
    """Train and evaluate as the command line says (`argv`; `callbacks`: more Trainer callbacks); the metrics."""
    # the arguments: the command line over the defaults, the preset, the recipe, a continued or resumed run
    args = parse_args(list(sys.argv[1:] if argv is None else argv))
    from transformers import default_data_collator, set_seed
    from transformers.utils import logging

    from nanoebm import data
    from nanoebm.continuing import build_model, saved_tokenizer
    from nanoebm.trainer import EBMTrainer

    logging.set_verbosity_warning()
    T, data_args, model_args = args.training, args.data, args.model
    final_dir = work_dir = Path(T.output_dir)
    if T.do_train:  # before anything is read: a folder holding another run's results stops the run
        check_output_dir(final_dir, args)
    # the data and the model
    tokenizer = saved_tokenizer(args)
    set_seed(T.seed)
    with T.main_process_first(desc="reading the corpus"):
        train_data, eval_blocks, tokenizer = data.build_data(data_args, tokenizer, model_args.block_size, T.seed)
        reading = data.reading_ids(data_args, tokenizer, model_args.block_size) if T.do_eval else None
    model = build_model(args.start.model_name_or_path, model_args, tokenizer, resuming=args.resume_from is not None)
    if T.ddp_find_unused_parameters is None:  # an extra autograd traversal per step, only where a parameter can idle
        T.ddp_find_unused_parameters = not always_thinks(model.config, args.loss)
    # the run record, and the folder the run writes (beside --output_dir when it replaces a finished model)
    record = describe_run(args, model, T, run_settings(args, model.config)) if T.do_train else None
    if T.do_train:
        with T.main_process_first(desc="preparing --output_dir"):
            work_dir = writing_dir(final_dir, args)
        T.output_dir = str(work_dir / CHECKPOINTS)
    # train and evaluate
    guard = startup_guard(final_dir, work_dir)
    with guard:
        trainer = EBMTrainer(
            model=model, args=T, train_dataset=train_data if T.do_train else None, eval_dataset=eval_blocks,
            processing_class=tokenizer, data_collator=default_data_collator, callbacks=[*(callbacks or []), guard],
            ebm_args=args.loss, run_record=record, reading_ids=reading,
        )
        keep_logs(trainer, final_dir)
        if T.should_log:
            print(describe_start(args, model, tokenizer), flush=True)
        metrics, started = {}, time.perf_counter()
        if T.do_train:
            metrics.update(trainer.train(resume_from_checkpoint=T.resume_from_checkpoint).metrics)
    if T.do_eval:
        metrics.update(trainer.evaluate())
    # save and summarise: only a finished run writes the model folder; a crash leaves checkpoints, never half a model
    if T.do_train:
        trainer.save_model(str(work_dir))
        if trainer.is_world_process_zero():
            prompt = suggested_prompt(opening_text(train_data, eval_blocks, tokenizer))
            seconds = time.perf_counter() - started
            write_results(trainer, work_dir, final_dir, record, metrics, prompt)
            kept = finish_folder(work_dir, final_dir, args.run.keep_checkpoints)
            print(summary(final_dir, record["runs"], metrics, trainer.model.config, seconds, kept, prompt), flush=True)
    trainer.close_distributed()
    return metrics


def cli(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "-h" in argv or "--help" in argv:
        print(help_text())
        return 0
    if "--help_training" in argv:
        from transformers import HfArgumentParser, TrainingArguments

        HfArgumentParser(TrainingArguments, prog=PROG).print_help()
        return 0
    try:
        main(argv)
    except (UsageError, FileNotFoundError, ValueError) as error:
        return report(PROG, error, 2)
    except FloatingPointError as error:  # a NaN loss: the message names the knobs to lower
        return report(PROG, error, 1)
    except Exception as error:  # safetensors' own error: a damaged checkpoint being resumed
        if type(error).__name__ != "SafetensorError":
            raise
        return report(PROG, f"a weights file is damaged ({error}): resume from another checkpoint or retrain", 2)
    except KeyboardInterrupt:
        print(f"\n{PROG}: interrupted (checkpoints, if any, are in <output_dir>/{CHECKPOINTS}/, or in "
              f"<output_dir>.replacing/{CHECKPOINTS}/ for a run that was to replace a finished one)", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(cli())
