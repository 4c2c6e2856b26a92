"""Training state a checkpoint carries beyond the Trainer's own: tensors and integers in a safetensors file, never a
pickle.

Checkpoints travel between people and machines, and unpickling one runs whatever code it names. So the contrastive
particles, the replay buffer and their random generators are written as plain tensors (a generator's state is a
uint8 tensor) with their integers as JSON in the file's metadata, and read back only after every name, dtype and
shape matches what the run expects. Anything else (a pickle, a damaged or foreign file, a missing or extra tensor, a
wrong shape) is one StateFileError naming the file and what to do; nothing in it is executed.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from configuration_nanoebm import ordinary_file_modes
from nanoebm.cli import UsageError

FORMAT = "nanoebm-training-state"
VERSION = 1
REDO = ("resume from a checkpoint this version of nanoebm saved, or start the run again without "
        "--resume_from_checkpoint")


class StateFileError(UsageError):
    """A checkpoint's training-state file that cannot be resumed from (exit status 2 on the command line)."""


def save_state(path, kind: str, tensors: dict, ints: dict) -> None:
    """Write `tensors` (None values are left out) and the integers `ints` to `path` as safetensors."""
    from safetensors.torch import save_file

    header = {"format": FORMAT, "version": VERSION, "kind": kind, "ints": {k: int(v) for k, v in ints.items()}}
    present = {k: v.detach().cpu().contiguous() for k, v in tensors.items() if v is not None}
    with ordinary_file_modes(Path(path).parent):  # safetensors writes through a temporary file made 0600
        save_file(present, str(path), metadata={"nanoebm": json.dumps(header)})


def load_state(path, kind: str, spec: dict, ints: tuple[str, ...], optional: tuple[str, ...] = (),
               sizes: dict | None = None) -> dict:
    """The tensors and integers in `path`, checked against `spec` ({name: (dtype, shape)}) before use.

    A shape entry is an int (that size exactly) or a letter: a size given in `sizes`, or else one the file decides,
    the same wherever the letter recurs. Names in `optional` are absent together or present together. Returns
    {name: tensor or None, integer name: value}; raises StateFileError for anything else."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)

    def refuse(problem):
        return StateFileError(f"{path} cannot be resumed from: {problem}; {REDO}")

    try:
        with safe_open(str(path), framework="pt") as handle:
            header = _header(handle.metadata(), kind, refuse)
            names = set(handle.keys())
            missing = sorted(set(spec) - names - set(optional))
            extra = sorted(names - set(spec))
            if missing or extra or (names & set(optional) and not set(optional) <= names):
                raise refuse(f"it holds the tensors {sorted(names)}, expected {sorted(spec)}")
            sizes = dict(sizes or {})
            for name in sorted(names):
                _check_shape(name, list(handle.get_slice(name).get_shape()), spec[name][1], sizes, refuse)
            tensors = {name: handle.get_tensor(name) for name in sorted(names)}
    except (SafetensorError, OSError, ValueError, UnicodeDecodeError) as error:
        raise refuse(f"it is not a safetensors file nanoebm wrote ({' '.join(str(error).split())[:200]})") from None
    for name, tensor in tensors.items():
        if tensor.dtype != spec[name][0]:
            raise refuse(f"tensor {name!r} is {tensor.dtype}, expected {spec[name][0]}")
        if spec[name] == generator_state_spec():
            try:
                torch.Generator().set_state(tensor)
            except RuntimeError as error:
                raise refuse(f"tensor {name!r} is not a random generator's state ({error})") from None
    values = header.get("ints")
    if not isinstance(values, dict) or sorted(values) != sorted(ints) or \
            not all(type(values[k]) is int for k in ints):
        raise refuse(f"its integers are {values!r}, expected integer values for {sorted(ints)}")
    return {**{name: tensors.get(name) for name in spec}, **values}


def _header(metadata, kind, refuse) -> dict:
    try:
        header = json.loads((metadata or {})["nanoebm"])
    except (KeyError, TypeError, ValueError):
        raise refuse("it has no nanoebm header (not a training-state file nanoebm wrote)") from None
    if not isinstance(header, dict) or header.get("format") != FORMAT:
        raise refuse("it has no nanoebm header (not a training-state file nanoebm wrote)")
    if header.get("version") != VERSION:
        raise refuse(f"it is format version {header.get('version')!r}, this nanoebm reads version {VERSION}")
    if header.get("kind") != kind:
        raise refuse(f"it holds {header.get('kind')!r} state, expected {kind!r}")
    return header


def _check_shape(name, shape, expected, sizes, refuse) -> None:
    def fits(got, want):  # a letter takes the first size it meets and must meet it again
        return got == want if isinstance(want, int) else sizes.setdefault(want, got) == got

    if len(shape) != len(expected) or not all(fits(g, w) for g, w in zip(shape, expected, strict=True)):
        raise refuse(f"tensor {name!r} has shape {tuple(shape)}, expected {tuple(expected)}")


def generator_state_spec() -> tuple:
    """(dtype, shape) of a CPU torch.Generator's state."""
    return torch.uint8, tuple(torch.Generator().get_state().shape)
