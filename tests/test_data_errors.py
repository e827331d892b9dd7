"""Bad training data fails with a clear error before training starts (moebalance.train.data)."""

import numpy as np
import pytest

from moebalance.train.config import DataConfig, apply_overrides, get_preset
from moebalance.train.data import TokenData, check_data, prepare_data
from moebalance.train.loop import train


def write_bin(path, tokens):
    np.asarray(tokens, dtype=np.uint16).tofile(path)
    return path


def make(tmp_path, kind):
    """A bad corpus of the given kind; returns (DataConfig, expected exception, message pattern)."""
    cache = str(tmp_path / "cache")
    root = tmp_path / "corpus"
    root.mkdir()
    if kind == "missing":
        return DataConfig(path=str(tmp_path / "nope"), cache_dir=cache), FileNotFoundError, "neither a file nor a folder"
    if kind == "empty_folder":
        (root / ".hidden").write_text("ignored")
        return DataConfig(path=str(root), cache_dir=cache), ValueError, "holds no files"
    if kind == "empty_files":
        for i in range(3):
            (root / f"f{i}.txt").write_text("")
        return DataConfig(path=str(root), cache_dir=cache), ValueError, "the corpus is empty"
    if kind == "binary_files":
        for i in range(3):
            (root / f"f{i}.png").write_bytes(b"\x89PNG\xff\xfe" * 50)
        return DataConfig(path=str(root), cache_dir=cache), ValueError, "holds no text files"
    if kind == "blank_file":  # UTF-8, but nothing to train on
        (root / "blank.txt").write_text("\n\n   \n\t\n")
        return DataConfig(path=str(root / "blank.txt"), cache_dir=cache), ValueError, "no text to train on: only whitespace in its 1 UTF-8 file"
    if kind == "blank_files_by_file":
        for i in range(3):
            (root / f"f{i}.txt").write_text(" \n" * 10)
        cfg = DataConfig(path=str(root), cache_dir=cache, val_split="files")
        return cfg, ValueError, "split .* holds only whitespace"
    if kind == "binary_validation_files":  # the text files all fall in the training split
        from moebalance.train.data import split_files

        names = [f"f{i:02d}.txt" for i in range(40)]
        val = set(split_files(names, 0.05)[1])
        for name in names:
            (root / name).write_bytes(b"\x89PNG\xff\xfe" * 50 if name in val else b"some text\n" * 20)
        cfg = DataConfig(path=str(root), cache_dir=cache, val_split="files")
        return cfg, ValueError, rf"the validation split holds no text: its {len(val)} files are not UTF-8"
    if kind == "single_line_file":
        (root / "one.txt").write_text("hello world, " * 100)
        cfg = DataConfig(path=str(root / "one.txt"), cache_dir=cache, val_split="files")
        return cfg, ValueError, "at least 2 non-empty lines"
    if kind == "too_short_for_chunks":
        (root / "one.txt").write_text("hello world, " * 100)
        return DataConfig(path=str(root / "one.txt"), cache_dir=cache), ValueError, "fewer than 2 chunks of data.val_chunk_tokens=512"
    if kind == "bin_no_vocab":
        path = write_bin(root / "t.bin", range(100))
        return DataConfig(path=str(path)), ValueError, "data.bin_vocab_size must be set"
    if kind == "bin_odd_size":
        path = root / "t.bin"
        path.write_bytes(b"\x01\x00" * 50 + b"\x07")
        return DataConfig(path=str(path), bin_vocab_size=100), ValueError, "not a multiple of the uint16 token size"
    if kind == "bin_empty":
        path = root / "t.bin"
        path.write_bytes(b"")
        return DataConfig(path=str(path), bin_vocab_size=100), ValueError, "empty token file"
    if kind == "bin_beyond_vocab":
        path = write_bin(root / "t.bin", [1, 2, 3, 100, 4] * 20)
        return DataConfig(path=str(path), bin_vocab_size=100), ValueError, "token id 100 is beyond data.bin_vocab_size=100"
    if kind == "bin_missing_val":
        write_bin(root / "train.bin", range(100))
        return DataConfig(path=str(root), bin_vocab_size=100), FileNotFoundError, "missing val.bin"
    raise AssertionError(kind)


KINDS = [
    "missing",
    "empty_folder",
    "empty_files",
    "binary_files",
    "blank_file",
    "blank_files_by_file",
    "binary_validation_files",
    "single_line_file",
    "too_short_for_chunks",
    "bin_no_vocab",
    "bin_odd_size",
    "bin_empty",
    "bin_beyond_vocab",
    "bin_missing_val",
]


@pytest.mark.parametrize("kind", KINDS)
def test_bad_data_is_a_clear_error(tmp_path, kind):
    cfg, exc, match = make(tmp_path, kind)
    with pytest.raises(exc, match=match):
        prepare_data(cfg)


@pytest.mark.parametrize("kind", ["bin_odd_size", "binary_files"])
def test_bad_data_stops_before_training(tmp_path, kind):
    data_cfg, exc, match = make(tmp_path, kind)
    cfg = get_preset("smoke")
    cfg.data = data_cfg
    with pytest.raises(exc, match=match):
        train(cfg, tmp_path / "run", progress=False)
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_a_single_text_file_is_split_by_lines(tmp_path):
    path = tmp_path / "one.txt"
    path.write_text("".join(f"line {i}: the quick brown fox\n" for i in range(200)))
    data = prepare_data(DataConfig(path=str(path), vocab_size=300, cache_dir=str(tmp_path / "cache"), val_split="files"))
    assert len(data.train) > 10 * len(data.val) > 0  # about 5% held out, by the last lines
    check_data(data, seq_len=16)


def token_data(train_tokens, val_tokens, vocab):
    return TokenData(np.asarray(train_tokens, np.uint16), np.asarray(val_tokens, np.uint16), vocab, "fp", "test")


@pytest.mark.parametrize(
    "train_tokens,val_tokens,vocab,match",
    [
        (range(9), range(20), 50, "training split has 9 tokens, fewer than train.seq_len\\+2=10"),
        (range(20), range(8), 50, "validation split has 8 tokens, fewer than train.seq_len\\+1=9"),
        (range(20), range(20), 19, "training split holds token id 19, beyond the vocabulary of 19"),
        ([0] * 20, [0, 30] * 10, 20, "validation split holds token id 30"),
    ],
)
def test_check_data(train_tokens, val_tokens, vocab, match):
    with pytest.raises(ValueError, match=match):
        check_data(token_data(train_tokens, val_tokens, vocab), seq_len=8)
    check_data(token_data(range(20), range(20), 20), seq_len=8)  # the boundary case passes


def test_too_short_split_fails_before_training(tmp_path):
    path = write_bin(tmp_path / "t.bin", list(range(100)) * 2)  # 10 validation tokens
    overrides = [f"data.path={path}", "data.bin_vocab_size=100", "data.val_split=files"]  # the tail is held out
    cfg = apply_overrides(get_preset("smoke"), overrides)
    with pytest.raises(ValueError, match="validation split has 10 tokens"):
        train(cfg, tmp_path / "run", progress=False)
    assert not (tmp_path / "run" / "metrics.jsonl").exists()
