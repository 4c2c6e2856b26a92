"""CharTokenizer: exact round trip, nanoGPT vocabulary, strict unknown handling, padding, save/load."""

import json
import os
import socket
import sys
import textwrap
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from conftest import run_without_nanoebm  # noqa: E402
from nanoebm.corpus import EMBEDDED_CORPUS as CORPUS  # noqa: E402
from tokenization_char import CharTokenizer  # noqa: E402


@pytest.fixture(scope="module")
def corpus(corpus_text) -> str:
    return corpus_text


@pytest.fixture(scope="module")
def tok(corpus) -> CharTokenizer:
    return CharTokenizer.from_corpus(corpus)


@pytest.fixture
def small() -> CharTokenizer:
    # Same construction as the corpus tokenizer, without needing the corpus.
    return CharTokenizer.from_corpus("Hello, world!\nHi there. ab cd")


@pytest.fixture
def no_network(monkeypatch):
    """Fail loudly if anything tries to open a network connection."""

    def refuse(*args, **kwargs):
        raise AssertionError(f"network access attempted: {args!r}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)


# ---------------------------------------------------------------- vocabulary and round trip


def test_corpus_round_trip_and_nanogpt_vocab(corpus, tok):
    assert len(corpus) == 1_115_394
    chars = sorted(set(corpus))
    assert len(tok) == tok.vocab_size == len(chars) == 65
    assert tok.get_vocab() == {c: i for i, c in enumerate(chars)}
    assert tok.convert_tokens_to_ids("\n") == 0
    assert tok.convert_tokens_to_ids(" ") == 1

    ids = tok(corpus)["input_ids"]
    assert len(ids) == len(corpus)
    assert ids[:200] == [chars.index(c) for c in corpus[:200]]
    assert tok.decode(ids) == corpus
    assert tok.encode(corpus) == ids


def test_exact_whitespace_and_punctuation(small):
    text = "Hi , there .\n\n  Hello !\n"
    ids = small(text)["input_ids"]
    assert small.decode(ids) == text
    # Even an explicit request for the classic clean-up must not alter the text.
    assert small.decode(ids, clean_up_tokenization_spaces=True) == text
    assert small.batch_decode([ids, ids[:3]]) == [text, text[:3]]


def test_no_special_tokens_are_added(small):
    with_special = small("Hello", add_special_tokens=True)
    without = small("Hello", add_special_tokens=False)
    assert with_special["input_ids"] == without["input_ids"] == [small.convert_tokens_to_ids(c) for c in "Hello"]
    assert with_special["attention_mask"] == [1] * 5
    assert small.special_tokens_map == {}
    assert small.pad_token is None and small.unk_token is None
    assert "token_type_ids" not in with_special


def test_tensors_and_len(small):
    enc = small(["Hello", "world"], return_tensors="pt")
    assert enc["input_ids"].dtype == torch.long and enc["input_ids"].shape == (2, 5)
    assert small.batch_decode(enc["input_ids"]) == ["Hello", "world"]
    assert small.decode(enc["input_ids"][0]) == "Hello"
    assert len(small) == small.vocab_size == len(set("Hello, world!\nHi there. ab cd"))


def test_out_of_range_id_raises(small):
    with pytest.raises(ValueError, match="outside the vocabulary"):
        small.decode([len(small)])
    with pytest.raises(ValueError, match="outside the vocabulary"):
        small.decode([-1])


# ---------------------------------------------------------------- unknown characters


@pytest.mark.parametrize(
    "call",
    [
        lambda t, s: t(s),
        lambda t, s: t.encode(s),
        lambda t, s: t(["Hello", s]),
        lambda t, s: t([s], padding=False, return_tensors=None),
    ],
    ids=["call", "encode", "batch", "batch_of_one"],  # (transformers 5 removed batch_encode_plus)
)
def test_unknown_characters_raise_with_chars_and_positions(small, call):
    text = "Hé wörld"  # 'é' at 1, 'ö' at 4
    with pytest.raises(ValueError) as err:
        call(small, text)
    msg = str(err.value)
    assert repr("é") in msg and repr("ö") in msg
    assert "@1" in msg and "@4" in msg
    assert "unk_token" in msg


def test_unknown_characters_opt_in_unk(small):
    tok = CharTokenizer.from_chars(small.convert_ids_to_tokens(list(range(len(small)))), unk_token=" ")
    assert len(tok) == len(small)  # the unk token is an existing character, not a new id
    assert tok.unk_token_id == tok.convert_tokens_to_ids(" ")
    ids = tok("Hé wörld")["input_ids"]
    assert tok.decode(ids) == "H  w rld"
    assert tok.convert_tokens_to_ids("é") == tok.unk_token_id


def test_special_tokens_must_be_vocabulary_characters(small):
    chars = list(small.get_vocab())
    with pytest.raises(ValueError, match="not a character of the vocabulary"):
        CharTokenizer.from_chars(chars, unk_token="<unk>")
    with pytest.raises(ValueError, match="not a character of the vocabulary"):
        CharTokenizer.from_chars(chars, pad_token="é")


# ---------------------------------------------------------------- padding


def test_no_pad_token_by_default(small):
    with pytest.raises(ValueError, match="no pad token by default"):
        small(["Hi", "Hello"], padding=True)


def test_left_padding_with_opt_in_pad_token(small):
    chars = list(small.get_vocab())
    tok = CharTokenizer.from_chars(chars, pad_token=" ", padding_side="left")
    assert len(tok) == len(chars)
    enc = tok(["Hi", "Hello"], padding=True, return_tensors="pt")
    pad = tok.pad_token_id
    assert pad == chars.index(" ")
    assert enc["input_ids"].tolist()[0] == [pad, pad, pad] + tok.encode("Hi")
    assert enc["attention_mask"].tolist() == [[0, 0, 0, 1, 1], [1, 1, 1, 1, 1]]
    # Strip padding with the mask, not by id (the pad id is a real character).
    row = enc["input_ids"][0][enc["attention_mask"][0].bool()]
    assert tok.decode(row) == "Hi"
    # Call-time padding side works too.
    right = tok(["Hi", "Hello"], padding=True, padding_side="right")
    assert right["attention_mask"][0] == [1, 1, 0, 0, 0]


# ---------------------------------------------------------------- save / load


def test_vocab_file_constructor(tmp_path, small):
    vocab = small.get_vocab()
    path = tmp_path / "vocab.json"
    path.write_text(json.dumps(vocab), encoding="utf-8")
    tok = CharTokenizer(vocab_file=str(path))
    assert tok.get_vocab() == vocab
    assert tok("Hello")["input_ids"] == small("Hello")["input_ids"]


def test_save_pretrained_round_trip(tmp_path, small, no_network):
    out = tmp_path / "tok"
    small.save_pretrained(out)
    assert {"vocab.json", "tokenizer_config.json", "tokenization_char.py"} <= set(os.listdir(out))
    assert json.loads((out / "vocab.json").read_text(encoding="utf-8")) == small.get_vocab()
    config = json.loads((out / "tokenizer_config.json").read_text(encoding="utf-8"))
    assert config["auto_map"]["AutoTokenizer"][0] == "tokenization_char.CharTokenizer"
    assert config["tokenizer_class"] == "CharTokenizer"
    assert config["clean_up_tokenization_spaces"] is False

    loaded = CharTokenizer.from_pretrained(out)
    assert loaded.get_vocab() == small.get_vocab()
    text = "Hi there,\n world. "
    assert loaded(text)["input_ids"] == small(text)["input_ids"]
    assert loaded.decode(loaded(text)["input_ids"]) == text


def test_save_round_trip_keeps_opt_in_tokens(tmp_path, small):
    chars = list(small.get_vocab())
    tok = CharTokenizer.from_chars(chars, unk_token=" ", pad_token=".", padding_side="left")
    tok.save_pretrained(tmp_path)
    loaded = CharTokenizer.from_pretrained(tmp_path)
    assert (loaded.unk_token, loaded.pad_token, loaded.padding_side) == (" ", ".", "left")
    assert len(loaded) == len(chars)
    assert loaded("Hé")["input_ids"] == tok("Hé")["input_ids"]


def test_autotokenizer_remote_code_in_clean_subprocess(tmp_path, small):
    saved = tmp_path / "saved"
    small.save_pretrained(saved)
    texts = ["Hello, world!\n", "Hi there. ab cd", " \n\n "]
    expected = [small(t)["input_ids"] for t in texts]

    script = textwrap.dedent(
        f"""
        import json
        try:
            import tokenization_char
            raise SystemExit("the checkout leaked into this process")
        except ImportError:
            pass
        from transformers import AutoTokenizer
        tok = AutoTokenizer.from_pretrained({str(saved)!r}, trust_remote_code=True)
        texts = {texts!r}
        print(json.dumps({{
            "cls": type(tok).__name__,
            "module": type(tok).__module__,
            "ids": [tok(t)["input_ids"] for t in texts],
            "decoded": [tok.decode(tok(t)["input_ids"]) for t in texts],
            "len": len(tok),
        }}))
        """
    )
    workdir = tmp_path / "elsewhere"
    workdir.mkdir()
    proc = run_without_nanoebm(script, cwd=workdir, modules_cache=tmp_path / "modules", timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["cls"] == "CharTokenizer"
    assert result["module"].startswith("transformers_modules.")  # the copy saved in the folder
    assert result["ids"] == expected
    assert result["decoded"] == texts
    assert result["len"] == len(small)
