"""run_train.py's own flags: nanoebm's arguments in five dataclasses (the model's made from
configuration_nanoebm.OPTIONS), each checking its values as it is built, and the checks of what they and
TrainingArguments say together.

Every other transformers TrainingArguments flag works as well; run_train.py parses them all at once, and
nanoebm/settings.py merges the values the command line gives over the other layers before these classes are built.
"""

import math
from dataclasses import dataclass, field, make_dataclass
from pathlib import Path

from configuration_nanoebm import LANDSCAPES, OPTION, OPTIONS, landscape_names, landscape_of
from nanoebm.cli import UsageError, check_unk_token, unk_token_field

CONTRASTIVE_TYPES = ("cd", "pcd", "fast_pcd")
# what a --report_to logger needs where it is not `pip install NAME`
LOGGER_NEEDS = {"azure_ml": "pip install azureml-core",
                "comet_ml": "pip install comet_ml, and set COMET_API_KEY", "dagshub": "pip install dagshub mlflow",
                "flyte": "pip install flytekit flytekitplugins-deck-standard",
                "mlflow": "pip install mlflow (and leave DISABLE_MLFLOW_INTEGRATION unset)",
                "kubeflow": "it runs under a Kubeflow trainer, which sets KUBEFLOW_TRAINER_SERVER_URL"}


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


@dataclass
class ParsedArguments:
    """What run_train.parse_args returns: the argument dataclasses built from the merged settings, and how they were
    chosen."""

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
