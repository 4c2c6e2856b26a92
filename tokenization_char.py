"""Character-level tokenizer for nanoebm (transformers 5 "slow"/pure-Python tokenizer).

The vocabulary is nanoGPT's: ``chars = sorted(set(text))`` and a character's id is its index.
For tiny Shakespeare that gives 65 ids with ``"\\n" -> 0`` and ``" " -> 1``.

Encoding is a bijection between strings over the vocabulary and id sequences, so
``tok.decode(tok(text)["input_ids"]) == text`` holds exactly: nothing is normalised, stripped,
cleaned up or inserted. Padding uses a dedicated ``"<pad>"`` token whose id is the number of characters,
just outside the character ids, so it can never be confused with text.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable

from transformers.tokenization_python import AddedToken, PythonBackend
from transformers.utils import PaddingStrategy, logging

try:  # inside a saved folder loaded with trust_remote_code (a package)
    from .configuration_nanoebm import ordinary_file_modes
except ImportError:  # from a checkout, as a top-level module
    from configuration_nanoebm import ordinary_file_modes

logger = logging.get_logger(__name__)

VOCAB_FILES_NAMES = {"vocab_file": "vocab.json"}
FAST_FILE = "tokenizer.json"
# What tokenizer_config.json names, so that AutoTokenizer without trust_remote_code loads tokenizer.json (with it,
# auto_map still picks CharTokenizer); split_special_tokens keeps the text "<pad>" five characters there.
FAST_CLASS = "TokenizersBackend"

# The dedicated padding token: its id is the number of characters, outside the model's vocabulary.
PAD_TOKEN = "<pad>"

# How many offending characters / positions an unknown-character error spells out.
_MAX_REPORTED = 10


class CharTokenizer(PythonBackend):
    """One token per character; ids are indices into the sorted character set of a corpus.

    Build it with ``CharTokenizer.from_corpus(text)``, ``CharTokenizer.from_chars(chars)`` or
    ``CharTokenizer(vocab_file="vocab.json")`` (a JSON ``{char: id}`` map with ids ``0..n-1``; a ``get_vocab()``,
    which also lists ``"<pad>": n``, is accepted too); ``save_pretrained`` / ``from_pretrained`` round-trip through
    ``vocab.json`` (the characters) + ``tokenizer_config.json`` (the pad token and the other settings).

    Design choices (and why):

    * **No special tokens are ever inserted.** The model is trained on raw character streams
      (nanoGPT style), so BOS/EOS would shift every id sequence; ``add_special_tokens`` is a no-op
      (the pad token below only ever appears as padding).
    * **Unknown characters raise** ``ValueError`` listing them and their positions. Silently mapping
      them to some id would corrupt training data and bits-per-char numbers. To opt in to lossy
      encoding pass ``unk_token=<a vocabulary character>`` (e.g. ``unk_token=" "``); unknown
      characters then encode to that character's id (and decode as it).
    * **A dedicated pad token, always present.** ``"<pad>"`` gets the id ``vocab_size`` (the number of
      characters), one past the last character, so ``len(tok) == tok.vocab_size + 1`` while
      ``tok.vocab_size`` (and the model's ``config.vocab_size``) counts characters only. The model
      accepts that id wherever ``attention_mask == 0``. Padding is on the left by default, as
      decoder-only generation needs (``padding_side="right"`` still works per call or at construction).
      The pad token is never matched in text: the five characters ``"<pad>"`` inside a string encode
      as five characters (it exists only as an id, made by padding). ``decode`` shows it as ``"<pad>"``,
      and ``decode(..., skip_special_tokens=True)`` (what ``pipeline("text-generation")`` uses) drops
      only ids outside the character vocabulary -- the padding -- and never a character.
      ``pad_token`` can only be ``"<pad>"`` (or None, which means it): a character as the pad,
      ``pad_token=<a vocabulary character>`` (e.g. ``" "``, found in some saved folders), would make that character
      special, so skipping special tokens would delete every occurrence of it; such a value logs a warning and
      ``"<pad>"`` is used.
    * Every other special token (``unk_token``, ...) must be an existing vocabulary character; anything
      else raises instead of growing the vocabulary.
    * ``clean_up_tokenization`` is a no-op so spaces before punctuation survive decoding whatever
      ``clean_up_tokenization_spaces`` says.
    """

    vocab_files_names = VOCAB_FILES_NAMES
    model_input_names = ["input_ids", "attention_mask"]
    padding_side = "left"

    def __init__(
        self,
        vocab_file: str | os.PathLike | None = None,
        unk_token: str | None = None,
        pad_token: str | None = PAD_TOKEN,
        *,
        vocab: dict[str, int] | None = None,
        unk_character: str | None = None,
        **kwargs,
    ):
        if (vocab_file is None) == (vocab is None):
            raise ValueError(
                "CharTokenizer needs exactly one of `vocab_file` (path to vocab.json) or `vocab` "
                "({char: id}); use CharTokenizer.from_corpus(text) to build one from a corpus."
            )
        if vocab is None:
            with open(vocab_file, encoding="utf-8") as f:
                vocab = json.load(f)
        self._vocab = self._validate_vocab(vocab)
        self._id_to_char = {i: c for c, i in self._vocab.items()}

        self._check_pad_token(pad_token)
        # a saved folder keeps a vocabulary character used as unk_token as unk_character (see _save_pretrained)
        kwargs["unk_token"] = unk_token if unk_token is not None else unk_character
        kwargs["pad_token"] = PAD_TOKEN
        kwargs["added_tokens_decoder"] = self._with_pad_token(kwargs.get("added_tokens_decoder"))
        self._check_special_tokens_in_vocab(kwargs)
        # Character streams get no BOS/EOS/CLS/SEP, and decoding must never rewrite spaces.
        kwargs["special_tokens_pattern"] = "none"
        kwargs["clean_up_tokenization_spaces"] = False
        # Loading bookkeeping that from_pretrained injects; not worth persisting on the next save.
        kwargs.pop("is_local", None)
        kwargs.pop("local_files_only", None)
        super().__init__(**kwargs)

    # ------------------------------------------------------------------ constructors

    @classmethod
    def from_chars(cls, chars: Iterable[str], **kwargs) -> CharTokenizer:
        """Tokenizer whose id ``i`` is ``chars[i]`` (order kept; chars must be distinct single characters)."""
        chars = list(chars)
        return cls(vocab={c: i for i, c in enumerate(chars)}, **kwargs)

    @classmethod
    def from_corpus(cls, text: str, **kwargs) -> CharTokenizer:
        """nanoGPT vocabulary of ``text``: ``sorted(set(text))``, id = index."""
        if not text:
            raise ValueError("Cannot build a character vocabulary from an empty corpus.")
        return cls.from_chars(sorted(set(text)), **kwargs)

    # ------------------------------------------------------------------ validation helpers

    @staticmethod
    def _validate_vocab(vocab: dict[str, int]) -> dict[str, int]:
        if not isinstance(vocab, dict) or not vocab:
            raise ValueError("vocab must be a non-empty {char: id} mapping.")
        if PAD_TOKEN in vocab:  # e.g. another tokenizer's get_vocab(): the pad token is not a character
            vocab = dict(vocab)
            if vocab.pop(PAD_TOKEN) != len(vocab):
                raise ValueError(
                    f"vocab: the pad token {PAD_TOKEN!r} can only have id {len(vocab)} (the number of characters)."
                )
        bad = [c for c in vocab if not (isinstance(c, str) and len(c) == 1)]
        if bad:
            raise ValueError(f"vocab keys must be single characters; got {bad[:_MAX_REPORTED]!r}.")
        ids = sorted(vocab.values())
        if ids != list(range(len(vocab))):
            raise ValueError(f"vocab ids must be exactly 0..{len(vocab) - 1} with no gaps or duplicates.")
        return {c: int(i) for c, i in sorted(vocab.items(), key=lambda kv: kv[1])}

    def _check_pad_token(self, pad_token) -> None:
        if pad_token is None or str(pad_token) == PAD_TOKEN:
            return  # None ("pad_token": null in a saved tokenizer_config.json) means the dedicated pad token too
        if str(pad_token) in self._vocab:
            logger.warning(
                f"{type(self).__name__}: pad_token={str(pad_token)!r} is a vocabulary character; padding now uses the "
                f"dedicated {PAD_TOKEN!r} token (id {self.vocab_size}, outside the character ids) instead, so "
                f"{str(pad_token)!r} stays ordinary text (skip_special_tokens=True would otherwise delete it)."
            )
            return
        raise ValueError(
            f"pad_token={str(pad_token)!r}: {type(self).__name__} always pads with its dedicated {PAD_TOKEN!r} token "
            f"(id = vocab_size = {self.vocab_size}); leave pad_token out."
        )

    def _with_pad_token(self, added_tokens_decoder: dict | None) -> dict:
        """`added_tokens_decoder` with the pad token in it, at id `vocab_size` unless a saved one says otherwise.

        Entries that are plain characters are dropped: they change nothing for a character tokenizer, and the
        special ones among them (unk) are re-added from the named attributes. What stays is the pad token and
        multi-character tokens added with add_tokens(); the characters keep their vocab.json ids regardless.
        """
        added = {
            int(i): t for i, t in (added_tokens_decoder or {}).items() if str(t) not in self._vocab
        }
        if PAD_TOKEN not in {str(t) for t in added.values()}:
            pad_id = self.vocab_size if self.vocab_size not in added else max(added) + 1
            added[pad_id] = AddedToken(PAD_TOKEN, lstrip=False, rstrip=False, normalized=False, special=True)
        return added

    def _check_special_tokens_in_vocab(self, kwargs: dict) -> None:
        # Tokens explicitly added earlier with add_tokens()/add_special_tokens() come back from
        # from_pretrained() in `added_tokens_decoder`; those are legitimate too.
        known = set(self._vocab) | {str(t) for t in (kwargs.get("added_tokens_decoder") or {}).values()}
        known.discard(PAD_TOKEN)  # the pad token is reserved for padding
        names = [n for n in self.SPECIAL_TOKENS_ATTRIBUTES if n != "pad_token"]
        candidates = [(n, kwargs.get(n)) for n in names]
        extra = kwargs.get("extra_special_tokens") or kwargs.get("additional_special_tokens") or []
        if isinstance(extra, dict):
            candidates += list(extra.items())
        else:
            candidates += [("extra_special_tokens", t) for t in extra]
        for name, value in candidates:
            if value is not None and str(value) not in known:
                raise ValueError(
                    f"{name}={str(value)!r} is not a character of the vocabulary. CharTokenizer never grows "
                    f"its vocabulary (the model's embedding size is fixed); pick an existing character, "
                    f"e.g. {name}=' '."
                )

    # ------------------------------------------------------------------ vocabulary

    @property
    def vocab_size(self) -> int:
        return len(self._vocab)

    def get_vocab(self) -> dict[str, int]:
        return {**self._vocab, **self._added_tokens_encoder}

    # ------------------------------------------------------------------ encoding

    def _unknown_error(self, unknown: list[tuple[int, str]]) -> ValueError:
        distinct = list(dict.fromkeys(c for _, c in unknown))
        shown_chars = ", ".join(repr(c) for c in distinct[:_MAX_REPORTED])
        if len(distinct) > _MAX_REPORTED:
            shown_chars += f", ... ({len(distinct)} distinct)"
        shown_pos = ", ".join(f"{c!r}@{i}" for i, c in unknown[:_MAX_REPORTED])
        if len(unknown) > _MAX_REPORTED:
            shown_pos += f", ... ({len(unknown)} occurrences)"
        return ValueError(
            f"{type(self).__name__}: text contains characters outside the {self.vocab_size}-character "
            f"vocabulary: {shown_chars} (first positions: {shown_pos}). Clean the text, or opt in to "
            f"lossy encoding with unk_token=<a vocabulary character>, e.g. "
            f"{type(self).__name__}(..., unk_token=' ')."
        )

    def _simple_added_tokens(self) -> bool:
        # True when every added token is just a (special) vocabulary character or the pad token, the
        # normal case: then splitting on added tokens is a no-op and plain list(text) is the tokenization.
        return all(tok in self._vocab or tok == PAD_TOKEN for tok in self._added_tokens_encoder)

    def _update_trie(self, unique_no_split_tokens: list[str] | None = None):
        # The base class splits text on every added token; the pad token must never be matched in text.
        contents = [t.content for t in self._added_tokens_decoder.values()] + list(unique_no_split_tokens or [])
        for token in contents:
            if token != PAD_TOKEN and token not in self.tokens_trie._tokens:
                self.tokens_trie.add(token)

    def tokenize(self, text: str, **kwargs) -> list[str]:
        """Split ``text`` into characters; raise on (or map, with ``unk_token``) unknown characters.

        The pad token is never produced: ``"<pad>"`` in a text is five characters.
        """
        if not self._simple_added_tokens():
            # Multi-character tokens were added with add_tokens(): let the base class split on them. It keeps a
            # piece that equals a special token whole, and "<pad>" can be such a piece (between two added
            # tokens), so spell the pad token out again.
            tokens = [
                c for t in super().tokenize(text, **kwargs) for c in (list(t) if t == PAD_TOKEN else (t,))
            ]
        else:
            kwargs.pop("split_special_tokens", None)
            text, _ = self.prepare_for_tokenization(text, **kwargs)
            if set(text).issubset(self._vocab):  # fast path (the whole corpus takes ~50 ms)
                return list(text)
            tokens = list(text)
        known = (self._vocab.keys() | self._added_tokens_encoder.keys()) - {PAD_TOKEN}
        unknown, pos = [], 0
        for t in tokens:
            if t not in known:
                unknown.append((pos, t))
            pos += len(t)
        if not unknown:
            return tokens
        if self.unk_token is None:
            raise self._unknown_error(unknown)
        return [t if t in known else self.unk_token for t in tokens]

    def _tokenize(self, text: str, **kwargs) -> list[str]:
        return list(text)

    def _convert_token_to_id(self, token: str) -> int:
        idx = self._vocab.get(token)
        if idx is not None:
            return idx
        if self.unk_token is not None:
            return self._vocab[self.unk_token]
        raise self._unknown_error([(0, token)])

    def convert_tokens_to_ids(self, tokens: str | list[str]) -> int | list[int]:
        if isinstance(tokens, str):
            return self._convert_token_to_id_with_added_voc(tokens)
        vocab = self._vocab
        if not self._added_tokens_encoder or self._simple_added_tokens():
            # Fast path: added tokens are vocabulary characters with their own ids.
            try:
                return [vocab[t] for t in tokens]
            except KeyError:
                pass
        return [self._convert_token_to_id_with_added_voc(t) for t in tokens]

    def _get_padding_truncation_strategies(self, *args, **kwargs):
        if self.pad_token == PAD_TOKEN:
            return super()._get_padding_truncation_strategies(*args, **kwargs)
        # The pad token was unset or replaced after construction (e.g. tok.pad_token = " ").
        problem = (
            f"{type(self).__name__} pads with its dedicated {PAD_TOKEN!r} token (id {self.vocab_size}, outside the "
            f"character ids), but pad_token is now {self.pad_token!r}. Set tok.pad_token = {PAD_TOKEN!r}: a "
            "character used as padding is indistinguishable from text, and decode(..., skip_special_tokens=True) "
            "or pipeline('text-generation') would delete every occurrence of it."
        )
        try:
            strategies = super()._get_padding_truncation_strategies(*args, **kwargs)
        except ValueError as e:
            if "padding token" in str(e):
                raise ValueError(problem) from e
            raise
        if strategies[0] != PaddingStrategy.DO_NOT_PAD:
            raise ValueError(problem)
        return strategies

    # ------------------------------------------------------------------ decoding

    def _convert_id_to_token(self, index: int) -> str:
        char = self._id_to_char.get(int(index))
        if char is None:
            raise ValueError(f"id {index} is outside the vocabulary [0, {len(self)}).")
        return char

    def _skipped_ids(self) -> set[int]:
        # skip_special_tokens drops the padding (and any other special token outside the characters), never a
        # character: an unk_token such as " " is text too.
        return {i for i in self.all_special_ids if i not in self._id_to_char}

    def convert_ids_to_tokens(self, ids, skip_special_tokens: bool = False):
        if isinstance(ids, int):
            return super().convert_ids_to_tokens(ids)
        skip = self._skipped_ids() if skip_special_tokens else ()
        chars = self._id_to_char
        table = {**chars, **{i: t.content for i, t in self._added_tokens_decoder.items() if i not in chars}}
        try:
            return [table[i] for i in ids if i not in skip]
        except (KeyError, TypeError):  # out-of-range or unhashable ids: convert one by one, which says which
            return [self.convert_ids_to_tokens(int(i)) for i in ids if int(i) not in skip]

    def convert_tokens_to_string(self, tokens: list[str]) -> str:
        return "".join(tokens)

    def clean_up_tokenization(self, text: str) -> str:
        # Never rewrite " ," -> "," etc.: decoding must reproduce the text exactly.
        return text

    # ------------------------------------------------------------------ saving

    def backend_tokenizer(self):
        """The same tokenizer as a `tokenizers` model (what tokenizer.json holds): each character is one piece (a
        regex split isolating every code point, so spaces and newlines are never merged or stripped), looked up in a
        WordLevel vocabulary of the characters; the pad token is the one added token, at its own id; decoding fuses
        the pieces with nothing between them. An unknown character is refused, or maps to unk_token."""
        from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

        unk = self.unk_token if self.unk_token in self._vocab else None
        backend = Tokenizer(models.WordLevel(dict(self._vocab), unk_token=unk))
        backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
        backend.decoder = decoders.Fuse()
        added = sorted(self._added_tokens_decoder.items())
        backend.add_tokens([AddedToken(str(t), special=t.special, normalized=False) for i, t in added
                            if str(t) not in self._vocab])
        return backend

    def _save_pretrained(self, save_directory, file_names, legacy_format=None, filename_prefix=None):
        """vocab.json for CharTokenizer (what it loads from every saved folder), and tokenizer.json for every runtime
        that reads `tokenizers` files; tokenizer_config.json then names the fast class (FAST_CLASS)."""
        saved = super()._save_pretrained(save_directory, file_names, legacy_format, filename_prefix)
        prefix = f"{filename_prefix}-" if filename_prefix else ""
        fast_file = os.path.join(save_directory, prefix + FAST_FILE)
        self.backend_tokenizer().save(fast_file)
        config_file = os.path.join(save_directory, prefix + "tokenizer_config.json")
        with open(config_file, encoding="utf-8") as f:
            config = json.load(f)
        config.update(tokenizer_class=FAST_CLASS, split_special_tokens=True, padding_side=self.padding_side)
        # the fast class would make a special unk_token character special (skip_special_tokens would delete it): the
        # character is stored apart (tokenizer.json maps unknown characters to it), and only the pad stays special
        if config.get("unk_token") in self._vocab:
            config["unk_character"], config["unk_token"] = config["unk_token"], None
        config["added_tokens_decoder"] = {i: t for i, t in config.get("added_tokens_decoder", {}).items()
                                          if t["content"] not in self._vocab}
        with open(config_file, "w", encoding="utf-8") as f:
            f.write(json.dumps(config, indent=2, sort_keys=True, ensure_ascii=False) + "\n")
        return (*saved, fast_file)

    def save_pretrained(self, save_directory, *args, **kwargs):
        """The files written get the modes the umask gives, as the model's do (configuration_nanoebm.py)."""
        with ordinary_file_modes(save_directory):
            return super().save_pretrained(save_directory, *args, **kwargs)

    def save_vocabulary(self, save_directory: str, filename_prefix: str | None = None) -> tuple[str, ...]:
        if not os.path.isdir(save_directory):
            raise ValueError(f"Vocabulary path ({save_directory}) should be a directory.")
        prefix = f"{filename_prefix}-" if filename_prefix else ""
        path = os.path.join(save_directory, prefix + VOCAB_FILES_NAMES["vocab_file"])
        with open(path, "w", encoding="utf-8") as f:
            # Keys in id order so the file reads like the sorted character set.
            json.dump(self._vocab, f, ensure_ascii=False, indent=0)
            f.write("\n")
        return (path,)


# Makes save_pretrained() write auto_map {"AutoTokenizer": ["tokenization_char.CharTokenizer", null]}
# and copy this file next to it, so AutoTokenizer.from_pretrained(dir, trust_remote_code=True) works.
CharTokenizer.register_for_auto_class("AutoTokenizer")
