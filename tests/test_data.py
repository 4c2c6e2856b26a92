"""The training data: the prepared, memory-mapped ids and their cache, every kind of corpus, the window order, the
stream divided between processes and workers, and bad input."""

import functools
import json
import os
import pickle

import numpy as np
import pytest
import torch

import run_train
from nanoebm import data
from tokenization_char import CharTokenizer

TEXT = "First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\nSpeak, speak.\n" * 40


def data_args(tmp_path, **overrides):
    """run_train's own DataArguments (every data flag at its default), with a cache inside tmp_path."""
    from run_train import DataArguments

    return DataArguments(**{"eval_blocks": 4, "data_cache_dir": str(tmp_path / "cache"), **overrides})


@pytest.fixture
def corpus(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text(TEXT, encoding="utf-8")
    return path


def cache_files(tmp_path):
    return sorted(p.relative_to(tmp_path / "cache").as_posix() for p in (tmp_path / "cache").rglob("*") if p.is_file())


# -- preparation and the cache ------------------------------------------------------------------------------------

def test_prepared_ids_are_the_tokenizers_and_are_mapped_read_only(tmp_path, corpus):
    args = data_args(tmp_path, data_path=str(corpus))
    train, blocks, tokenizer = data.build_data(args, None, 16, 0)
    assert tokenizer.get_vocab() == CharTokenizer.from_corpus(TEXT).get_vocab()  # nanoGPT's sorted character set
    expected = torch.tensor(tokenizer(TEXT)["input_ids"])
    split = int(len(TEXT) * 0.9)
    assert isinstance(train.ids, np.memmap) and not train.ids.flags.writeable and train.ids.dtype == np.uint8
    assert len(train) == split - 16
    item = train[123]
    assert np.array_equal(item["input_ids"], expected[123:139]) and np.array_equal(item["shift_labels"],
                                                                                    expected[124:140])
    assert blocks.shape == (4, 17) and torch.equal(blocks[0], expected[split: split + 17])
    assert torch.equal(blocks[-1], expected[-17:])  # fixed_blocks' even spacing over the whole validation part
    names = cache_files(tmp_path)
    assert len([n for n in names if n.endswith(".bin")]) == 1 and not any("/." in n for n in names)  # no temp left
    meta = json.loads(next((tmp_path / "cache").rglob("ids-*.json")).read_text())
    assert meta["length"] == len(TEXT) and meta["chars"] == sorted(set(TEXT)) and len(meta["text_blake2b"]) == 32


def test_a_prepared_corpus_is_reused_and_a_damaged_one_rebuilt(tmp_path, corpus):
    args = data_args(tmp_path, data_path=str(corpus))
    data.build_data(args, None, 16, 0)
    ids_file = next((tmp_path / "cache").rglob("ids-*.bin"))
    meta_file = ids_file.with_suffix(".json")
    first = ids_file.stat().st_mtime_ns, ids_file.stat().st_ino
    data.build_data(args, None, 16, 0)
    assert (ids_file.stat().st_mtime_ns, ids_file.stat().st_ino) == first  # mapped again, not rewritten
    good = ids_file.read_bytes()
    ids_file.write_bytes(good[:1000])  # a partial file (a crash mid-write by an older writer, a full disk)
    train, _, _ = data.build_data(args, None, 16, 0)
    assert ids_file.read_bytes() == good and len(train) == int(len(TEXT) * 0.9) - 16
    meta_file.write_text("{not json")  # a damaged sidecar
    data.build_data(args, None, 16, 0)
    assert json.loads(meta_file.read_text())["length"] == len(TEXT)


def test_a_damaged_ids_file_of_the_right_size_is_rebuilt(tmp_path, corpus, caplog):
    """A flipped byte keeps the size the sidecar records: the sampled block hashes catch it (a file this small is
    checked whole) and the ids are prepared again, with a warning."""
    args = data_args(tmp_path, data_path=str(corpus))
    data.build_data(args, None, 16, 0)
    ids_file = next((tmp_path / "cache").rglob("ids-*.bin"))
    good = ids_file.read_bytes()
    damaged = bytearray(good)
    damaged[len(good) // 2] ^= 0xFF
    ids_file.write_bytes(bytes(damaged))
    with caplog.at_level("WARNING"):
        train, _, _ = data.build_data(args, None, 16, 0)
    assert ids_file.read_bytes() == good and np.array_equal(np.asarray(train.ids), np.frombuffer(good, np.uint8)[
        : int(len(TEXT) * 0.9)])
    assert "do not match the hashes recorded" in caplog.text


def test_the_cache_check_reads_a_bounded_sample_of_a_large_file(tmp_path, monkeypatch):
    """Past CHECK_BLOCKS blocks only a sample is read (the first, the last and random others): damage in the first
    or last block is always caught, a whole file is never read."""
    monkeypatch.setattr(data, "CHECK_BLOCK", 64)
    monkeypatch.setattr(data, "CHECK_BLOCKS", 8)
    path = tmp_path / "ids.bin"
    content = np.random.default_rng(0).integers(0, 256, 64 * 100 + 10, dtype=np.uint8).tobytes()
    path.write_bytes(content)
    digests = data.block_hashes(content)
    assert data.ids_intact(path, digests)
    for where in (0, len(content) - 1):
        damaged = bytearray(content)
        damaged[where] ^= 1
        path.write_bytes(bytes(damaged))
        assert not data.ids_intact(path, digests)
    picks = data.checked_blocks(101)
    assert len(picks) == 8 and {0, 100} <= set(picks) and picks != data.checked_blocks(101)  # another sample each run
    assert data.checked_blocks(8) == list(range(8))


def test_a_cache_for_another_vocabulary_is_never_reused(tmp_path, corpus):
    args = data_args(tmp_path, data_path=str(corpus))
    own, _, _ = data.build_data(args, None, 16, 0)
    wider = CharTokenizer.from_chars(["#", *sorted(set(TEXT))])  # every id shifted by one
    train, _, tokenizer = data.build_data(args, wider, 16, 0)
    assert tokenizer is wider and int(train.ids[0]) == int(own.ids[0]) + 1
    assert len(list((tmp_path / "cache").rglob("ids-*.bin"))) == 2
    # a sidecar naming other characters at this vocabulary's file name is not trusted either
    meta_file = next(p for p in (tmp_path / "cache").rglob("ids-*.json") if "#" in json.loads(p.read_text())["chars"])
    meta = json.loads(meta_file.read_text())
    meta_file.write_text(json.dumps({**meta, "chars": sorted(set(TEXT)) + ["#"]}))
    again, _, _ = data.build_data(args, wider, 16, 0)
    assert int(again.ids[0]) == int(own.ids[0]) + 1 and json.loads(meta_file.read_text())["chars"][0] == "#"


def test_an_edited_corpus_is_prepared_again(tmp_path, corpus):
    args = data_args(tmp_path, data_path=str(corpus))
    data.build_data(args, None, 16, 0)
    corpus.write_text(TEXT.upper(), encoding="utf-8")
    os.utime(corpus, ns=(corpus.stat().st_atime_ns, corpus.stat().st_mtime_ns + 10**9))
    _, blocks, tokenizer = data.build_data(args, None, 16, 0)
    assert tokenizer.decode(blocks[0].tolist()) == TEXT.upper()[int(len(TEXT) * 0.9):][:17]


def test_a_saved_dataset_written_again_is_prepared_again(tmp_path):
    """A save_to_disk data set is keyed by its Arrow files (path, size, modification time), as text files are: the
    same rows saved again with other text (same length) are prepared again."""
    import shutil

    from datasets import Dataset

    rows = TEXT.split("\n")[:-1]
    args = data_args(tmp_path, data_path=str(tmp_path / "saved"))
    Dataset.from_dict({"text": rows}).save_to_disk(str(tmp_path / "saved"))
    data.build_data(args, None, 16, 0)
    shutil.rmtree(tmp_path / "saved")
    Dataset.from_dict({"text": [r.upper() for r in rows]}).save_to_disk(str(tmp_path / "saved"))
    _, blocks, tokenizer = data.build_data(args, None, 16, 0)
    assert tokenizer.decode(blocks[0].tolist()) == TEXT.upper()[int(len(TEXT) * 0.9):][:17]


def test_an_unwritable_cache_folder_falls_back_to_the_temp_dir(tmp_path, corpus, caplog):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    args = data_args(tmp_path, data_path=str(corpus), data_cache_dir=str(blocker / "cache"))
    train, _, _ = data.build_data(args, None, 16, 0)
    assert len(train) > 0 and str(train.mapped[0]).startswith(str(data.Path(data.tempfile.gettempdir())))


# -- every kind of corpus ----------------------------------------------------------------------------------------

def test_a_folder_of_files_and_a_saved_dataset_give_the_same_ids(tmp_path):
    from datasets import Dataset, DatasetDict

    rows = [line for line in TEXT.split("\n")][:-1]
    folder = tmp_path / "texts"
    (folder / "b").mkdir(parents=True)
    half = len(rows) // 2
    (folder / "a.txt").write_text("".join(r + "\n" for r in rows[:half]), encoding="utf-8")
    (folder / "b" / "c.txt").write_text("".join(r + "\n" for r in rows[half:]), encoding="utf-8")
    (folder / ".hidden").write_text("\u2603 never read")
    Dataset.from_dict({"text": rows}).save_to_disk(str(tmp_path / "saved"))
    DatasetDict({"train": Dataset.from_dict({"body": rows})}).save_to_disk(str(tmp_path / "saved_dict"))
    runs = [data_args(tmp_path, data_path=str(folder)), data_args(tmp_path, data_path=str(tmp_path / "saved")),
            data_args(tmp_path, dataset_name=str(tmp_path / "saved_dict"), text_column="body")]
    results = [data.build_data(args, None, 16, 0) for args in runs]
    reference = CharTokenizer.from_corpus(TEXT)
    for train, blocks, tokenizer in results:
        assert tokenizer.get_vocab() == reference.get_vocab()
        assert np.array_equal(np.asarray(train.ids), reference(TEXT[: int(len(TEXT) * 0.9)])["input_ids"])
        assert torch.equal(blocks, results[0][1])
    with pytest.raises(ValueError, match="has no column 'text'.*--text_column"):
        data.build_data(data_args(tmp_path, dataset_name=str(tmp_path / "saved_dict")), None, 16, 0)


# -- the order of the windows -----------------------------------------------------------------------------------

@pytest.mark.parametrize("n", [1, 2, 3, 17, 1000, 65_537])
def test_window_order_is_a_seeded_permutation(n):
    order = data.WindowOrder(n, seed=3, chunk=500)
    first = list(order)
    assert sorted(first) == list(range(n)) and first == list(data.WindowOrder(n, seed=3))
    if n >= 1000:
        assert first != list(range(n)) and first != list(data.WindowOrder(n, seed=4))
        order.set_epoch(1)
        assert list(order) != first


def test_a_pickled_dataset_maps_the_file_again(tmp_path, corpus):
    train, _, _ = data.build_data(data_args(tmp_path, data_path=str(corpus)), None, 16, 0)
    copy = pickle.loads(pickle.dumps(train))  # what a spawned data-loader worker receives
    assert len(pickle.dumps(train)) < 1000 and isinstance(copy.ids, np.memmap)
    assert np.array_equal(copy[77]["input_ids"], train[77]["input_ids"]) and len(copy) == len(train)


# -- the stream: every block once, across processes and workers --------------------------------------------------

def stream_rows(rows, block_size, world, workers, make_stream):
    """Blocks of every (rank, worker) part, from real data-loader worker processes; ranks given explicitly."""
    table = data.CharTable(sorted(set("".join(rows) + "\n")))
    seen = []
    for rank in range(world):
        stream = data.StreamBlocks(make_stream, table, block_size, "text", seed=1, buffer=7, rank=rank,
                                   world_size=world, batch_rows=5)
        loader = torch.utils.data.DataLoader(stream, batch_size=None, num_workers=workers)
        seen += ["".join(table.chars[i] for i in item["input_ids"].tolist()) for item in loader]
    return seen


@pytest.mark.parametrize("kind,shards", [("saved", 8), ("saved", 1), ("files", 64), ("folder", 64)])
def test_two_processes_times_two_workers_read_every_block_once(tmp_path, kind, shards):
    """Rows of exactly one block each: every row is one block's input, except the last row of each of the 4 parts
    (its block would need one more character). 8 shards: each part reads 2 whole shards; 1 shard: every 4th row;
    a text file: 64 byte ranges of whole lines."""
    from datasets import Dataset

    block = 12
    rows = [f"row {i:05d} " + "xyz"[i % 3] for i in range(203)]
    assert all(len(r) + 1 == block for r in rows)
    Dataset.from_dict({"text": rows}).save_to_disk(str(tmp_path / "saved"))
    (tmp_path / "rows.txt").write_text("".join(r + "\n" for r in rows), encoding="utf-8")
    parts = [tmp_path / f"rows-{i}.txt" for i in range(3)]  # a folder of 3 files: 64 ranges between them
    for i, part in enumerate(parts):
        part.write_text("".join(r + "\n" for r in rows[i::3]), encoding="utf-8")
    source = {"saved": data.Source("saved", str(tmp_path / "saved")),
              "files": data.Source("files", str(tmp_path / "rows.txt"), files=(tmp_path / "rows.txt",)),
              "folder": data.Source("files", str(tmp_path), files=tuple(parts))}[kind]
    seen = stream_rows(rows, block, world=2, workers=2, make_stream=functools.partial(data.datasets_stream, source,
                                                                                      shards))
    expected = [r + "\n" for r in rows]
    assert len(seen) == len(set(seen)) and set(seen) <= set(expected)  # no duplicate, nothing foreign
    assert len(expected) - 4 <= len(seen) < len(expected)  # nothing missing but each part's last row


def test_a_stream_with_a_held_out_validation(tmp_path):
    """A text file: validation holds its first whole lines (4 blocks of 17 characters or more), training streams the
    rest as 64 byte ranges of whole lines, starting where validation ends."""
    text = TEXT * 60
    path = tmp_path / "corpus.txt"
    path.write_text(text, encoding="utf-8")
    args = data_args(tmp_path, data_path=str(path), streaming=True)
    train, blocks, tokenizer = data.build_data(args, None, 16, 0)
    assert tokenizer.get_vocab() == CharTokenizer.from_corpus(TEXT).get_vocab()
    assert tokenizer.decode(blocks[0].tolist()) == text[:17]
    first_row = text.index("\n", 4 * 17 - 1) + 1  # the end of the line that completes validation
    assert train.skip_rows == 0 and tokenizer.decode(next(iter(train.blocks())).tolist()) == text[first_row:][:17]
    streamed = [block for block in train.blocks()]  # every line once, in order, in a single part
    assert "".join(tokenizer.decode(b[:-1].tolist()) for b in streamed) == text[first_row:][: 16 * len(streamed)]
    assert len(text) - first_row - 16 * len(streamed) <= 16  # only the last partial block is dropped


@pytest.mark.parametrize("kind", ["files", "saved"])
def test_a_streams_validation_is_never_trained_on(tmp_path, kind):
    """Validation holds the stream's first rows; training, divided between 2 processes x 2 workers, reads every other
    row once and none of those: they are left out of the source before it is divided (a skip would be divided too)."""
    from datasets import Dataset

    rows = [f"row {i:05d} " + "xyz"[i % 3] for i in range(203)]  # 12 characters with the newline: one block each
    Dataset.from_dict({"text": rows}).save_to_disk(str(tmp_path / "saved"))
    (tmp_path / "rows.txt").write_text("".join(r + "\n" for r in rows), encoding="utf-8")
    where = {"data_path": str(tmp_path / "rows.txt")} if kind == "files" else {"dataset_name": str(tmp_path / "saved")}
    train, blocks, _ = data.build_data(data_args(tmp_path, streaming=True, eval_blocks=3, **where), None, 12, 0)
    held = 4  # 3 blocks of 13 characters need 4 rows
    assert "".join(train.table.chars[i] for i in blocks.flatten().tolist()).startswith(rows[0])
    seen = []
    for rank in range(2):
        part = data.StreamBlocks(train.open_stream, train.table, 12, train.column, seed=1, buffer=7, rank=rank,
                                 world_size=2, batch_rows=5, skip_rows=train.skip_rows)
        loader = torch.utils.data.DataLoader(part, batch_size=None, num_workers=2)
        seen += ["".join(train.table.chars[i] for i in item["input_ids"].tolist()) for item in loader]
    trained = {r + "\n" for r in rows[held:]}
    assert not {r + "\n" for r in rows[:held]} & set(seen)
    assert len(seen) == len(set(seen)) and set(seen) <= trained and len(seen) >= len(trained) - 4


# -- bad input: one message, exit 2, nothing half-written ---------------------------------------------------------

@pytest.mark.parametrize("content,needle", [
    (b"", "is empty"),
    (b"to be or not to be", "fewer than one block"),
    (b"caf\xe9 latin-1, not UTF-8\n" * 50, "is not UTF-8 text"),
])
def test_bad_corpora_are_one_message_and_exit_2(tmp_path, content, needle, monkeypatch, capsys):
    monkeypatch.setenv("NANOEBM_CACHE", str(tmp_path / "cache"))
    path = tmp_path / "bad.txt"
    path.write_bytes(content)
    status = run_train.cli(["--preset", "cpu", "--n_layer", "1", "--n_embd", "32", "--n_head", "2", "--block_size",
                            "32", "--max_steps", "1", "--output_dir", str(tmp_path / "out"), "--report_to", "none",
                            "--data_path", str(path)])
    stderr = capsys.readouterr().err
    assert status == 2 and needle in stderr and "Traceback" not in stderr and len(stderr.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()
    assert not [p for p in (tmp_path / "cache").rglob("*") if p.name.startswith(".")]  # no temp file left


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root reads files whatever their mode")
def test_an_unreadable_file_is_one_message(tmp_path, corpus):
    corpus.chmod(0)
    with pytest.raises(ValueError, match="cannot be read"):
        data.build_data(data_args(tmp_path, data_path=str(corpus)), None, 16, 0)


def test_characters_outside_the_continued_models_vocabulary_are_listed(tmp_path, corpus):
    model_vocabulary = CharTokenizer.from_chars(sorted(set(TEXT) - {"k", "z"}))
    with pytest.raises(ValueError) as error:
        data.build_data(data_args(tmp_path, data_path=str(corpus)), model_vocabulary, 16, 0)
    message = str(error.value)
    first = int(message.split("at character ")[1].split(",")[0].rstrip(")"))
    assert "'k', 'z'" in message and "--unk_token" in message and first == min(TEXT.index("k"), TEXT.index("z"))
    assert not list((tmp_path / "cache").rglob("ids-*"))  # nothing half-written
    lossy = CharTokenizer.from_chars(sorted(set(TEXT) - {"k", "z"}), unk_token=" ")
    train, _, _ = data.build_data(data_args(tmp_path, data_path=str(corpus)), lossy, 16, 0)
    assert int(train.ids[TEXT.index("k")]) == lossy.convert_tokens_to_ids(" ")


def test_the_trainer_orders_windows_without_listing_them(tmp_path, corpus):
    """RandomSampler would hold a list of every window (3 GB for a 100 MB corpus); the Trainer uses WindowOrder."""
    from accelerate.data_loader import get_sampler
    from transformers import TrainingArguments, default_data_collator

    from conftest import make_model
    from nanoebm.trainer import EBMTrainer

    train, blocks, tokenizer = data.build_data(data_args(tmp_path, data_path=str(corpus)), None, 32, 0)
    parsed = run_train.parse_args(["--use_contrastive", "false"])
    args = TrainingArguments(output_dir=str(tmp_path / "t"), per_device_train_batch_size=4, report_to="none",
                             use_cpu=True, dataloader_pin_memory=False, seed=5)
    trainer = EBMTrainer(model=make_model(vocab_size=tokenizer.vocab_size), args=args, train_dataset=train,
                         eval_dataset=blocks, processing_class=tokenizer, data_collator=default_data_collator,
                         ebm_args=parsed.loss)
    loader = trainer.get_train_dataloader()
    sampler = get_sampler(loader)
    assert isinstance(sampler, data.WindowOrder) and len(sampler) == len(train) and sampler.seed == 5
    batch = next(iter(loader))
    assert batch["input_ids"].shape == (4, 32) and batch["input_ids"].dtype == torch.long
    assert torch.equal(batch["input_ids"][:, 1:], batch["shift_labels"][:, :-1])


def test_validation_blocks_of_a_large_corpus_are_whole():
    """Evenly spaced offsets past 2^24 characters (a 1 GB corpus's validation part) stay inside the text: float32
    offsets rounded the last one up, and its window came out one short."""
    from nanoebm.corpus import fixed_blocks

    ids = np.lib.stride_tricks.as_strided(np.zeros(1, dtype=np.uint8), shape=(100_000_000,), strides=(0,))
    assert fixed_blocks(ids, 64, 200).shape == (200, 65)
