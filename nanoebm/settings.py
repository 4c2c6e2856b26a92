"""A run's settings: the presets, where the layers of its settings come from, and how they merge, each value keeping
where it came from.

A run's settings merge in one order, each layer overriding the ones before it:

    defaults < preset < recipe < the folder being continued or the run being resumed < the command line

The result maps every setting to `(value, source)`; `nanoebm_run.json` records both, so a finished run says which of
its values were chosen and by whom, and a resume reads them back. The model's own settings and their defaults are
defined once, in `configuration_nanoebm.OPTIONS`; the recipes are data in `nanoebm/recipes.py`. `run_train.parse_args`
resolves a command line: `starting_layer` (the folder continued or the run resumed), `choose_preset`, `merge` of
`layers_for`, `build_arguments`, `check_resume_flags`, `settle_training`.
"""

from __future__ import annotations

import json
import os
from dataclasses import fields
from pathlib import Path
from typing import NamedTuple

from configuration_nanoebm import OPTIONS, as_saved, assumed_options
from nanoebm.arguments import MODEL_OPTIONS, NANOEBM_ARGUMENTS, ModelArguments, ParsedArguments
from nanoebm.card import json_file, read_record
from nanoebm.cli import UsageError, given_values
from nanoebm.folders import CHECKPOINTS, checkpoints_in
from nanoebm.recipes import RECIPES

# TrainingArguments defaults nanoebm changes for every preset (nanoGPT's AdamW and schedule)
TRAINING_DEFAULTS = dict(output_dir="out", weight_decay=0.1, adam_beta2=0.95, lr_scheduler_type="cosine_with_min_lr",
                         per_device_eval_batch_size=32, report_to="none")
PRESETS = {
    # the research code's "common overrides" (docs/DESIGN.md): GPU-sized
    "gpu": dict(n_layer=6, n_head=6, n_embd=384, dropout=0.1, bias=True, block_size=256,
                per_device_train_batch_size=64, max_steps=5000, learning_rate=3e-4, warmup_steps=100,
                eval_steps=500, save_steps=1000, logging_steps=50),
    # nanoGPT's CPU config: a real result in minutes. At 4x128 the unscaled residual init trained best (docs/DESIGN.md)
    "cpu": dict(n_layer=4, n_head=4, n_embd=128, residual_init_power=0.0, dropout=0.0, bias=True, block_size=64,
                per_device_train_batch_size=12, max_steps=2000, learning_rate=1e-3, warmup_steps=100,
                eval_steps=250, save_steps=1000, logging_steps=50),
}
# Settings that make one choice together: a layer that sets either decides both, so a lower layer's value for the
# other does not leak through (naming a sampler turns the contrastive term on over a recipe's "off", and
# "--use_contrastive false" turns it off over a recipe's sampler).
LINKED = ({"use_contrastive", "contrastive_type"},)

DEFAULT, COMMAND_LINE = "default", "command line"
# A resume repeats the run it resumes, so that it ends where that run would have. These flags may differ from that run:
# they change where the results go, how the run is watched or where it runs, not what it computes. Any other flag
# that differs is refused; continuing the checkpoint as a new run (--model_name_or_path CHECKPOINT) may change it.
RESUME_MAY_DIFFER = {"resume_from_checkpoint", "output_dir", "overwrite_output_dir", "keep_checkpoints", "report_to",
                     "wandb_project", "run_name", "logging_steps", "logging_first_step", "logging_strategy",
                     "disable_tqdm", "log_level", "log_level_replica", "save_steps", "save_strategy",
                     "save_total_limit", "use_cpu", "dataloader_pin_memory", "dataloader_num_workers"}


class Setting(NamedTuple):
    value: object
    source: str  # "default", "preset cpu", "recipe ebt_hybrid", "continued <folder>", "resumed <checkpoint>", ...


def merge(layers: list[tuple[str, dict]]) -> dict[str, Setting]:
    """Every setting the layers name, with its value from the last layer that names it (LINKED settings go
    together). `layers`: (source, {name: value}) from lowest to highest."""
    merged: dict[str, Setting] = {}
    for source, values in layers:
        for linked in LINKED:
            if linked & values.keys():
                for name in linked - values.keys():
                    merged.pop(name, None)
        merged.update((name, Setting(value, source)) for name, value in values.items())
    return merged


def values_from(settings: dict[str, Setting], names, skip_sources=()) -> dict:
    """{name: value} of the settings among `names`, leaving out those whose source starts with one of
    `skip_sources`."""
    return {name: s.value for name, s in settings.items()
            if name in names and not any(s.source.startswith(skip) for skip in skip_sources)}


def recorded(settings: dict[str, Setting]) -> dict:
    """The run record's form: {name: {"value": v, "from": source}}, JSON-ready."""
    return {name: {"value": jsonable(s.value), "from": s.source} for name, s in sorted(settings.items())}


def from_record(entries: dict) -> dict:
    """A recorded run's settings as a layer {name: value}."""
    return {name: entry["value"] for name, entry in entries.items()}


def jsonable(value):
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    return getattr(value, "value", str(value))  # an enum's value, else its text


def starting_layer(given: dict, parser):
    """(the checkpoint a resume starts from, the layer of the run it resumes or of the folder a run continues), None
    where the command line names neither. `given`: the command line's values; `parser`: the one that read them."""
    resume = given.get("resume_from_checkpoint")
    if resume is not None and str(resume).lower() not in ("false", "none"):
        checkpoint = resolve_checkpoint(resume, given.get("output_dir"))
        return checkpoint, (f"resumed {checkpoint}", resumed_layer(checkpoint, parser))
    if not given.get("model_name_or_path"):
        return None, None
    source = (f"continued {given['model_name_or_path']}", continued_layer(given["model_name_or_path"]))
    if "vocab_scan_chars" in given:
        raise UsageError("--vocab_scan_chars sizes a new model's vocabulary: a continued model keeps its own")
    return None, source


def machine_preset(use_cpu: bool):
    import torch

    if use_cpu:
        return "cpu", "--use_cpu"
    if torch.cuda.is_available():
        return "gpu", f"a GPU is present ({torch.cuda.get_device_name(0)})"
    return "cpu", "no GPU here; --preset gpu for the research config"


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


def marked_assumed(settings: dict[str, Setting], source: tuple[str, dict] | None) -> dict[str, Setting]:
    """The settings, where a value comes from the continued or resumed folder's config.json only by assumption (the
    folder was saved before the option existed: configuration_nanoebm.BEFORE_OPTION), with a source that says so."""
    if source is None:
        return settings
    label = source[0]
    folder = source[1].get("model_name_or_path") or label.split(" ", 1)[1]
    try:  # an unreadable folder is check_model_folder's to name, when the model is read
        saved = json.loads((Path(folder).expanduser() / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return settings
    for name in assumed_options(saved) if isinstance(saved, dict) else ():
        if name in settings and settings[name].source == label:
            settings[name] = Setting(settings[name].value, f"assumed: {folder} was saved before {name} existed")
    return settings


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


def run_settings(args: ParsedArguments, config) -> dict:
    """Every nanoebm setting the run used, as it used it (a dataclass may derive one value from another; the
    model's come from its config), and the TrainingArguments a layer set, each with where it came from, in the
    run record's form (`recorded`)."""
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
    return recorded(out)
