"""Shared fixtures: tiny configs, the corpus, and a tiny model trained for a few steps (real computation only)."""

import os
import sys
import tempfile
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("NANOEBM_CACHE", tempfile.mkdtemp(prefix="nanoebm-test-cache-"))  # prepared corpora, per session
# one thread per pytest-xdist worker (`make test` runs two: tiny models gain little from a second thread), else up
# to two
torch.set_num_threads(1 if os.environ.get("PYTEST_XDIST_WORKER") else min(2, torch.get_num_threads()))

from configuration_nanoebm import NanoEBMConfig  # noqa: E402
from modeling_nanoebm import NanoEBMForCausalLM  # noqa: E402
from nanoebm.corpus import EMBEDDED_CORPUS  # noqa: E402


@pytest.fixture(scope="session")
def corpus_text():
    """tiny Shakespeare, as it ships inside nanoebm (no flag, no network)."""
    return EMBEDDED_CORPUS.read_text(encoding="utf-8")


@pytest.fixture(scope="session")
def corpus_ids(corpus_text):
    """The first 30,000 characters as ids of the sorted character set (nanoGPT's vocabulary)."""
    chars = sorted(set(corpus_text))
    stoi = {c: i for i, c in enumerate(chars)}
    return torch.tensor([stoi[c] for c in corpus_text[:30000]])


@pytest.fixture(scope="module")
def loaded(model_dir):
    """The test module's saved `model_dir`, loaded as a user would: through the Auto classes, with its own code."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir, trust_remote_code=True).eval()


def run_cli(capsys, *argv):
    """run_generate.py in-process: (exit status, stdout, stderr)."""
    from run_generate import main

    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def tiny_config(**overrides):
    values = dict(vocab_size=65, block_size=32, n_layer=2, n_head=2, n_embd=32, dropout=0.0)
    values.update(overrides)
    return NanoEBMConfig(**values)


def make_model(seed=0, correction_scale=None, **overrides):
    torch.manual_seed(seed)
    model = NanoEBMForCausalLM(tiny_config(**overrides))
    if correction_scale is not None and hasattr(model.energy_head, "correction_scale"):
        with torch.no_grad():  # a fresh model has s = 0; a non-zero s makes the landscape really depend on p
            model.energy_head.correction_scale.fill_(correction_scale)
    return model


def train_briefly(model, ids, steps=40, lr=3e-3, seed=0):
    """A few AdamW steps of next-token CE on the refined logits: enough for a landscape with structure."""
    torch.manual_seed(seed)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    block = model.config.block_size
    for _ in range(steps):
        starts = torch.randint(0, ids.numel() - block - 1, (8,))
        batch = torch.stack([ids[s:s + block + 1] for s in starts.tolist()])
        loss = model(batch[:, :-1], shift_labels=batch[:, 1:]).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval()


# A process in which nanoebm is not importable, even when the checkout is pip-installed (CI installs it editable):
# the saved folder's own copies, loaded by trust_remote_code as transformers_modules.*, must be enough.
HIDE_NANOEBM = """
import importlib.abc, sys
class _NanoebmNotInstalled(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name in {"configuration_nanoebm", "modeling_nanoebm", "tokenization_char", "run_train", "run_generate"}:
            raise ModuleNotFoundError(f"No module named {name!r} (hidden: nanoebm is not installed here)")
sys.meta_path.insert(0, _NanoebmNotInstalled())
sys.path[:] = [p for p in sys.path if p not in ("", CHECKOUT)]
""".replace("CHECKOUT", repr(str(ROOT)))


def run_without_nanoebm(script, cwd, modules_cache, timeout=300):
    """Run `script` in a fresh interpreter, in `cwd`, with nanoebm hidden and the hub offline."""
    import subprocess

    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONSTARTUP")}
    env.update(HF_HUB_OFFLINE="1", HF_MODULES_CACHE=str(modules_cache), TRANSFORMERS_VERBOSITY="error")
    return subprocess.run([sys.executable, "-c", HIDE_NANOEBM + script], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)


def free_port():
    """A port no one listens on, for `accelerate launch --main_process_port` (two launches in a row may otherwise
    race for the default 29500 while the first one's socket closes)."""
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return str(probe.getsockname()[1])
