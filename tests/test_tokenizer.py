"""CharTokenizer: exact round trip, nanoGPT vocabulary, strict unknown handling, the dedicated pad token, save/load."""

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
from tokenization_char import PAD_TOKEN, CharTokenizer  # noqa: E402

SMALL_TEXT = "Hello, world!\nHi there. ab cd"


@pytest.fixture(scope="module")
def corpus(corpus_text) -> str:
    return corpus_text


@pytest.fixture(scope="module")
def tok(corpus) -> CharTokenizer:
    return CharTokenizer.from_corpus(corpus)


@pytest.fixture
def small() -> CharTokenizer:
    # Same construction as the corpus tokenizer, without needing the corpus.
    return CharTokenizer.from_corpus(SMALL_TEXT)


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
    assert tok.vocab_size == len(chars) == 65  # characters only: the model's config.vocab_size
    assert len(tok) == 66 and tok.pad_token_id == 65  # plus the pad token, just outside the characters
    assert tok.get_vocab() == {**{c: i for i, c in enumerate(chars)}, PAD_TOKEN: 65}
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
    assert small.special_tokens_map == {"pad_token": PAD_TOKEN}
    assert small.unk_token is None
    assert "token_type_ids" not in with_special


def test_tensors_and_len(small):
    enc = small(["Hello", "world"], return_tensors="pt")
    assert enc["input_ids"].dtype == torch.long and enc["input_ids"].shape == (2, 5)
    assert small.batch_decode(enc["input_ids"]) == ["Hello", "world"]
    assert small.decode(enc["input_ids"][0]) == "Hello"
    assert small.vocab_size == len(set(SMALL_TEXT))
    assert len(small) == small.vocab_size + 1  # the pad token


def test_out_of_range_id_raises(small):
    with pytest.raises(ValueError, match="outside the vocabulary"):
        small.decode([len(small)])  # one past the pad id
    with pytest.raises(ValueError, match="outside the vocabulary"):
        small.decode([0, len(small)])
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
    tok = CharTokenizer.from_chars(small.convert_ids_to_tokens(list(range(small.vocab_size))), unk_token=" ")
    assert len(tok) == len(small)  # the unk token is an existing character, not a new id
    assert tok.unk_token_id == tok.convert_tokens_to_ids(" ")
    ids = tok("Hé wörld")["input_ids"]
    assert tok.decode(ids) == "H  w rld"
    # A special token that is a character is still text: skipping special tokens keeps it.
    assert tok.decode(ids, skip_special_tokens=True) == "H  w rld"
    assert tok.convert_tokens_to_ids("é") == tok.unk_token_id


def test_special_tokens_must_be_vocabulary_characters(small):
    chars = list(small.convert_ids_to_tokens(list(range(small.vocab_size))))
    with pytest.raises(ValueError, match="not a character of the vocabulary"):
        CharTokenizer.from_chars(chars, unk_token="<unk>")
    with pytest.raises(ValueError, match="not a character of the vocabulary"):
        CharTokenizer.from_chars(chars, unk_token=PAD_TOKEN)  # reserved for padding
    with pytest.raises(ValueError, match="always pads with its dedicated"):
        CharTokenizer.from_chars(chars, pad_token="[PAD]")


# ---------------------------------------------------------------- padding


def test_dedicated_pad_token_by_default(small):
    n = small.vocab_size
    assert (small.pad_token, small.pad_token_id, small.padding_side) == (PAD_TOKEN, n, "left")
    assert small.all_special_ids == [n]
    # from_chars and the vocab= constructor get it too
    chars = small.convert_ids_to_tokens(list(range(n)))
    assert CharTokenizer.from_chars(chars).pad_token_id == n
    assert CharTokenizer(vocab={c: i for i, c in enumerate(chars)}).pad_token_id == n
    # get_vocab() (which lists the pad token) builds the same tokenizer back
    assert CharTokenizer(vocab=small.get_vocab()).get_vocab() == small.get_vocab()
    with pytest.raises(ValueError, match="pad token"):
        CharTokenizer(vocab={"a": 0, "b": 1, PAD_TOKEN: 5})


def test_left_padding_with_the_pad_id(small):
    enc = small(["Hi", "Hello"], padding=True, return_tensors="pt")
    pad = small.pad_token_id
    assert pad == small.vocab_size
    assert enc["input_ids"].tolist()[0] == [pad, pad, pad] + small.encode("Hi")
    assert enc["input_ids"].tolist()[1] == small.encode("Hello")
    assert enc["attention_mask"].tolist() == [[0, 0, 0, 1, 1], [1, 1, 1, 1, 1]]
    assert small.decode(enc["input_ids"][0]) == "<pad><pad><pad>Hi"
    assert small.batch_decode(enc["input_ids"], skip_special_tokens=True) == ["Hi", "Hello"]
    # Call-time and construction-time padding side work too.
    right = small(["Hi", "Hello"], padding=True, padding_side="right")
    assert right["input_ids"][0] == small.encode("Hi") + [pad] * 3
    assert right["attention_mask"][0] == [1, 1, 0, 0, 0]
    chars = small.convert_ids_to_tokens(list(range(small.vocab_size)))
    right_by_default = CharTokenizer.from_chars(chars, padding_side="right")
    assert right_by_default(["Hi", "Hello"], padding=True)["input_ids"][0][-1] == pad


def test_skip_special_tokens_drops_only_padding(small):
    text = "Hi there, ab cd "
    ids = small(text)["input_ids"]
    pad = small.pad_token_id
    assert small.decode([pad, pad] + ids, skip_special_tokens=True) == text  # spaces kept
    assert small.decode(ids, skip_special_tokens=True) == text
    assert small.decode([pad]) == PAD_TOKEN and small.convert_ids_to_tokens(pad) == PAD_TOKEN
    assert small.decode([pad] + ids) == PAD_TOKEN + text


def test_pad_token_text_is_never_the_pad_id():
    tok = CharTokenizer.from_corpus("<pad> and <p a d> b")
    pad = tok.pad_token_id
    assert pad == tok.vocab_size == len(set("<pad> and <p a d> b"))
    for text in ["<pad>", "a<pad>b", "<pad><pad>", "<<pad>>"]:
        ids = tok(text)["input_ids"]
        assert pad not in ids and len(ids) == len(text)
        assert ids == [tok.get_vocab()[c] for c in text]
        assert tok.decode(ids) == tok.decode(ids, skip_special_tokens=True) == text
        assert tok.encode(text) == ids and tok.tokenize(text) == list(text)
    assert tok.convert_tokens_to_ids(PAD_TOKEN) == pad  # the token itself (not text) still names the id
    # Splitting on multi-character added tokens must not match it either, even right between two of them.
    tok.add_tokens(["an", "d"])
    an = tok.convert_tokens_to_ids("an")
    assert an == pad + 1  # added after the pad token, never on top of it
    ids = tok("an<pad>an")["input_ids"]
    assert ids == [an] + [tok.get_vocab()[c] for c in "<pad>"] + [an]
    assert tok.decode(ids) == "an<pad>an"


def test_pad_token_text_without_angle_brackets_is_unknown(small):
    # "<" and ">" are not characters of this vocabulary: "<pad>" is then unknown text, not padding.
    with pytest.raises(ValueError, match="outside the"):
        small("Hi <pad>")


def test_legacy_character_pad_token_is_replaced(small, caplog):
    chars = small.convert_ids_to_tokens(list(range(small.vocab_size)))
    with caplog.at_level("WARNING"):
        tok = CharTokenizer.from_chars(chars, pad_token=" ", padding_side="left")
    assert "vocabulary character" in caplog.text
    assert (tok.pad_token, tok.pad_token_id, len(tok)) == (PAD_TOKEN, len(chars), len(chars) + 1)
    assert tok.decode(tok("Hi there")["input_ids"], skip_special_tokens=True) == "Hi there"


def test_padding_refuses_a_character_pad_set_later(small):
    tok = CharTokenizer.from_chars(small.convert_ids_to_tokens(list(range(small.vocab_size))))
    tok.pad_token = " "
    with pytest.raises(ValueError, match="dedicated"):
        tok(["Hi", "Hello"], padding=True)
    tok.pad_token = None
    with pytest.raises(ValueError, match="dedicated"):
        tok(["Hi", "Hello"], padding=True)
    assert tok(["Hi", "Hello"])["input_ids"][0] == small.encode("Hi")  # no padding asked: fine
    tok.pad_token = PAD_TOKEN
    assert tok(["Hi", "Hello"], padding=True)["input_ids"][0][0] == small.vocab_size


# ---------------------------------------------------------------- save / load


def characters(tok) -> dict:
    return {c: i for c, i in tok.get_vocab().items() if c != PAD_TOKEN}


def test_vocab_file_constructor(tmp_path, small):
    vocab = characters(small)
    path = tmp_path / "vocab.json"
    path.write_text(json.dumps(vocab), encoding="utf-8")
    tok = CharTokenizer(vocab_file=str(path))
    assert tok.get_vocab() == small.get_vocab() == {**vocab, PAD_TOKEN: len(vocab)}
    assert tok("Hello")["input_ids"] == small("Hello")["input_ids"]


def test_save_pretrained_round_trip(tmp_path, small, no_network):
    out = tmp_path / "tok"
    small.save_pretrained(out)
    assert {"vocab.json", "tokenizer_config.json", "tokenization_char.py", "tokenizer.json"} <= set(os.listdir(out))
    # vocab.json stays the character set; the pad token lives in tokenizer_config.json
    assert json.loads((out / "vocab.json").read_text(encoding="utf-8")) == characters(small)
    config = json.loads((out / "tokenizer_config.json").read_text(encoding="utf-8"))
    assert config["auto_map"]["AutoTokenizer"][0] == "tokenization_char.CharTokenizer"
    assert config["tokenizer_class"] == "TokenizersBackend"  # AutoTokenizer without trust_remote_code: the fast twin
    assert config["clean_up_tokenization_spaces"] is False
    assert config["pad_token"] == PAD_TOKEN
    assert config["added_tokens_decoder"][str(small.vocab_size)]["content"] == PAD_TOKEN

    loaded = CharTokenizer.from_pretrained(out)
    assert loaded.get_vocab() == small.get_vocab()
    assert (loaded.pad_token_id, loaded.padding_side, len(loaded)) == (small.vocab_size, "left", len(small))
    text = "Hi there,\n world. "
    assert loaded(text)["input_ids"] == small(text)["input_ids"]
    assert loaded.decode(loaded(text)["input_ids"]) == text
    assert loaded(["Hi", "Hello"], padding=True)["input_ids"] == small(["Hi", "Hello"], padding=True)["input_ids"]


def test_save_round_trip_keeps_opt_in_tokens(tmp_path, small):
    chars = list(characters(small))
    tok = CharTokenizer.from_chars(chars, unk_token=" ", padding_side="right")
    tok.save_pretrained(tmp_path)
    loaded = CharTokenizer.from_pretrained(tmp_path)
    assert (loaded.unk_token, loaded.pad_token, loaded.padding_side) == (" ", PAD_TOKEN, "right")
    assert len(loaded) == len(chars) + 1 and loaded.pad_token_id == len(chars)
    assert loaded("Hé")["input_ids"] == tok("Hé")["input_ids"]
    assert loaded.decode(loaded("Hé w")["input_ids"], skip_special_tokens=True) == "H  w"


@pytest.mark.parametrize("legacy", ["no_pad", "space_pad"])
def test_folders_saved_before_the_pad_token_load(tmp_path, small, legacy, caplog):
    """vocab.json + tokenizer_config.json as the tokenizer wrote them when it had no pad token by default."""
    vocab = characters(small)
    (tmp_path / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False, indent=0), encoding="utf-8")
    config = {
        "added_tokens_decoder": {}, "backend": "custom", "clean_up_tokenization_spaces": False,
        "model_max_length": 1000000000000000019884624838656, "pad_token": None, "tokenizer_class": "CharTokenizer",
        "unk_token": None,
    }
    if legacy == "space_pad":  # a legacy setting: pad_token=" ", padding_side="left" (and an unk character)
        special = dict(lstrip=False, normalized=False, rstrip=False, single_word=False, special=True)
        config["added_tokens_decoder"] = {
            str(vocab[" "]): {"content": " ", **special}, str(vocab["."]): {"content": ".", **special},
        }
        config.update(pad_token=" ", unk_token=".", padding_side="left")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")

    with caplog.at_level("WARNING"):
        tok = CharTokenizer.from_pretrained(tmp_path)
    assert ("vocabulary character" in caplog.text) == (legacy == "space_pad")
    n = len(vocab)
    assert characters(tok) == vocab  # character ids never change
    assert (tok.vocab_size, len(tok), tok.pad_token, tok.pad_token_id, tok.padding_side) == (
        n, n + 1, PAD_TOKEN, n, "left"
    )
    enc = tok(["Hi", "Hi there"], padding=True)
    assert enc["input_ids"][0] == [n] * 6 + small.encode("Hi")
    assert tok.batch_decode(enc["input_ids"], skip_special_tokens=True) == ["Hi", "Hi there"]
    # saving again writes the new format, which loads to the same tokenizer
    tok.save_pretrained(tmp_path / "again")
    again = CharTokenizer.from_pretrained(tmp_path / "again")
    assert again.get_vocab() == tok.get_vocab() and again.unk_token == tok.unk_token


@pytest.mark.slow
def test_autotokenizer_remote_code_in_clean_subprocess(tmp_path, small):
    """With trust_remote_code the folder's own CharTokenizer; without it the fast tokenizer of tokenizer.json, which
    needs no code from the folder. Both give CharTokenizer's ids, decoding and padding."""
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
        from transformers import AutoTokenizer, PreTrainedTokenizerFast
        results = []
        for trust in (True, None):
            tok = AutoTokenizer.from_pretrained({str(saved)!r}, trust_remote_code=trust)
            texts = {texts!r}
            results.append({{
                "cls": type(tok).__name__,
                "module": type(tok).__module__,
                "fast": isinstance(tok, PreTrainedTokenizerFast),
                "ids": [tok(t)["input_ids"] for t in texts],
                "decoded": [tok.decode(tok(t)["input_ids"]) for t in texts],
                "len": len(tok),
                "vocab_size": tok.vocab_size,
                "pad": [tok.pad_token, tok.pad_token_id, tok.padding_side],
                "padded": tok(["Hi", "Hello"], padding=True)["input_ids"],
                "skipped": tok.decode(tok(["Hi", "Hi there"], padding=True)["input_ids"][0], skip_special_tokens=True),
            }})
        print(json.dumps(results))
        """
    )
    workdir = tmp_path / "elsewhere"
    workdir.mkdir()
    proc = run_without_nanoebm(script, cwd=workdir, modules_cache=tmp_path / "modules", timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    remote, fast = json.loads(proc.stdout.strip().splitlines()[-1])
    assert (remote["cls"], remote["fast"]) == ("CharTokenizer", False)
    assert remote["module"].startswith("transformers_modules.")  # the copy saved in the folder
    assert fast["fast"] and fast["module"].startswith("transformers.")  # no code from the folder
    n = small.vocab_size
    for result in (remote, fast):
        assert result["ids"] == expected
        assert result["decoded"] == texts
        assert result["len"] == len(small) == small.vocab_size + 1
        assert result["vocab_size"] == small.vocab_size
        assert result["pad"] == [PAD_TOKEN, n, "left"]
        assert result["padded"] == small(["Hi", "Hello"], padding=True)["input_ids"]
        assert result["padded"][0] == [n, n, n] + small.encode("Hi")
        assert result["skipped"] == "Hi"


# -- the fast tokenizer: the same as CharTokenizer on any text -------------------------------------------------------

# a vocabulary with what tends to break character tokenizers: whitespace of every kind, combining marks, characters
# outside the BMP, the pieces of "<pad>", regex and JSON metacharacters
ODD_CHARACTERS = sorted(set(SMALL_TEXT) | set("\t\r\x0b\x0c\u00a0\u2028\u3000<>pad/\\\"'.*+?[](){}|^$")
                        | set("é\u0301中😀\x00"))


@pytest.fixture(scope="module")
def twins(tmp_path_factory):
    """CharTokenizer and the fast tokenizer AutoTokenizer loads from its folder (no trust_remote_code)."""
    from transformers import AutoTokenizer

    folder = tmp_path_factory.mktemp("twins")
    slow = CharTokenizer.from_chars(ODD_CHARACTERS)
    slow.save_pretrained(folder)
    return slow, AutoTokenizer.from_pretrained(folder)


def test_fast_tokenizer_equals_char_tokenizer_on_random_text(twins):
    from hypothesis import given, settings, strategies as st

    slow, fast = twins
    pieces = st.one_of(st.sampled_from(ODD_CHARACTERS), st.just(PAD_TOKEN), st.sampled_from([" " * 3, "\n\n", " \n "]))
    texts = st.lists(pieces, max_size=40).map("".join)

    @settings(max_examples=300, deadline=None, derandomize=True)
    @given(texts, texts, st.lists(st.integers(0, slow.vocab_size), max_size=30))
    def check(text, other, ids):
        assert fast(text)["input_ids"] == slow(text)["input_ids"]
        assert fast.decode(fast(text)["input_ids"]) == text
        batch = [text, other]
        assert fast(batch, padding=True)["input_ids"] == slow(batch, padding=True)["input_ids"]
        assert fast(batch, padding=True)["attention_mask"] == slow(batch, padding=True)["attention_mask"]
        for skip in (False, True):  # ids -> text, the pad (id vocab_size) among them
            assert fast.decode(ids, skip_special_tokens=skip) == slow.decode(ids, skip_special_tokens=skip)

    check()


def test_fast_tokenizer_refuses_unknown_characters_or_maps_them_to_unk(tmp_path, twins):
    from transformers import AutoTokenizer

    slow, fast = twins
    with pytest.raises(Exception, match="UNK|Missing"):
        fast("Hi \u2603")
    with pytest.raises(ValueError, match="outside"):
        slow("Hi \u2603")
    lossy = CharTokenizer.from_chars(ODD_CHARACTERS, unk_token=" ")
    lossy.save_pretrained(tmp_path)
    fast = AutoTokenizer.from_pretrained(tmp_path)
    ids = lossy("Hi \u2603 \u2603")["input_ids"]
    assert fast("Hi \u2603 \u2603")["input_ids"] == ids
    # the unk character stays text: skipping special tokens drops only the pad
    assert fast.decode(ids, skip_special_tokens=True) == lossy.decode(ids, skip_special_tokens=True) == "Hi    "
    assert CharTokenizer.from_pretrained(tmp_path).unk_token == " "


@pytest.mark.slow
def test_a_model_folders_tokenizer_loads_quietly_without_remote_code(tmp_path, small):
    """A model folder's config.json names custom code, so `AutoTokenizer.from_pretrained(folder)` without
    trust_remote_code first asks whether to run it (transformers asks for every such folder, and on a terminal waits)
    and, refused, warns about the model type. The README's load without remote code reads tokenizer.json alone:
    nothing printed, CharTokenizer's ids. An unknown character is refused, in the words `tokenizers` has (it cannot
    name the character or its position: CharTokenizer, with trust_remote_code=True, does)."""
    from conftest import make_model

    quiet = 'PreTrainedTokenizerFast.from_pretrained("out")'
    assert quiet in (REPO_ROOT / "README.md").read_text(encoding="utf-8")
    folder = tmp_path / "out"
    make_model(vocab_size=len(small)).save_pretrained(folder)
    small.save_pretrained(folder)
    script = textwrap.dedent(
        f"""
        import json, os
        os.environ["TRANSFORMERS_VERBOSITY"] = "warning"  # transformers' own warnings count here
        from transformers import PreTrainedTokenizerFast
        tok = {quiet}
        try:
            tok("Hi \\u2603")
            refusal = None
        except Exception as error:
            refusal = f"{{type(error).__name__}}: {{error}}"
        print(json.dumps({{"ids": tok({SMALL_TEXT!r})["input_ids"], "refusal": refusal, "pad": tok.pad_token_id}}))
        """
    )
    proc = run_without_nanoebm(script, cwd=tmp_path, modules_cache=tmp_path / "modules", timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stderr == "" and len(proc.stdout.splitlines()) == 1, proc.stdout + proc.stderr
    result = json.loads(proc.stdout)
    assert result["ids"] == small(SMALL_TEXT)["input_ids"] and result["pad"] == small.vocab_size
    assert result["refusal"] == "Exception: WordLevel error: Missing [UNK] token from the vocabulary"
