"""Saved model folders: the check every command makes before it reads or writes anything, and one message for each
way a folder can be wrong (run_train.py continues from one, run_generate.py samples from one; neither shows the
user a traceback for a bad folder)."""

import json
import pickle
from contextlib import contextmanager
from pathlib import Path

from nanoebm.cli import UsageError

WEIGHTS_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                 "pytorch_model.bin.index.json")
MADE_BY = "save_pretrained (run_train.py writes such a folder)"
REDO = "save the model again with save_pretrained, or retrain it (run_train.py)"


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
