"""bits_per_char evaluate metric: loaded by path with the network disabled, known values."""

import math
import os
import socket
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pytest
import torch

evaluate = pytest.importorskip("evaluate")

METRIC_DIR = Path(__file__).resolve().parents[1] / "nanoebm" / "metrics" / "bits_per_char"


@pytest.fixture(scope="module")
def bpc():
    # Loading must not touch the network: refuse any connection while evaluate.load runs.
    mp = pytest.MonkeyPatch()

    def refuse(*args, **kwargs):
        raise AssertionError(f"network access attempted: {args!r}")

    mp.setattr(socket.socket, "connect", refuse)
    mp.setattr(socket, "create_connection", refuse)
    mp.setattr(socket, "getaddrinfo", refuse)
    try:
        metric = evaluate.load(str(METRIC_DIR), keep_in_memory=True)
    finally:
        mp.undo()
    return metric


def test_loaded_from_local_folder(bpc):
    assert bpc.name == "bits_per_char"
    assert list(bpc.features) == ["nll"]


def test_one_bit_per_char(bpc):
    out = bpc.compute(nll=[math.log(2)] * 10)
    assert out["n_chars"] == 10
    assert out["nats_per_char"] == pytest.approx(math.log(2), rel=1e-6)
    assert out["bits_per_char"] == pytest.approx(1.0, rel=1e-6)
    assert out["perplexity"] == pytest.approx(2.0, rel=1e-6)


def test_uniform_over_vocab(bpc):
    # A model that is uniform over the 65 Shakespeare characters.
    out = bpc.compute(nll=[math.log(65)] * 7)
    assert out["bits_per_char"] == pytest.approx(math.log2(65), rel=1e-6)
    assert out["perplexity"] == pytest.approx(65.0, rel=1e-6)


def test_mean_over_characters_across_batches(bpc):
    bpc.add_batch(nll=torch.zeros(2, 3).flatten())  # 6 chars predicted with certainty
    bpc.add_batch(nll=np.full(2, 3 * math.log(2), dtype=np.float32))  # 2 chars at 3 bits each
    out = bpc.compute()
    assert out["n_chars"] == 8
    assert out["bits_per_char"] == pytest.approx(6 / 8, rel=1e-6)
    assert out["perplexity"] == pytest.approx(math.exp(6 * math.log(2) / 8), rel=1e-6)


def test_negative_nll_rejected(bpc):
    with pytest.raises(ValueError, match="log-probabilities"):
        bpc.compute(nll=[-1.0, 0.5])
