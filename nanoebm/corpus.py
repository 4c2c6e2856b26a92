"""The training text: the embedded tiny Shakespeare, validation blocks, and the bits-per-character metric."""

from __future__ import annotations

import os
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent
CORPUS_FILE = "tinyshakespeare.txt"
EMBEDDED_CORPUS = PACKAGE / "data" / CORPUS_FILE  # public domain, 1,115,394 characters; ships in the wheel
METRIC_DIR = PACKAGE / "metrics" / "bits_per_char"


def resolve_data_path(path: str | os.PathLike | None = None) -> Path:
    """The training corpus: `path` (the `--data_path` flag), else `$NANOEBM_DATA`, else the embedded tiny
    Shakespeare. A folder stands for the tiny Shakespeare file inside it. A path given explicitly must exist: it is
    never silently replaced by the default (FileNotFoundError naming it)."""
    for value, source in ((path, "--data_path"), (os.environ.get("NANOEBM_DATA"), "NANOEBM_DATA")):
        if value is None or str(value) == "":
            continue
        candidate = Path(value).expanduser()
        if candidate.is_dir():
            candidate = candidate / CORPUS_FILE
        if candidate.is_file():
            return candidate
        raise FileNotFoundError(
            f"{source}={str(value)!r}: no such text file ({candidate}); give an existing UTF-8 text file, or unset "
            f"it to train on the embedded tiny Shakespeare"
        )
    if not EMBEDDED_CORPUS.is_file():  # only a broken installation lands here
        raise FileNotFoundError(f"the embedded corpus {EMBEDDED_CORPUS} is missing: reinstall nanoebm, or give "
                                f"--data_path")
    return EMBEDDED_CORPUS


def validation_text(text: str, train_fraction: float = 0.9) -> str:
    """The text after the training part (nanoGPT's split: the last 10%)."""
    return text[int(train_fraction * len(text)):]


def fixed_blocks(ids, block_size: int, n_blocks: int):
    """n evenly spaced blocks of block_size + 1 ids: the same validation set at every evaluation. `ids`: a tensor or
    a numpy array (a memory map: only the chosen windows are read)."""
    import numpy as np
    import torch

    last = len(ids) - block_size - 1
    if last < 0:
        raise ValueError(f"validation text ({len(ids)} chars) is shorter than one block ({block_size + 1})")
    # float64: float32 offsets past 2^24 round up beyond `last`, which would cut a large corpus's last window short
    starts = torch.linspace(0, last, min(n_blocks, last + 1), dtype=torch.float64).long()
    windows = [ids[s: s + block_size + 1] for s in starts.tolist()]
    return torch.stack([w.long() if torch.is_tensor(w) else torch.from_numpy(np.array(w, dtype=np.int64))
                        for w in windows])


_BPC = None


def load_bpc_metric():
    """The local `evaluate` module (the hub's perplexity metric would download a model)."""
    global _BPC
    if _BPC is None:
        import evaluate

        _BPC = evaluate.load(str(METRIC_DIR), keep_in_memory=True)
    return _BPC
