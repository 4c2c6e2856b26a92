"""Model folders: the check every command makes before it reads a saved one, with one message for each way it can be
wrong (run_train.py continues from one, run_generate.py samples from one; neither shows the user a traceback for a
bad folder), and the folder a training run writes: nothing of another run is lost.

A run writes only into a folder that holds nothing of another run (`check_output_dir`), unless
--overwrite_output_dir; then it trains in `<output_dir>.replacing/` and `replace_folder` moves its finished model in
(`writing_dir`, `finish_folder`), so a run that fails leaves the old model whole. Checkpoints live in
`<output_dir>/checkpoints/`, TensorBoard logs in `<output_dir>/runs/` (`keep_logs`); a run that cannot start removes
the folders it made (`startup_guard`).
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

from nanoebm.card import RUN_RECORD
from nanoebm.cli import UsageError

if TYPE_CHECKING:
    from nanoebm.arguments import ParsedArguments

WEIGHTS_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                 "pytorch_model.bin.index.json")
MADE_BY = "save_pretrained (run_train.py writes such a folder)"
REDO = "save the model again with save_pretrained, or retrain it (run_train.py)"
CHECKPOINTS = "checkpoints"  # checkpoints live in <output_dir>/checkpoints/, apart from the model's own files
MODEL_FILES = ("config.json", "model.safetensors", RUN_RECORD, "README.md", "all_results.json")  # a finished run's


def check_model_folder(path) -> tuple[Path, dict, Path]:
    """(folder, its config.json, its weights file) of a saved nanoebm model, or a UsageError that says what is wrong
    with it and what to do. Reads nothing but config.json."""
    folder = Path(path).expanduser()
    if not folder.exists():
        raise UsageError(f"model folder {str(path)!r} does not exist")
    if not folder.is_dir():
        raise UsageError(f"{str(path)!r} is a file, not a model folder: expected a folder written by {MADE_BY}; "
                         "the research code's .pt checkpoints cannot be loaded")
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise UsageError(f"{str(path)!r} is not a saved model: it has no config.json (expected a folder written by "
                         f"{MADE_BY})")
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise UsageError(f"{config_file} is not readable JSON: {error}") from error
    model_type = config.get("model_type") if isinstance(config, dict) else None
    if model_type != "nanoebm":
        raise UsageError(f"{str(path)!r} holds a {model_type!r} model, not a nanoebm one (energies and thinking are "
                         "nanoebm's)")
    if not (folder / "vocab.json").is_file():
        raise UsageError(f"{folder / 'vocab.json'} is missing: {str(path)!r} has no character tokenizer. Save it with "
                         f"the model (tokenizer.save_pretrained), or retrain (run_train.py saves both)")
    weights = next((folder / name for name in WEIGHTS_FILES if (folder / name).is_file()), None)
    if weights is None:
        raise UsageError(f"{folder / 'model.safetensors'} is missing: {str(path)!r} has a config.json but no weights. "
                         f"Save the model again with save_pretrained (run_train.py writes model.safetensors when it "
                         f"finishes), or retrain it")
    return folder, config, weights


@contextmanager
def loading(folder: Path, weights: Path | None = None):
    """Around from_pretrained: the ways a folder fails to load, as one one-line UsageError naming the file.

    With `weights` (loading the model), safetensors reports a damaged file as SafetensorError, torch a damaged
    pytorch_model.bin as UnpicklingError, EOFError or RuntimeError (which transformers also raises for tensors whose
    shapes disagree with config.json); without it (loading the tokenizer) only the general failures apply: OSError,
    ValueError and the like, from transformers or the folder's own code."""
    from safetensors import SafetensorError

    def short(error):
        text = " ".join(str(error).split())
        return text if len(text) <= 300 else text[:297] + "..."

    try:
        yield
    except (SafetensorError, pickle.UnpicklingError, EOFError, RuntimeError) as error:
        if weights is None:
            raise
        damaged = f"a shard listed in {weights}" if weights.name.endswith(".index.json") else str(weights)
        if isinstance(error, SafetensorError):  # empty, truncated, random bytes, a bad header
            raise UsageError(f"{damaged} is damaged and cannot be read ({short(error)}): the file is truncated or "
                             f"not a safetensors file; {REDO}") from error
        if isinstance(error, RuntimeError):  # a damaged .bin zip archive, or tensors of other shapes than config.json
            raise UsageError(f"could not load the weights in {damaged}: {short(error)}; check that they belong to "
                             f"its config.json, or {REDO}") from error
        raise UsageError(f"{damaged} is damaged and cannot be read ({short(error)}); {REDO}") from error
    except (OSError, ValueError, ImportError, KeyError, TypeError, AttributeError) as error:
        what = "model" if weights is not None else "tokenizer"
        raise UsageError(f"could not load the {what} in {str(folder)!r}: {short(error)}") from error


def checkpoints_in(folder: Path):
    """A run folder's checkpoint folders (in its checkpoints/, or beside its files), oldest first."""
    found = [*(folder / CHECKPOINTS).glob("checkpoint-*"), *folder.glob("checkpoint-*")]
    return sorted(found, key=lambda p: int(p.name.split("-")[-1]) if p.name.split("-")[-1].isdigit() else -1)


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


def finish_folder(work_dir: Path, final_dir: Path, keep_checkpoints: bool) -> str:
    """After a finished run's files are in `work_dir`: the checkpoints go unless kept; then `work_dir` becomes
    `final_dir` if it is not (`writing_dir`). Returns what the summary says of the checkpoints."""
    if keep_checkpoints:
        kept = f"kept in {final_dir / CHECKPOINTS}/ (--resume_from_checkpoint DIR resumes one exactly)"
    else:
        shutil.rmtree(work_dir / CHECKPOINTS, ignore_errors=True)
        kept = "removed (--keep_checkpoints true keeps them)"
    if work_dir != final_dir:
        replace_folder(final_dir, work_dir)
    return kept


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
