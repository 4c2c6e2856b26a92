"""The training data: a corpus read in chunks, prepared once into a memory-mapped file of token ids, and the two
data sets the Trainer draws blocks from (random windows of that map, or a stream sharded by rank and worker).

A corpus is never read whole into memory. Its first run streams it twice, in chunks of CHUNK_CHARS characters: once
for the character set (a new model's vocabulary), once to write the ids. Every later run, and every rank, maps the
ids file read-only, so the operating system's page cache holds one copy for all processes (docs/DESIGN.md, "Data").
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import random
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from nanoebm.cli import UsageError
from nanoebm.corpus import CORPUS_FILE, fixed_blocks, resolve_data_path

CHUNK_CHARS = 1 << 24  # 16 M characters: large enough for numpy to run at full speed, small enough to bound memory
CACHE_ENV = "NANOEBM_CACHE"
CACHE_FORMAT = 2  # bumped whenever the ids file or its sidecar changes meaning (2: the ids' block hashes)
CHECK_BLOCK, CHECK_BLOCKS = 1 << 16, 256  # each start checks 256 blocks of 64 KiB of the ids file: 16 MiB at most
MAX_REPORTED = 10
UNICODE = 0x110000


# ----------------------------------------------------------------------------------------------------------------
# Where the text comes from


@dataclass(frozen=True)
class Source:
    """A corpus: local text files (read in order, concatenated as they are), a `save_to_disk` data set, or a data set
    on the hub (rows joined, each followed by a newline)."""

    kind: str  # "files" | "saved" | "hub"
    where: str  # the file or folder given, or the hub name: what messages name
    files: tuple = ()
    config: str | None = None
    column: str = "text"


def is_saved_dataset(folder: Path) -> bool:
    return folder.is_dir() and any((folder / name).is_file() for name in ("state.json", "dataset_dict.json"))


def resolve_source(data_args) -> Source:
    """The corpus the flags name: --dataset_name (a save_to_disk folder or a hub name), else --data_path /
    $NANOEBM_DATA (a file, a folder of files, or a save_to_disk folder), else the embedded tiny Shakespeare."""
    column = data_args.text_column
    if data_args.dataset_name:
        local = Path(data_args.dataset_name).expanduser()
        kind = "saved" if is_saved_dataset(local) else "hub"
        where = str(local.resolve()) if kind == "saved" else data_args.dataset_name
        return Source(kind, where, config=data_args.dataset_config_name, column=column)
    given = data_args.data_path or os.environ.get("NANOEBM_DATA") or None
    folder = Path(given).expanduser() if given else None
    if folder is not None and is_saved_dataset(folder):
        return Source("saved", str(folder.resolve()), column=column)
    if folder is not None and folder.is_dir() and not (folder / CORPUS_FILE).is_file():
        files = tuple(sorted(p for p in folder.rglob("*") if p.is_file()
                             and not any(part.startswith(".") for part in p.relative_to(folder).parts)))
        if not files:
            raise ValueError(f"--data_path {given}: the folder holds no files; give a text file or a folder of them")
        return Source("files", str(folder), files=files, column=column)
    path = resolve_data_path(data_args.data_path)
    return Source("files", str(path), files=(path,), column=column)


def open_dataset(source: Source):
    """The `datasets` data set of a "saved" or "hub" source, its "train" split; the text column checked."""
    import datasets

    if source.kind == "saved":
        dataset = datasets.load_from_disk(source.where)
        if isinstance(dataset, datasets.DatasetDict):
            dataset = dataset["train"]
    else:
        dataset = datasets.load_dataset(source.where, source.config, split="train")
    return checked_column(dataset, source)


def checked_column(dataset, source: Source, columns=None):
    """`dataset`, if it has the text column; else one message listing the columns it has (`columns`, where the
    dataset cannot tell them: a stream's first row's)."""
    columns = dataset.column_names if columns is None else columns
    if columns is not None and source.column not in columns:
        shown = ", ".join(repr(c) for c in columns) or "none"
        raise ValueError(f"{source.where} has no column {source.column!r} (its columns: {shown}): name the one that "
                         f"holds the text with --text_column")
    return dataset


def joined_rows(rows) -> str:
    """A batch of a data set's rows as text: each row followed by a newline (how nanoebm reads every data set)."""
    return "".join(row + "\n" for row in rows)


def empty_corpus(source: Source) -> ValueError:
    return ValueError(f"{source.where} is empty: a corpus needs at least one block of text")


def datasets_stream(source: Source, num_shards: int = 64, held: int = 0):
    """The source as a streamed `datasets` IterableDataset of `num_shards` shards or more (64 divides evenly between 1,
    2, 4, ... 64 readers, so each reads whole shards): a saved data set cut into shards, text files into byte ranges
    (FILE_RANGE bytes or less, read at disk speed; datasets' line-by-line text loader managed ~3 M characters/s),
    a hub data set as the hub stores it. `held`: what validation holds out of a local source before it is divided
    (rows of a saved data set, bytes at the start of the first file), so no part reads it."""
    import datasets

    if source.kind == "hub":
        return checked_column(datasets.load_dataset(source.where, source.config, split="train", streaming=True),
                              source)
    if source.kind == "saved":
        dataset = open_dataset(source)
        dataset = dataset.select(range(held, len(dataset))) if held else dataset
        return dataset.to_iterable_dataset(num_shards=max(1, min(num_shards, len(dataset))))
    ranges = []
    for n, path in enumerate(source.files):
        start, size = (held if n == 0 else 0), path.stat().st_size
        count = max(-(-(size - start) // FILE_RANGE), 1)
        ranges += [(str(path), start + (size - start) * i // count, start + (size - start) * (i + 1) // count)
                   for i in range(count)]
    while len(ranges) % num_shards:  # whole shards per reader: halve the longest range until the count divides
        path, start, end = max(ranges, key=lambda r: r[2] - r[1])
        ranges.remove((path, start, end))
        ranges += [(path, start, (start + end) // 2), (path, (start + end) // 2, end)]
    return datasets.IterableDataset.from_generator(file_rows, gen_kwargs={"ranges": sorted(ranges)})


def head_lines(path: Path, chars: int) -> tuple[str, int]:
    """The first whole lines of a text file that hold at least `chars` characters, and the byte where the rest of the
    file starts (validation is held out there, before the file is divided between readers)."""
    lines, count = [], 0
    with open(path, "rb") as handle:
        while count < chars and (raw := handle.readline()):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as error:
                raise ValueError(f"--data_path {path} is not UTF-8 text ({error.reason}): convert it, e.g. "
                                 f"iconv -f latin1 -t utf-8") from None
            lines.append(line.replace("\r\n", "\n").replace("\r", "\n"))
            count += len(lines[-1])
        return "".join(lines), handle.tell()


FILE_RANGE, FILE_ROW = 1 << 23, 1 << 16


def file_rows(ranges):
    """Rows of about FILE_ROW bytes of text, each the lines that start inside one byte range [start, end) of a file,
    without the last newline (the stream adds one after every row): the ranges of a file cover every line once."""
    for path, start, end in ranges:
        with open(path, "rb") as handle:
            if start > 0:
                handle.seek(start - 1)
                handle.readline()  # the line that began before `start` belongs to the range before
            while handle.tell() < end:
                raw = handle.read(min(FILE_ROW, end - handle.tell()))
                if not raw.endswith(b"\n"):
                    raw += handle.readline()
                try:
                    text = raw.decode("utf-8")
                except UnicodeDecodeError as error:
                    raise ValueError(f"--data_path {path} is not UTF-8 text ({error.reason}): convert it, e.g. "
                                     f"iconv -f latin1 -t utf-8") from None
                text = text.replace("\r\n", "\n").replace("\r", "\n")  # as a file opened in text mode reads
                yield {"text": text[:-1] if text.endswith("\n") else text}


def text_chunks(source: Source, chunk_chars: int = CHUNK_CHARS):
    """The corpus as consecutive strings of about `chunk_chars` characters (never the whole text at once)."""
    if source.kind != "files":
        rows = max(1, chunk_chars // 1000)
        for batch in open_dataset(source).iter(batch_size=rows):
            yield joined_rows(batch[source.column])
        return
    for path in source.files:
        try:
            with open(path, encoding="utf-8") as handle:
                while chunk := handle.read(chunk_chars):
                    yield chunk
        except UnicodeDecodeError as error:
            raise ValueError(f"--data_path {path} is not UTF-8 text ({error.reason} at byte {error.start} of a "
                             f"chunk): convert it, e.g. iconv -f latin1 -t utf-8") from None
        except OSError as error:
            raise ValueError(f"--data_path {path} cannot be read ({error.strerror or error}): check its "
                             f"permissions") from None


def file_stats(paths) -> list:
    return [(str(Path(p).resolve()), Path(p).stat().st_size, Path(p).stat().st_mtime_ns) for p in paths]


def text_hash(source: Source) -> str:
    digest = hashlib.blake2b(digest_size=16)
    for chunk in text_chunks(source):
        digest.update(chunk.encode("utf-8"))
    return digest.hexdigest()


def fingerprint(source: Source) -> dict:
    """What identifies the corpus without reading it: the files' resolved paths, sizes and modification times; for a
    data set, those of the Arrow files it is read from (`cache_files`, datasets' public record of them). Checking it
    costs a stat per file. A data set held in memory (no Arrow file) is identified by a hash of its text column."""
    if source.kind == "files":
        return {"files": file_stats(source.files)}
    dataset = open_dataset(source)
    arrow = sorted(f["filename"] for f in dataset.cache_files)
    content = file_stats(arrow) if arrow else text_hash(source)
    return {"dataset": source.where, "config": source.config, "column": source.column, "arrow": content,
            "rows": len(dataset)}


# ----------------------------------------------------------------------------------------------------------------
# Characters to ids with a lookup table (numpy: ~100 M characters/s, the fast path of preparation and the stream)


def code_points(chunk: str) -> np.ndarray:
    """The chunk's characters as code points: uint8 for ASCII (one byte per character), else uint32."""
    raw = chunk.encode("utf-8")
    if len(raw) == len(chunk):
        return np.frombuffer(raw, dtype=np.uint8)
    return np.frombuffer(chunk.encode("utf-32-le"), dtype=np.uint32)


class CharTable:
    """Code point -> id for a character vocabulary; an unknown character raises (listing them) unless `unk_id`."""

    def __init__(self, chars, unk_id: int | None = None):
        self.chars, self.unk_id = list(chars), unk_id
        self.table = np.full(UNICODE, -1, dtype=np.int32)
        self.table[[ord(c) for c in self.chars]] = np.arange(len(self.chars), dtype=np.int32)
        self.dtype = np.uint8 if len(self.chars) <= 256 else np.uint16 if len(self.chars) <= 65536 else np.uint32
        # ASCII text under fewer than 255 characters: one uint8 -> uint8 lookup, 255 marking the unknown
        self.bytes = np.where(self.table[:256] < 0, 255, self.table[:256]).astype(np.uint8) \
            if len(self.chars) < 255 else None

    @classmethod
    def of(cls, tokenizer, unk_token: str | None = None):
        """The table of a character tokenizer (CharTokenizer or its fast twin): its characters in id order. Unknown
        characters map to `unk_token` (--unk_token: this run's choice, the saved tokenizer stays strict), else to the
        tokenizer's own unk_token if it has one, else stop the run with a message that lists them."""
        vocab = {t: i for t, i in tokenizer.get_vocab().items() if i < tokenizer.vocab_size}
        unk = tokenizer.unk_token_id if tokenizer.unk_token is not None else None
        if unk_token is not None:
            if unk_token not in vocab:
                raise ValueError(f"--unk_token {unk_token!r} is not a character of the model's {len(vocab)}-character "
                                 f"vocabulary: pick one of them, e.g. ' '")
            unk = vocab[unk_token]
        return cls(sorted(vocab, key=vocab.get), unk)

    def key(self) -> str:
        return hashlib.sha256(json.dumps([self.chars, self.unk_id]).encode()).hexdigest()[:16]

    def encode(self, chunk: str, offset: int = 0, what: str = "the corpus") -> np.ndarray:
        codes = code_points(chunk)
        if codes.dtype == np.uint8 and self.bytes is not None:
            ids = self.bytes[codes]
            if not (ids == 255).any():
                return ids
        ids = self.table[codes]
        unknown = ids < 0
        if unknown.any():
            if self.unk_id is None:
                raise self.unknown_error(codes, unknown, offset, what)
            ids[unknown] = self.unk_id
        return ids.astype(self.dtype)

    def unknown_error(self, codes, unknown, offset, what):
        distinct = [chr(c) for c in np.unique(codes[unknown])]
        first = np.flatnonzero(unknown)[:MAX_REPORTED] + offset
        shown = ", ".join(repr(c) for c in distinct[:MAX_REPORTED]) + (
            f", ... ({len(distinct)} distinct)" if len(distinct) > MAX_REPORTED else "")
        return ValueError(
            f"{what} has characters outside the model's {len(self.chars)}-character vocabulary: {shown} (first at "
            f"character {', '.join(map(str, first.tolist()))}); clean the text, or map them to a vocabulary "
            f"character with --unk_token (e.g. --unk_token ' ')")


def corpus_chars(source: Source, progress) -> tuple[list, int]:
    """The sorted character set of the corpus and its length, in one streaming pass."""
    seen, n = np.zeros(UNICODE, dtype=bool), 0
    for chunk in text_chunks(source):
        seen[code_points(chunk)] = True
        n += len(chunk)
        progress.update(len(chunk))
    return [chr(c) for c in np.flatnonzero(seen)], n


# ----------------------------------------------------------------------------------------------------------------
# The cache: <cache>/<corpus key>/chars.json and ids-<vocabulary key>.bin + .json


def cache_root(data_args) -> Path:
    """--data_cache_dir, else $NANOEBM_CACHE, else ~/.cache/nanoebm/data; one that cannot be written falls back to a
    folder in the system's temp dir (with a warning naming the flag), so a read-only home never stops a run."""
    wanted = data_args.data_cache_dir or os.environ.get(CACHE_ENV) or \
        Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "nanoebm" / "data"
    wanted = Path(wanted).expanduser()
    fallback = Path(tempfile.gettempdir()) / f"nanoebm-data-{os.getuid() if hasattr(os, 'getuid') else 'user'}"
    for folder in (wanted, fallback):
        try:
            folder.mkdir(parents=True, exist_ok=True, **({"mode": 0o700} if folder == fallback else {}))
            if folder == fallback:
                check_own(folder)
            with tempfile.TemporaryFile(dir=folder):
                pass
        except OSError as error:
            problem = f"the data cache folder {folder} cannot be written ({error.strerror or error})"
            continue
        if folder != wanted:
            from transformers.utils import logging

            logging.get_logger(__name__).warning(f"{problem}; using {folder} (point --data_cache_dir or ${CACHE_ENV} "
                                                 f"at a writable folder to keep the prepared ids)")
        return folder
    raise ValueError(f"{problem}: point --data_cache_dir or ${CACHE_ENV} at a writable folder")


def check_own(folder: Path):
    """OSError unless `folder` is this user's and no one else may write into it: the fallback lies in the shared temp
    dir, where another user could create it first and plant ids whose sidecar matches a corpus."""
    info = folder.stat()
    if hasattr(os, "getuid") and (info.st_uid != os.getuid() or info.st_mode & 0o022):
        raise OSError(f"it is not this user's own folder (owner uid {info.st_uid}, mode {oct(info.st_mode & 0o777)})")


def read_json(path: Path):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def write_atomically(path: Path, write):
    """Write through a temp file in the same folder, then rename: a reader sees the whole file or none."""
    handle = tempfile.NamedTemporaryFile(dir=path.parent, prefix=f".{path.name}.", delete=False)
    try:
        with handle:
            write(handle)
        os.replace(handle.name, path)
    except BaseException:
        Path(handle.name).unlink(missing_ok=True)
        raise


def block_hashes(content: bytes) -> str:
    """An 8-byte BLAKE2 hash of each CHECK_BLOCK bytes of `content` (the last block may be shorter), concatenated."""
    view = memoryview(content)
    return "".join(hashlib.blake2b(view[i: i + CHECK_BLOCK], digest_size=8).hexdigest()
                   for i in range(0, len(view), CHECK_BLOCK))


def checked_blocks(n: int) -> list:
    """Which of a file's `n` blocks a start checks: all of them up to CHECK_BLOCKS, else the first, the last and
    random others (a fresh draw each run, so damage anywhere is caught by some run, and one in a sampled block at
    once), so the check reads 16 MiB at most however large the file (under 0.1 s for 1 GB: docs/DESIGN.md)."""
    if n <= CHECK_BLOCKS:
        return list(range(n))
    return sorted({0, n - 1, *random.SystemRandom().sample(range(1, n - 1), CHECK_BLOCKS - 2)})


def ids_intact(path: Path, digests, warn: bool = False) -> bool:
    """Whether the sampled blocks of an ids file (of the size its sidecar records) hash as they did when it was
    written: a file damaged in place (a bad disk, a copy cut short and padded, another writer) is not trusted."""
    n = -(-path.stat().st_size // CHECK_BLOCK)
    if not isinstance(digests, str) or len(digests) != 16 * n:
        return False
    with open(path, "rb") as handle:
        for i in checked_blocks(n):
            handle.seek(i * CHECK_BLOCK)
            if hashlib.blake2b(handle.read(CHECK_BLOCK), digest_size=8).hexdigest() != digests[16 * i: 16 * i + 16]:
                if warn:
                    from transformers.utils import logging

                    logging.get_logger(__name__).warning(
                        f"the prepared ids {path} do not match the hashes recorded when they were written (block {i} "
                        f"of {n}): the file is damaged; preparing the corpus again")
                return False
    return True


@dataclass
class Prepared:
    """The prepared ids of a corpus, memory-mapped read-only, and the characters they index."""

    path: Path
    dtype: np.dtype
    length: int
    chars: list

    def ids(self) -> np.ndarray:
        return np.memmap(self.path, dtype=self.dtype, mode="r", shape=(self.length,))


def progress_bar(total, desc):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="char", unit_scale=True, disable=None, mininterval=1.0)  # tty only


def prepare(source: Source, tokenizer, data_args) -> Prepared:
    """The corpus's ids in the cache, prepared on first use; a cache whose sidecar does not match (another vocabulary,
    another corpus, a partial or damaged file) is never trusted: it is rebuilt."""
    folder = cache_root(data_args) / hashlib.sha256(json.dumps([CACHE_FORMAT, fingerprint(source)]).encode()
                                                     ).hexdigest()[:20]
    folder.mkdir(parents=True, exist_ok=True)
    if tokenizer is None:
        chars_file = folder / "chars.json"
        scanned = read_json(chars_file)
        if not (isinstance(scanned, dict) and isinstance(scanned.get("chars"), list)):
            with progress_bar(None, f"nanoebm: the characters of {source.where}") as bar:
                chars, n = corpus_chars(source, bar)
            scanned = {"chars": chars, "length": n}
            write_atomically(chars_file, lambda h: h.write(json.dumps(scanned, ensure_ascii=False).encode()))
        if not scanned["chars"]:
            raise empty_corpus(source)
        table = CharTable(scanned["chars"])
    else:
        table = CharTable.of(tokenizer, data_args.unk_token)
    ids_file, meta_file = folder / f"ids-{table.key()}.bin", folder / f"ids-{table.key()}.json"
    meta = read_json(meta_file)
    expected = {"format": CACHE_FORMAT, "chars": table.chars, "unk_id": table.unk_id,
                "dtype": np.dtype(table.dtype).name}
    if not (isinstance(meta, dict) and {k: meta.get(k) for k in expected} == expected and ids_file.is_file()
            and ids_file.stat().st_size == meta.get("length", -1) * np.dtype(table.dtype).itemsize
            and ids_intact(ids_file, meta.get("ids_blake2b"), warn=True)):
        meta = write_ids(source, table, ids_file, meta_file, expected)
    return Prepared(ids_file, np.dtype(table.dtype), meta["length"], table.chars)


def write_ids(source: Source, table: CharTable, ids_file: Path, meta_file: Path, expected: dict) -> dict:
    """Stream the corpus through the lookup table into `ids_file` (temp file, then rename), then the sidecar with the
    length, a BLAKE2 hash of the text (whose ids they are) and one of every CHECK_BLOCK bytes of the ids (what a
    later run samples to tell the file is whole: `ids_intact`)."""
    digest, length, blocks, pending = hashlib.blake2b(digest_size=16), 0, [], b""

    def write(handle):
        nonlocal length, pending
        with progress_bar(None, f"nanoebm: preparing {source.where}") as bar:
            for chunk in text_chunks(source):
                digest.update(chunk.encode("utf-8"))
                ids = table.encode(chunk, length, f"the corpus {source.where}").tobytes()
                handle.write(ids)
                pending += ids
                whole = len(pending) // CHECK_BLOCK * CHECK_BLOCK
                blocks.append(block_hashes(pending[:whole]))
                pending = pending[whole:]
                length += len(chunk)
                bar.update(len(chunk))
            blocks.append(block_hashes(pending))

    write_atomically(ids_file, write)
    if length == 0:
        ids_file.unlink(missing_ok=True)
        raise empty_corpus(source)
    meta = {**expected, "length": length, "text_blake2b": digest.hexdigest(), "ids_blake2b": "".join(blocks),
            "source": source.where}
    write_atomically(meta_file, lambda h: h.write(json.dumps(meta, ensure_ascii=False).encode()))
    return meta


# ----------------------------------------------------------------------------------------------------------------
# Random-offset blocks of the map, in an order that costs no memory


class RandomOffsetBlocks(torch.utils.data.Dataset):
    """Every offset of the training ids is one example: a shuffled epoch visits each window once, in random order
    (nanoGPT draws random offsets; fixed chunk boundaries would see block_size times fewer windows).

    `ids` is a numpy array or tensor, usually a read-only memory map (`Prepared.ids()`); `mapped` = (path, dtype,
    start) lets a pickled copy (a spawned data-loader worker) map the file again instead of carrying the ids."""

    def __init__(self, ids, block_size: int, mapped: tuple | None = None):
        self.ids = ids.numpy() if torch.is_tensor(ids) else ids
        self.block_size, self.mapped, self.length = block_size, mapped, len(ids)

    def __len__(self):
        return self.length - self.block_size

    def __getitem__(self, i):
        chunk = np.array(self.ids[i: i + self.block_size + 1], dtype=np.int64)  # numpy: the collator stacks it
        return {"input_ids": chunk[:-1], "shift_labels": chunk[1:]}

    def __getstate__(self):
        return {**self.__dict__, "ids": None} if self.mapped else self.__dict__

    def __setstate__(self, state):
        self.__dict__.update(state)
        if self.ids is None:
            path, dtype, start = self.mapped
            self.ids = np.memmap(path, dtype=dtype, mode="r", offset=start * np.dtype(dtype).itemsize,
                                 shape=(self.length,))

    def order(self, seed: int) -> WindowOrder:
        """The Trainer's sampler (RandomSampler would hold a list of every window: 3 GB for a 100 MB corpus)."""
        return WindowOrder(len(self), seed)


class WindowOrder(torch.utils.data.Sampler):
    """A seeded random permutation of range(n) in O(1) memory: a 4-round Feistel network over the smallest even power
    of two >= n, walking the cycle past values >= n. Every rank draws the same order from the same seed (accelerate
    then gives each rank its own batches of it); `set_epoch` changes it per epoch."""

    def __init__(self, n: int, seed: int, chunk: int = 1 << 16):
        self.n, self.seed, self.chunk, self.epoch = n, seed, chunk, 0
        self.half = max(1, (max(n - 1, 1).bit_length() + 1) // 2)

    def __len__(self):
        return self.n

    def set_epoch(self, epoch: int):
        self.epoch = epoch

    def permute(self, x: np.ndarray) -> np.ndarray:
        keys = np.random.default_rng([self.seed, self.epoch]).integers(1, 1 << 32, size=4, dtype=np.uint64)
        mask = np.uint64((1 << self.half) - 1)
        out = x.astype(np.uint64)
        todo = np.ones(len(out), dtype=bool)
        while todo.any():
            left, right = out[todo] >> np.uint64(self.half), out[todo] & mask
            for key in keys:
                mixed = (right * np.uint64(0x9E3779B97F4A7C15) + key) & np.uint64(0xFFFFFFFFFFFFFFFF)
                mixed ^= mixed >> np.uint64(29)
                left, right = right, left ^ (mixed & mask)
            out[todo] = (left << np.uint64(self.half)) | right
            todo = out >= np.uint64(self.n)
        return out.astype(np.int64)

    def __iter__(self):
        for start in range(0, self.n, self.chunk):
            yield from self.permute(np.arange(start, min(start + self.chunk, self.n))).tolist()


# ----------------------------------------------------------------------------------------------------------------
# The stream: each (rank, worker) reads its own part


def distributed_rank() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


class StreamBlocks(torch.utils.data.IterableDataset):
    """Consecutive blocks of a streamed data set, shuffled through a buffer (corpora larger than memory or disk).

    The rows are divided between world_size x num_workers parts with datasets' split_dataset_by_node (whole shards
    when their number divides evenly, else every part-th row), so each process and each data-loader worker reads and
    tokenizes its own rows and no other's. A part's rows are joined (each followed by a newline) and cut into blocks
    of block_size + 1 ids that overlap by one; the last partial block of each part is dropped. `shards_itself` tells
    the Trainer not to dispatch or shard it again (EBMTrainer.get_train_dataloader)."""

    shards_itself = True

    def __init__(self, open_stream, table: CharTable, block_size: int, column: str, seed: int = 0, skip_rows: int = 0,
                 buffer: int = 1000, rank: int | None = None, world_size: int | None = None, batch_rows: int = 64):
        self.open_stream, self.table, self.block_size, self.column = open_stream, table, block_size, column
        self.seed, self.skip_rows, self.buffer, self.batch_rows, self.epoch = seed, skip_rows, buffer, batch_rows, 0
        self.rank, self.world_size = (rank, world_size) if rank is not None else distributed_rank()

    def set_epoch(self, epoch: int):
        self.epoch = epoch

    def part(self):
        """This process's and this worker's rows: (stream, part index, number of parts)."""
        from datasets.distributed import split_dataset_by_node

        info = torch.utils.data.get_worker_info()
        workers, worker = (info.num_workers, info.id) if info is not None else (1, 0)
        index, parts = self.rank * workers + worker, self.world_size * workers
        stream = self.open_stream()
        if self.skip_rows:
            if parts > 1:
                from transformers.utils import logging

                logging.get_logger(__name__).warning_once(
                    f"validation holds out the first {self.skip_rows} rows of a hub stream read by {parts} processes "
                    f"x workers: datasets divides that skip between them, so some of those rows may be trained on "
                    f"(prepare the data set instead of streaming it, or validate on its own split)")
            stream = stream.skip(self.skip_rows)
        return (split_dataset_by_node(stream, rank=index, world_size=parts) if parts > 1 else stream), index, parts

    def blocks(self, stream=None):
        """Blocks of block_size + 1 ids of this part's rows (`stream`: the part, when the caller has opened it)."""
        stream = self.part()[0] if stream is None else stream
        pending, size = np.zeros(0, dtype=self.table.dtype), self.block_size
        for batch in stream.iter(batch_size=self.batch_rows):
            text = joined_rows(batch[self.column])
            pending = np.concatenate([pending, self.table.encode(text, what="the stream")])
            count = (len(pending) - 1) // size
            for first in range(0, count, 1024):  # 1024 windows at a time bound the int64 copy
                starts = np.arange(first, min(first + 1024, count))[:, None] * size + np.arange(size + 1)
                yield from pending[starts].astype(np.int64)  # numpy rows: a tensor per block costs ~10 us
            pending = pending[count * size:]

    def __iter__(self):
        stream, index, _ = self.part()  # opened once: a hub stream's opening is a request
        draw = random.Random(self.seed * 1_000_003 + self.epoch * 1009 + index)
        pool = []
        for chunk in self.blocks(stream):
            pool.append({"input_ids": chunk[:-1], "shift_labels": chunk[1:]})
            if len(pool) >= self.buffer:
                yield self.take(pool, draw)
        while pool:
            yield self.take(pool, draw)

    @staticmethod
    def take(pool, draw):
        """A random element of the shuffle buffer, removed in O(1) (the last takes its place)."""
        i = draw.randrange(len(pool))
        pool[i], pool[-1] = pool[-1], pool[i]
        return pool.pop()


# ----------------------------------------------------------------------------------------------------------------
# build_data: what run_train.main trains and validates on


def new_tokenizer(chars):
    from tokenization_char import CharTokenizer

    return CharTokenizer.from_chars(chars)


def check_length(name: str, n: int, block_size: int):
    if n < block_size + 2:
        raise ValueError(f"the {name} part of the corpus has {n} characters, fewer than one block "
                         f"(block_size={block_size} + 1): use a longer text or a smaller --block_size")


def build_data(data_args, tokenizer, block_size, seed):
    """Returns (train dataset, validation blocks (N, block_size + 1), tokenizer). `tokenizer` None: a new model, whose
    vocabulary is the corpus's character set."""
    source = resolve_source(data_args)
    if source.kind == "files" and data_args.text_column != "text":
        raise UsageError(f"--text_column {data_args.text_column!r} names a column of a data set: {source.where} is "
                         f"read as plain text")
    if data_args.unk_token is not None and tokenizer is None and not data_args.streaming:
        raise UsageError("--unk_token maps characters outside a saved model's vocabulary (--model_name_or_path) or "
                         "a streamed one (--streaming): a new model's vocabulary holds every character of its text")
    if data_args.streaming:
        return build_stream(source, data_args, tokenizer, block_size, seed)
    prepared = prepare(source, tokenizer, data_args)
    if tokenizer is None:
        tokenizer = new_tokenizer(prepared.chars)
    ids = prepared.ids()
    split = int(prepared.length * data_args.train_fraction)
    check_length("training", split, block_size)
    check_length("validation", prepared.length - split, block_size)
    train = RandomOffsetBlocks(ids[:split], block_size, mapped=(str(prepared.path), prepared.dtype.name, 0))
    return train, fixed_blocks(ids[split:], block_size, data_args.eval_blocks), tokenizer


def build_stream(source: Source, data_args, tokenizer, block_size, seed):
    """The stream: the vocabulary from its first --vocab_scan_chars characters (a new model), validation blocks
    from its first rows, which training skips."""
    column = source.column if source.kind != "files" else "text"
    open_stream = functools.partial(datasets_stream, source)  # opened afresh by every epoch and every worker
    first = next(iter(open_stream()), None)
    if first is None:
        raise empty_corpus(source)
    checked_column(None, Source(source.kind, source.where, column=column), columns=list(first))

    if tokenizer is None:
        seen, scanned = set(), 0
        for batch in open_stream().iter(batch_size=256):
            text = joined_rows(batch[column])
            seen.update(text)
            scanned += len(text)
            if scanned >= data_args.vocab_scan_chars:
                break
        if not seen:
            raise empty_corpus(source)
        tokenizer = new_tokenizer(sorted(seen))
    table = CharTable.of(tokenizer, data_args.unk_token)
    val_text, training, skip = held_out(source, open_stream, column, data_args.eval_blocks * (block_size + 1))
    val_ids = torch.from_numpy(table.encode(val_text, what=f"the corpus {source.where}").astype(np.int64))
    check_length("validation", val_ids.numel(), block_size)
    train = StreamBlocks(training, table, block_size, column, seed, skip_rows=skip)
    return train, fixed_blocks(val_ids, block_size, data_args.eval_blocks), tokenizer


def reading_ids(data_args, tokenizer, block_size):
    """The validation text's first --eval_reading_chars characters as ids, in order: learning while reading is scored
    on text read in order, not on the spaced validation blocks. A stream offers only its held-out rows (those of
    the validation blocks), so it reads at most those. None with --eval_reading_chars 0."""
    chars = data_args.eval_reading_chars
    if chars <= 0:
        return None
    source = resolve_source(data_args)
    if data_args.streaming:
        column = source.column if source.kind != "files" else "text"
        text, _, _ = held_out(source, functools.partial(datasets_stream, source), column,
                              data_args.eval_blocks * (block_size + 1))
        ids = CharTable.of(tokenizer, data_args.unk_token).encode(text[:chars], what=f"the corpus {source.where}")
    else:
        prepared = prepare(source, tokenizer, data_args)
        split = int(prepared.length * data_args.train_fraction)
        ids = prepared.ids()[split:split + chars]
    return torch.from_numpy(np.array(ids, dtype=np.int64))


def held_out(source: Source, open_stream, column: str, chars: int):
    """(validation text: the stream's first `chars` characters or more, in whole rows or lines; the training stream's
    opener, without them; rows the training stream must still skip). A local source leaves them out before it is
    divided between readers. A hub stream can only skip them, and datasets divides a skip between the parts of a
    divided stream, so with several processes or workers some held-out rows may be trained on (StreamBlocks warns)."""
    if source.kind == "files":
        text, start = head_lines(source.files[0], chars)
        return text, functools.partial(datasets_stream, source, held=start), 0
    rows, count = [], 0
    for row in open_stream():
        rows.append(row[column] + "\n")
        count += len(rows[-1])
        if count >= chars:
            break
    if source.kind == "saved":
        return "".join(rows), functools.partial(datasets_stream, source, held=len(rows)), 0
    return "".join(rows), open_stream, len(rows)
