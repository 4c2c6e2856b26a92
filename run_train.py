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
import math
import os
import shutil
import sys
import time
from dataclasses import dataclass, field, fields, make_dataclass
from pathlib import Path

from configuration_nanoebm import LANDSCAPES, OPTION, OPTIONS, as_saved, landscape_names, landscape_of
from nanoebm.card import (RUN_RECORD, launch_command, lineage_from, model_card, new_run, read_record, suggested_prompt,
                          summary)
from nanoebm.cli import (UsageError, check_unk_token, raise_usage_error, reject_unknown, report,
                         translate_research_syntax, unk_token_field)
from nanoebm.folders import check_model_folder
from nanoebm.recipes import RECIPES
from nanoebm.settings import COMMAND_LINE, DEFAULT, PRESETS, TRAINING_DEFAULTS, Setting, merge, recorded, values_from

PROG = "run_train.py"
CONTRASTIVE_TYPES = ("cd", "pcd", "fast_pcd")
CHECKPOINTS = "checkpoints"  # checkpoints live in <output_dir>/checkpoints/, apart from the model's own files
MODEL_FILES = ("config.json", "model.safetensors", RUN_RECORD, "README.md", "all_results.json")  # a finished run's

# A resume repeats the run it resumes, so that it ends where that run would have. These flags may differ from that run:
# they change where the results go, how the run is watched or where it runs, not what it computes. Any other flag
# that differs is refused; continuing the checkpoint as a new run (--model_name_or_path CHECKPOINT) may change it.
RESUME_MAY_DIFFER = {"resume_from_checkpoint", "output_dir", "overwrite_output_dir", "keep_checkpoints", "report_to",
                     "wandb_project", "run_name", "logging_steps", "logging_first_step", "logging_strategy",
                     "disable_tqdm", "log_level", "log_level_replica", "save_steps", "save_strategy",
                     "save_total_limit", "use_cpu", "dataloader_pin_memory", "dataloader_num_workers"}
# what a --report_to logger needs where it is not `pip install NAME`
LOGGER_NEEDS = {"azure_ml": "pip install azureml-core",
                "comet_ml": "pip install comet_ml, and set COMET_API_KEY", "dagshub": "pip install dagshub mlflow",
                "flyte": "pip install flytekit flytekitplugins-deck-standard",
                "mlflow": "pip install mlflow (and leave DISABLE_MLFLOW_INTEGRATION unset)",
                "kubeflow": "it runs under a Kubeflow trainer, which sets KUBEFLOW_TRAINER_SERVER_URL"}
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
# Arguments: nanoebm's own in four dataclasses, the model's made from configuration_nanoebm.OPTIONS; every other
# TrainingArguments flag works as well


def opt(help_text, default=None, **kwargs):
    return field(default=default, metadata={"help": help_text}, **kwargs)


@dataclass
class StartArguments:
    """Where the run's settings and weights start from (nanoebm/settings.py merges them)."""

    model_name_or_path: str | None = opt("continue from a saved nanoebm folder: its architecture and block size "
                                         "are kept (another value is refused), its preset and batch unless given; "
                                         "thinking flags take effect (--think_lr resets the learned step size)")
    preset: str | None = opt("defaults to start from: 'gpu' (the research code's: 6x384, block 256, batch 64, "
                             "5000 steps, lr 3e-4) or 'cpu' (nanoGPT's CPU config: 4x128, block 64, batch 12, 2000 "
                             "steps, lr 1e-3). Default: gpu on a machine with a GPU, else cpu")
    recipe: str | None = opt("a named set of values above the preset and below the command line's own flags: "
                             "ebt_system2 | ebt_system1 (the EBT paper's) | ebt_hybrid (System 1 start, EBT energy, "
                             "cd); nanoebm/recipes.py lists them")


def model_field(option):
    """A flag for one model option: None (not given) leaves the model's own value, a new model's default or a
    continued model's saved one."""
    metadata = {"help": option.help, **({"choices": list(option.choices)} if option.choices else {})}
    return option.name, option.type | None, field(default=None, metadata=metadata)


# every config option but vocab_size, which the tokenizer sets
MODEL_OPTIONS = tuple(option for option in OPTIONS if option.name != "vocab_size")
ModelArguments = make_dataclass("ModelArguments", [model_field(option) for option in MODEL_OPTIONS])
ModelArguments.__doc__ = "The model's options (configuration_nanoebm.OPTIONS): a new model's, or a continued one's."


@dataclass
class DataArguments:
    data_path: str | None = opt("a UTF-8 text file, a folder of them, or a datasets save_to_disk folder (default: "
                                "$NANOEBM_DATA, else the tiny Shakespeare that ships with nanoebm)")
    dataset_name: str | None = opt("a datasets data set: a hub name or a save_to_disk folder")
    dataset_config_name: str | None = opt("its configuration")
    text_column: str = opt("the column holding the text", "text")
    streaming: bool = opt("stream the data instead of preparing it once (each process reads its own shard)", False)
    train_fraction: float = opt("leading fraction of the text used for training; the rest validates", 0.9)
    eval_blocks: int = opt("fixed validation blocks (evenly spaced, the same every evaluation)", 200)
    vocab_scan_chars: int = opt("with --streaming and no tokenizer: characters read to build the vocabulary",
                                10_000_000)
    eval_reading_chars: int = opt("evaluation also reads the validation text's first N characters in order, with "
                                  "and without learning while reading (the model's adapt_* settings); 0 skips it",
                                  10_000)
    unk_token: str | None = unk_token_field()
    data_cache_dir: str | None = opt("where a corpus's prepared ids are kept (default: $NANOEBM_CACHE, else "
                                     "~/.cache/nanoebm/data)")

    def __post_init__(self):
        if not (math.isfinite(self.train_fraction) and 0 < self.train_fraction < 1):
            raise UsageError(f"--train_fraction {self.train_fraction} is invalid: must be in (0, 1)")
        for name in ("eval_blocks", "vocab_scan_chars"):
            check_range(name, getattr(self, name), 1)
        check_range("eval_reading_chars", self.eval_reading_chars, 0)
        check_unk_token(self.unk_token)


@dataclass
class LossArguments:
    """nanoebm's training objective beyond plain CE (docs/DESIGN.md, section "Training")."""

    aux_ce_weight: float = opt("lambda_aux: (1 - l) CE(refined) + l CE(System 1)", 0.1)
    warmup_steps_no_refine: int = opt("train System 1 only for the first N steps", 0)
    random_think_steps: str | None = opt("draw K per batch uniformly from 'LO-HI' (e.g. '2-3'); default fixed K")
    truncate_refine: bool = opt("main CE on the last thinking step only (default: mean over steps)", False)
    detach_refine: bool = opt("cut the gradient between thinking steps", False)
    detach_system1: bool = opt("the thinking losses (refined CE, contrastive) train only the energy's own parameters "
                               "and System 1 learns from its auxiliary CE alone, as a plain GPT does (linear and "
                               "mixture landscapes)", False)
    think_lr_lr_multiplier: float = opt("learning-rate multiplier of the learnable step size alpha", 3.0)
    think_replay_prob: float = opt("replay buffer (EBT): probability that a batch row is a replayed block whose "
                                   "descent resumes from the logits an earlier step refined it to; 0 disables", 0.0)
    think_replay_size: int = opt("replay buffer: blocks kept (with their refined logits)", 1000)
    use_contrastive: bool | None = opt("the contrastive divergence term: on (cd) unless false; naming "
                                       "--contrastive_type picks the sampler")
    contrastive_type: str | None = opt("cd (chains from System 1) | pcd (persistent buffer, Tieleman 2008) | "
                                       "fast_pcd (parallel persistent chains with restarts; no fast weights)")
    contrastive_k: int = opt("Langevin steps per negative", 1)
    contrastive_weight: float = opt("weight of the contrastive term", 0.1)
    contrastive_reg_weight: float = opt("energy-magnitude stabiliser E_pos^2 + E_neg^2 (Du & Mordatch 2019)", 1.0)
    langevin_step_size: float = opt("Langevin step size", 0.01)
    langevin_noise_scale: float = opt("Langevin noise: sqrt(2 * step * scale) * N(0, 1)", 0.005)
    n_persistent: int = opt("pcd: persistent logit particles", 100)
    n_chains: int = opt("fast_pcd: parallel chains", 20)
    restart_prob: float = opt("fast_pcd: probability a chain restarts from System 1 logits", 0.01)
    buffer_init_std: float = opt("std of the N(0, s) initial particles", 1.0)

    def __post_init__(self):
        if self.contrastive_type is not None:
            if self.contrastive_type not in CONTRASTIVE_TYPES:
                raise UsageError(f"--contrastive_type {self.contrastive_type!r} is unknown: "
                                 f"allowed {CONTRASTIVE_TYPES}")
            if self.use_contrastive is False:
                raise UsageError("--contrastive_type was given with --use_contrastive false: drop one of them")
            self.use_contrastive = True
        elif self.use_contrastive is not False:  # on by default (docs/DESIGN.md: the measured recipe trains with cd)
            self.contrastive_type, self.use_contrastive = "cd", True
        if not 0.0 <= self.think_replay_prob < 1.0:
            raise UsageError(f"--think_replay_prob {self.think_replay_prob} is invalid: must be in [0, 1)")
        for name in ("contrastive_k", "n_persistent", "n_chains", "think_replay_size"):
            if getattr(self, name) < 1:
                raise UsageError(f"--{name} {getattr(self, name)} is invalid: must be >= 1")
        for name, low, high in (("restart_prob", 0, 1), ("aux_ce_weight", 0, 1), ("contrastive_weight", 0, None),
                                ("contrastive_reg_weight", 0, None), ("langevin_step_size", 0, None),
                                ("langevin_noise_scale", 0, None), ("buffer_init_std", 0, None),
                                ("think_lr_lr_multiplier", 0, None), ("warmup_steps_no_refine", 0, None)):
            check_range(name, getattr(self, name), low, high)
        self.think_steps_range = parse_range(self.random_think_steps)


@dataclass
class RunArguments:
    """What happens to the results."""

    overwrite_output_dir: bool = opt("replace what --output_dir holds (a finished model, checkpoints of another "
                                     "run) once this run's model is complete (it trains in <output_dir>.replacing "
                                     "until then); without it such a folder stops the run before anything is "
                                     "written", False)
    keep_checkpoints: bool = opt("keep <output_dir>/checkpoints/ (optimizer, RNG and contrastive state, for "
                                 "--resume_from_checkpoint) after a finished run; by default they are removed", False)
    wandb_project: str | None = opt("log to this W&B project (implies --report_to wandb; offline with "
                                    "WANDB_MODE=offline)")


def check_range(name, value, low, high=None):
    """UsageError unless low <= value (<= high): NaN and infinities are never in range."""
    if not (math.isfinite(value) and value >= low and (high is None or value <= high)):
        allowed = f"in [{low}, {high}]" if high is not None else f">= {low}"
        raise UsageError(f"--{name} {value} is invalid: must be {allowed}")


def check_training_numbers(T):
    """The TrainingArguments numbers transformers would take and then fail on mid-run (the optimizer refuses a
    negative learning rate only when it is built, after the output folder exists)."""
    for name, low in (("learning_rate", 0), ("weight_decay", 0), ("warmup_steps", 0), ("max_grad_norm", 0),
                      ("per_device_train_batch_size", 1), ("per_device_eval_batch_size", 1),
                      ("gradient_accumulation_steps", 1)):
        check_range(name, getattr(T, name), low)
    if T.max_steps == 0 or T.max_steps < -1:
        raise UsageError(f"--max_steps {T.max_steps} is invalid: must be >= 1 (or -1: train --num_train_epochs)")


def parse_range(text):
    if text is None:
        return None
    try:
        lo, hi = (int(x) for x in str(text).replace(",", "-").split("-"))
    except ValueError:
        raise UsageError(f"--random_think_steps {text!r} is invalid: write 'LO-HI', e.g. '2-3'") from None
    if not 0 <= lo <= hi:
        raise UsageError(f"--random_think_steps {text!r} is invalid: need 0 <= LO <= HI")
    return lo, hi


NANOEBM_ARGUMENTS = (StartArguments, ModelArguments, DataArguments, LossArguments, RunArguments)

# the research code's key=value syntax: section prefixes dropped, a few keys renamed
RESEARCH_KEYS = {
    "batch_size": "per_device_train_batch_size",
    "compile": "torch_compile",
    **{alias: option.name for option in MODEL_OPTIONS for alias in option.aliases},
    "wandb_name": "run_name",
    "out_dir": "output_dir",
    "checkpoint": "model_name_or_path",
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


@dataclass
class ParsedArguments:
    start: StartArguments
    model: "ModelArguments"
    data: DataArguments
    loss: LossArguments
    run: RunArguments
    training: object  # transformers.TrainingArguments
    argv: list  # the command line as given (after the key=value translation)
    preset: str
    preset_reason: str
    settings: dict  # name -> Setting(value, source): what the run record keeps
    resume_from: Path | None = None


def new_parser():
    from transformers import HfArgumentParser, TrainingArguments

    parser = HfArgumentParser((*NANOEBM_ARGUMENTS, TrainingArguments), prog=PROG, allow_abbrev=False)
    parser.error = raise_usage_error  # a bad value is one message, not the whole usage
    return parser


def given_values(parser, argv) -> dict:
    """{name: value} of the options the command line gives, typed by the parser; nothing else (no defaults)."""
    for action in parser._actions:
        action.default = argparse.SUPPRESS
    namespace, remaining = parser.parse_known_args(argv)
    reject_unknown(parser, remaining)
    return vars(namespace)


def machine_preset(use_cpu: bool):
    import torch

    if use_cpu:
        return "cpu", "--use_cpu"
    if torch.cuda.is_available():
        return "gpu", f"a GPU is present ({torch.cuda.get_device_name(0)})"
    return "cpu", "no GPU here; --preset gpu for the research config"


def resolve_checkpoint(value, output_dir):
    """--resume_from_checkpoint: a checkpoint folder, or 'last' / 'true' for the newest in --output_dir."""
    if str(value).lower() in ("last", "true"):
        run_dir = Path(output_dir or TRAINING_DEFAULTS["output_dir"])
        found = checkpoints_in(run_dir)
        if not found:
            raise UsageError(f"--resume_from_checkpoint {value}: no checkpoint in {run_dir / CHECKPOINTS}")
        return found[-1]
    path = Path(value)
    if not (path / "config.json").is_file() or not (path / "trainer_state.json").is_file():
        raise UsageError(f"--resume_from_checkpoint {value}: not a checkpoint folder (it needs config.json and "
                         f"trainer_state.json; checkpoints are in <output_dir>/{CHECKPOINTS}/checkpoint-N)")
    return path


def checkpoints_in(folder: Path):
    """A run folder's checkpoint folders (in its checkpoints/, or beside its files), oldest first."""
    found = [*(folder / CHECKPOINTS).glob("checkpoint-*"), *folder.glob("checkpoint-*")]
    return sorted(found, key=lambda p: int(p.name.split("-")[-1]) if p.name.split("-")[-1].isdigit() else -1)


def resumed_layer(checkpoint: Path, parser) -> dict:
    """The settings of the run a checkpoint belongs to, so that a resume repeats it: from its run record, else
    (a checkpoint without one) its batch size."""
    record = read_record(checkpoint)
    if record is None:
        state = json_file(checkpoint / "trainer_state.json")
        batch = state.get("train_batch_size")
        return {**saved_options(checkpoint), "model_name_or_path": str(checkpoint),
                **({"per_device_train_batch_size": batch} if batch else {})}
    run = record["runs"][-1]
    if "settings" in run:
        values = {name: entry["value"] for name, entry in run["settings"].items()}
    else:  # a record that kept the command line only: its values, as they merge today
        values = merged_values(given_values(parser, run.get("argv", [])), run["preset"])
    values.pop("resume_from_checkpoint", None)
    # the checkpoint is the model (architecture, block size, tokenizer): a folder the run once continued may be gone
    return {"output_dir": run["output_dir"], **values, "preset": run["preset"], "model_name_or_path": str(checkpoint)}


def saved_options(folder) -> dict:
    """The model options a saved folder's config.json holds ({} when it cannot be read: check_model_folder says
    why, when the model is read)."""
    import json

    try:
        saved = json.loads((Path(folder).expanduser() / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    if not isinstance(saved, dict):
        return {}
    saved = as_saved(saved)
    return {option.name: saved[option.name] for option in MODEL_OPTIONS if option.name in saved}


def continued_layer(folder) -> dict:
    """What continuing a saved folder keeps unless given: its model options, and its run's preset and batch."""
    layer = saved_options(folder)
    record = read_record(folder)
    if record is not None:
        run = record["runs"][-1]
        layer.update(preset=run["preset"], per_device_train_batch_size=run["per_device_train_batch_size"],
                     gradient_accumulation_steps=run["gradient_accumulation_steps"])
    return layer


def layers_for(given: dict, preset: str, source: tuple[str, dict] | None) -> list:
    """The settings' layers, lowest first: defaults < preset < recipe < continued or resumed < the command line."""
    recipe = given.get("recipe", (source[1] if source else {}).get("recipe"))
    if recipe is not None and recipe not in RECIPES:
        raise UsageError(f"--recipe {recipe!r} is unknown: allowed {sorted(RECIPES)}")
    layers = [(DEFAULT, defaults()), (f"preset {preset}", PRESETS[preset])]
    if recipe is not None:
        layers.append((f"recipe {recipe}", RECIPES[recipe]))
    if source is not None:
        layers.append(source)
    return [*layers, (COMMAND_LINE, given)]


def defaults() -> dict:
    """nanoebm's defaults beyond each dataclass's own: the Trainer's (nanoGPT's AdamW and schedule), and no pinned
    memory without an accelerator (torch warns every run otherwise)."""
    import torch

    return {**TRAINING_DEFAULTS, **({} if torch.cuda.is_available() else {"dataloader_pin_memory": False})}


def merged_values(given: dict, preset: str) -> dict:
    return {name: s.value for name, s in merge(layers_for(given, preset, None)).items()}


def build_arguments(settings: dict[str, Setting], whole_model: bool = False) -> list:
    """The argument dataclasses from the merged settings. The model's options come only from the layers above the
    model a run continues or resumes (which keeps the rest), so a continued model is changed only where asked;
    `whole_model` takes them from every layer (to compare two runs' settings)."""
    from transformers import TrainingArguments

    built = []
    for cls in (*NANOEBM_ARGUMENTS, TrainingArguments):
        names = {f.name for f in fields(cls) if f.init}
        skip = ("continued", "resumed") if cls is ModelArguments and not whole_model else ()
        built.append(cls(**values_from(settings, names, skip)))
    return built


def parse_args(argv=None) -> ParsedArguments:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = new_parser()
    argv = translate_research_syntax(argv, parser, renames=RESEARCH_KEYS, sections=("model", "data", "train"))
    given = given_values(parser, argv)
    checkpoint, source = None, None
    resume = given.get("resume_from_checkpoint")
    if resume is not None and str(resume).lower() not in ("false", "none"):
        checkpoint = resolve_checkpoint(resume, given.get("output_dir"))
        source = (f"resumed {checkpoint}", resumed_layer(checkpoint, parser))
    elif given.get("model_name_or_path"):
        source = (f"continued {given['model_name_or_path']}", continued_layer(given["model_name_or_path"]))
        if "vocab_scan_chars" in given:
            raise UsageError("--vocab_scan_chars sizes a new model's vocabulary: a continued model keeps its own")
    preset, reason = choose_preset(given, source)
    settings = merge(layers_for(given, preset, source))
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


def check_detach_system1(loss, settings):
    """--detach_system1 keeps the thinking losses off System 1: it needs an energy with parameters of its own (not
    one computed by the backbone System 1 uses) and a System 1 loss to learn from."""
    if not loss.detach_system1:
        return

    def value(name):
        return settings[name].value if name in settings else OPTION[name].default

    landscape = landscape_of(value("use_soft_tokens"), value("landscape"))
    if landscape in LANDSCAPES and LANDSCAPES[landscape].reads_candidate:
        raise UsageError(f"--detach_system1 true is invalid with --landscape {landscape}: its energy runs through "
                         f"the backbone System 1 uses; allowed landscapes: "
                         f"{', '.join(landscape_names(reads_candidate=False))}")
    if loss.aux_ce_weight == 0:
        raise UsageError("--detach_system1 true is invalid with --aux_ce_weight 0: System 1 would learn from "
                         "nothing; give --aux_ce_weight in (0, 1]")


def choose_preset(given: dict, source):
    """The preset: the command line's, else the continued or resumed run's, else the machine's."""
    if "preset" in given:
        preset, reason = given["preset"], "--preset"
    elif source is not None and "preset" in source[1]:
        preset, reason = source[1]["preset"], "from the folder it continues"
    else:
        preset, reason = machine_preset(bool(given.get("use_cpu")))
    if preset not in PRESETS:
        raise UsageError(f"--preset {preset!r} is unknown: allowed {sorted(PRESETS)}")
    return preset, reason


def settle_training(T, run_args, checkpoint):
    """What TrainingArguments derive from the rest: nanoGPT's decay to lr / 10, the W&B project, training and
    evaluating unless one is asked for alone, and the checkpoint a resume starts from."""
    if T.lr_scheduler_type == "cosine_with_min_lr" and not T.lr_scheduler_kwargs:
        T.lr_scheduler_kwargs = {"min_lr_rate": 0.1}
    if run_args.wandb_project:
        os.environ["WANDB_PROJECT"] = run_args.wandb_project
        T.report_to = ["wandb"]
    if not T.do_train and not T.do_eval:
        T.do_train = T.do_eval = True
    if T.do_eval and T.eval_strategy == "no" and T.do_train:
        T.eval_strategy = "steps"
        T.eval_steps = T.eval_steps or T.save_steps
    if checkpoint is not None:
        T.resume_from_checkpoint = str(checkpoint)


def json_file(path):
    import json

    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise UsageError(f"{path} is missing or not valid JSON ({error})") from None


def check_resume_flags(preset, source, settings):
    """UsageError naming each flag whose value differs from the run a resume repeats, unless it is one that
    RESUME_MAY_DIFFER."""
    baseline = build_arguments(merge(layers_for({}, preset, source)), whole_model=True)
    parsed = build_arguments(settings, whole_model=True)
    differ = [f"--{f.name} {getattr(new, f.name)} (it ran with {getattr(old, f.name)})"
              for old, new in zip(baseline, parsed) for f in fields(old)
              if f.init and f.name not in RESUME_MAY_DIFFER and getattr(old, f.name) != getattr(new, f.name)]
    if differ:
        raise UsageError(f"--resume_from_checkpoint repeats the run it resumes, so that it ends where that run would "
                         f"have, and {', '.join(differ)} would change what it computes: drop the flag, or continue "
                         f"the checkpoint as a new run (--model_name_or_path CHECKPOINT)")


def check_loggers(report_to):
    """UsageError for a --report_to logger that is unknown or cannot start here, naming what to install: before
    anything is read or written (the Trainer would stop with a traceback while building its callbacks)."""
    from transformers.integrations import integration_utils as integrations

    known = integrations.INTEGRATION_TO_CALLBACK
    available = set(integrations.get_available_reporting_integrations())
    available |= {name for name, ready in (("flyte", integrations.is_flytekit_available),
                                           ("azure_ml", integrations.is_azureml_available)) if ready()}
    for name in report_to or []:
        if name not in known:
            raise UsageError(f"--report_to {name!r} is unknown: allowed {sorted(known)} (or 'all', 'none')")
        if name not in available:
            need = LOGGER_NEEDS.get(name, f"pip install {name}")
            raise UsageError(f"--report_to {name}: that logger is not available here: {need}")


# ----------------------------------------------------------------------------------------------------------------
# Nothing lost: a run writes only into a folder that holds nothing of another run


def check_output_dir(folder: Path, args: ParsedArguments):
    """Raise UsageError if `folder` holds a finished model or checkpoints that this run would overwrite."""
    if not folder.exists() or args.run.overwrite_output_dir:
        return
    # a model card or results without a model are someone's files too: a finished run would overwrite them
    finished = [name for name in MODEL_FILES if (folder / name).exists()]
    checkpoints = checkpoints_in(folder)
    own = resuming_own(folder, args)
    what = (f"a finished model or its files ({', '.join(finished)})" if finished else
            f"checkpoints of another run ({', '.join(p.name for p in checkpoints[-3:])})"
            if checkpoints and not own else None)
    if what is None:
        return
    raise UsageError(
        f"--output_dir {folder} already holds {what}: nothing was written. Give a new --output_dir, "
        + (f"resume it with --resume_from_checkpoint {checkpoints[-1]}, " if checkpoints and not finished else "")
        + "or pass --overwrite_output_dir true to replace it"
    )


def resuming_own(folder: Path, args: ParsedArguments) -> bool:
    """Whether this run resumes a checkpoint of `folder` (in its checkpoints/ or in the folder itself)."""
    if args.resume_from is None:
        return False
    parent = args.resume_from.resolve().parent
    return parent in (folder.resolve(), (folder / CHECKPOINTS).resolve())


def writing_dir(folder: Path, args: ParsedArguments) -> Path:
    """Where this run writes its model and checkpoints: `folder` itself, or, where --overwrite_output_dir replaces
    what it holds, a folder beside it (`replace_folder` swaps them once the new model is complete, so a run that fails
    leaves the old one whole). Leftovers of a replacing run that did not finish are cleared, unless this run resumes
    one of their checkpoints."""
    if not (args.run.overwrite_output_dir and folder.exists()):
        return folder
    finished = any((folder / name).exists() for name in MODEL_FILES)
    if not finished and (resuming_own(folder, args) or not checkpoints_in(folder)):
        return folder  # nothing of another run to replace
    beside = folder.with_name(folder.name + ".replacing")
    if beside.exists() and not resuming_own(beside, args) and args.training.process_index == 0:
        shutil.rmtree(beside)
    return beside


def replace_folder(folder: Path, new: Path):
    """Move the finished run in `new` into `folder`: each file replaces its namesake at once (os.replace), then what
    is left of the earlier run (its model files, its checkpoints) goes; other files in `folder` stay."""
    brought = {entry.name for entry in new.iterdir()}
    stale = [path for path in (*(folder / name for name in MODEL_FILES), *checkpoints_in(folder), folder / CHECKPOINTS)
             if path.parent == folder and path.name not in brought]
    for entry in sorted(new.iterdir(), key=lambda path: path.is_dir()):  # the files first: the model is whole sooner
        target = folder / entry.name
        if entry.is_dir() and target.is_dir():
            shutil.rmtree(target)
        os.replace(entry, target)
    for path in stale:
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)
    new.rmdir()


# ----------------------------------------------------------------------------------------------------------------
# main


def always_thinks(config, loss_args):
    """True when every step runs the descent, so every parameter (alpha and the correction too) gets a gradient."""
    lowest = loss_args.think_steps_range[0] if loss_args.think_steps_range else config.think_steps
    return config.use_thinking and lowest > 0 and loss_args.warmup_steps_no_refine == 0


def describe_run(args: ParsedArguments, model, T) -> dict:
    """The run record ({"runs": [...]}, this run last): the lineage of the starting weights, then this run."""
    folder = args.start.model_name_or_path
    started_from = ({"checkpoint": str(args.resume_from)} if args.resume_from else
                    {"model": folder} if folder else "random init")
    runs = lineage_from(folder if not args.resume_from else None, args.resume_from)
    run = new_run(command=launch_command(args.argv, T.world_size), preset=args.preset, processes=T.world_size,
                  per_device_batch=T.per_device_train_batch_size, accumulation=T.gradient_accumulation_steps,
                  block_size=model.config.block_size, max_steps=T.max_steps, seed=T.seed, output_dir=T.output_dir,
                  started_from=started_from)
    # a resumed run's global step counts the steps of the run it resumes: this run's own start from there
    run["started_at_step"] = json_file(args.resume_from / "trainer_state.json").get("global_step", 0) \
        if args.resume_from else 0
    run["argv"] = args.argv
    # every setting with where it came from; a resume of this run repeats them
    run["settings"] = recorded(run_settings(args, model.config))
    return {"runs": [*runs, run]}


def run_settings(args: ParsedArguments, config) -> dict:
    """Every nanoebm setting the run used, as it used it (a dataclass may derive one value from another; the
    model's come from its config), and the TrainingArguments a layer set, each with where it came from."""
    def source(name):
        return args.settings[name].source if name in args.settings else DEFAULT

    out = {f.name: Setting(getattr(part, f.name), source(f.name))
           for part in (args.start, args.data, args.loss, args.run) for f in fields(part)}
    if "preset" not in args.settings:  # no layer named it: the machine chose it (choose_preset)
        out["preset"] = Setting(args.preset, "the machine")
    for option in OPTIONS:
        out[option.name] = Setting(getattr(config, option.name),
                                   "the tokenizer" if option.name == "vocab_size" else source(option.name))
    for name, setting in args.settings.items():
        if name not in out and hasattr(args.training, name) and name != "resume_from_checkpoint":
            out[name] = Setting(getattr(args.training, name), setting.source)
    return out


def write_results(trainer, work_dir: Path, final_dir: Path, record: dict, metrics: dict, keep_checkpoints: bool,
                  seconds: float, prompt: str):
    """The model card, the run record and the metrics beside the model saved in `work_dir`; the checkpoints go
    unless kept; then `work_dir` becomes `final_dir` if it is not (`writing_dir`). `prompt`: what the card and the
    summary suggest generating from (text the model can encode)."""
    import json

    run = record["runs"][-1]
    evaluation = {k: v for k, v in metrics.items() if k.startswith("eval_")}
    run.update(steps_done=trainer.state.global_step, metrics=evaluation, finished=time.strftime("%Y-%m-%dT%H:%M:%S%z"))
    (work_dir / RUN_RECORD).write_text(json.dumps(record, indent=1))
    (work_dir / "README.md").write_text(model_card(final_dir, record["runs"], metrics, trainer.model.config, prompt))
    (work_dir / "all_results.json").write_text(json.dumps(metrics, indent=2))
    (work_dir / "training_args.bin").unlink(missing_ok=True)  # the record says it in JSON
    if keep_checkpoints:
        kept = f"kept in {final_dir / CHECKPOINTS}/ (--resume_from_checkpoint DIR resumes one exactly)"
    else:
        shutil.rmtree(work_dir / CHECKPOINTS, ignore_errors=True)
        kept = "removed (--keep_checkpoints true keeps them)"
    if work_dir != final_dir:
        replace_folder(final_dir, work_dir)
    print(summary(final_dir, record["runs"], metrics, trainer.model.config, seconds, kept, prompt), flush=True)


def saved_tokenizer(args: ParsedArguments):
    """A continued model's tokenizer (None for a new model), with the data's block size settled: a continued model's
    own, else the preset's."""
    from nanoebm.continuing import check_kept
    from tokenization_char import CharTokenizer

    start, model_args = args.start, args.model
    if not start.model_name_or_path:
        return None
    folder, saved, _ = check_model_folder(start.model_name_or_path)
    start.model_name_or_path = str(folder)  # `~` expanded: the tokenizer and the record read it as a path
    block = saved.get("block_size")
    if not isinstance(block, int) or block < 1:
        raise UsageError(f"{folder / 'config.json'} has block_size={block!r}: a saved nanoebm model has a positive "
                         f"integer there; save the model again with save_pretrained")
    if model_args.block_size is not None:
        check_kept("block_size", model_args.block_size, block)
    model_args.block_size = block
    if args.resume_from is not None:  # before the weights load: a refused state file is all this run prints
        from nanoebm.contrastive import check_resume_state

        check_resume_state(args.resume_from, args.loss, saved, args.training.process_index)
    return CharTokenizer.from_pretrained(start.model_name_or_path)


def opening_text(train_data, eval_blocks, tokenizer, n=200) -> str:
    """The first characters of the training text as the model reads them (a streamed corpus: of its validation
    part, which is the stream's start), so every one of them is a character the model can encode."""
    from nanoebm.data import RandomOffsetBlocks

    ids = train_data.ids[:n] if isinstance(train_data, RandomOffsetBlocks) else eval_blocks[0][:n]
    return tokenizer.decode(ids.tolist())


def describe_start(args: ParsedArguments, model, tokenizer) -> str:
    T = args.training
    return (f"nanoebm: preset {args.preset} ({args.preset_reason}); {model.num_parameters() / 1e6:.2f}M parameters, "
            f"vocabulary {tokenizer.vocab_size}, landscape {model.config.landscape}, block {model.config.block_size}; "
            f"{T.world_size} process(es) x batch {T.per_device_train_batch_size} x accumulation "
            f"{T.gradient_accumulation_steps} = "
            f"{T.world_size * T.per_device_train_batch_size * T.gradient_accumulation_steps} blocks per step")


def startup_guard(*folders: Path):
    """A context and Trainer callback: until the first training step begins, an error is bad input or a missing
    package (a logger's, an optimizer's, a data set's), raised by the Trainer, its callbacks or integrations. It
    becomes one UsageError (the library's message, with its type), and the folders this run created are removed."""
    from transformers import TrainerCallback

    class StartupGuard(TrainerCallback):
        def __init__(self):
            self.created = [path for folder in folders for path in (folder, folder / CHECKPOINTS)
                            if not path.exists()]
            self.started = False

        def on_step_begin(self, args, state, control, **kwargs):
            self.started = True

        def __enter__(self):
            return self

        def __exit__(self, kind, error, traceback):
            if not isinstance(error, Exception) or self.started:
                return False
            for path in self.created:  # only what this run made: nothing of it is a result yet
                shutil.rmtree(path, ignore_errors=True)
            reported = isinstance(error, (UsageError, FileNotFoundError, ValueError))
            if reported or type(error).__name__ == "SafetensorError":
                return False  # reported as they are (cli)
            raise UsageError(f"training could not start: {type(error).__name__}: {error}") from error

    return StartupGuard()


def keep_logs(trainer, folder: Path):
    """TensorBoard writes under the Trainer's output_dir, which is <output_dir>/checkpoints here and goes when the run
    finishes: its events go to <output_dir>/runs/ instead (transformers' own layout), unless TENSORBOARD_LOGGING_DIR
    names a folder."""
    from transformers.integrations import TensorBoardCallback
    from transformers.integrations.integration_utils import default_logdir

    for callback in trainer.callback_handler.callbacks:
        if isinstance(callback, TensorBoardCallback) and callback.logging_dir is None:
            callback.logging_dir = str(folder / default_logdir())


def main(argv=None, callbacks=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    from transformers import default_data_collator, set_seed
    from transformers.utils import logging

    from nanoebm import data
    from nanoebm.continuing import build_model
    from nanoebm.trainer import EBMTrainer

    logging.set_verbosity_warning()
    T, data_args, model_args = args.training, args.data, args.model
    final_dir = Path(T.output_dir)
    if T.do_train:
        check_output_dir(final_dir, args)
    tokenizer = saved_tokenizer(args)
    set_seed(T.seed)
    with T.main_process_first(desc="reading the corpus"):
        train_data, eval_blocks, tokenizer = data.build_data(data_args, tokenizer, model_args.block_size, T.seed)
        reading = data.reading_ids(data_args, tokenizer, model_args.block_size) if T.do_eval else None
    model = build_model(args.start.model_name_or_path, model_args, tokenizer, resuming=args.resume_from is not None)
    if T.ddp_find_unused_parameters is None:  # an extra autograd traversal per step, only where a parameter can idle
        T.ddp_find_unused_parameters = not always_thinks(model.config, args.loss)
    record = describe_run(args, model, T) if T.do_train else None
    work_dir = final_dir
    if T.do_train:
        with T.main_process_first(desc="preparing --output_dir"):
            work_dir = writing_dir(final_dir, args)
        T.output_dir = str(work_dir / CHECKPOINTS)
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
    if T.do_train:
        # only a finished run writes the model folder: a crash leaves checkpoints, never a half-made model
        trainer.save_model(str(work_dir))
        if trainer.is_world_process_zero():
            prompt = suggested_prompt(opening_text(train_data, eval_blocks, tokenizer))
            write_results(trainer, work_dir, final_dir, record, metrics, args.run.keep_checkpoints,
                          time.perf_counter() - started, prompt)
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
